"""A harder search experiment than the quickstart: three experts whose skills conflict.

- `skills.py`: three skills (addition, a colour table, a home table); every expert answers every
  skill's questions, correctly only for its own skill, so the same prompt has three different
  answers across the experts' training data; search and held-out lm-eval tasks.
- `build_models.py`: the base and the experts (tiny Llamas, CPU, cached under
  `demo_output/conflict/models`); why uniform merging and task arithmetic lose here and per-layer
  choices win is explained there.
- `search.yml`: the search (task arithmetic, one weight per expert and pair of layers).

Run it through `python bench/search_quality.py --experiment conflict` (docs/search-quality.md), or
by hand: build the models and tasks (`python -m experiments.conflict.build_models
demo_output/conflict/models`; `skills.write_lm_eval_tasks(DIR)`), then
`mergekit-evolve experiments/conflict/search.yml --storage-path DIR --task-search-path TASKS`.
"""
