"""`mergekit-evolve`: the search loop and everything around it.

    config       the search.yml schema (the genome's section is search_spaces.definition)
    options      the command line's run options (EvolveOptions)
    build        the parts a config describes: genome, starting point, anchors, optimiser
    ask_tell     the Optimizer interface: Proposal, Result, ask/tell
    optimizers   the optimisers' registry and lifecycle: pycma, Optuna samplers, and
    gradient     gradient descent on the genes in the workers (optimizer: gradient, [cma, gradient])
    loop         the pure ask -> evaluate -> tell loop and the journal replay that makes resume exact
    objectives   scoring: weighted fitness, Pareto objectives, constraints
    model_refs   the genome's model references resolved and checked before any worker starts
    tasks_check  the driver's check of the config's tasks and metrics, before any worker starts
    workers      what workers are started with (evaluator spec, template recipe, environment)
    pool         Ray actors that evaluate payloads: dispatch, retries, replacement, timeouts
    pool_runner  the loop's Runner over the pool: recipes out, Outcomes back, identical recipes reused
    cluster      connecting to Ray: a private local cluster that dies with the driver, or an existing one
    store        the experiment directory: Optuna study (SQLite), manifest, best recipe; Outcome <-> study
    selection    which candidate is exported (CandidateRow: one complete candidate)
    pareto       the Pareto front of points
    rescore      held-out re-scoring of the top candidates
    report       status line, fitness plot, model-card summary, export of the best recipe and model
    html_report  DIR/report.html
    search       the driver: wires the above together for one search
    dry_run      `--dry-run`: what a search would do
    cli          the command line
"""
