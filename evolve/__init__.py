"""`mergekit-evolve`: the search loop and everything around it.

    optimizers  Optimizer interface (ask/tell/state_dict) and its registry: pycma, Optuna samplers
    loop        the pure ask -> evaluate -> tell loop and the journal replay that makes resume exact
    pool        Ray actors that evaluate candidates: dispatch, retries, replacement, timeouts
    cluster     connecting to Ray: a private local cluster that dies with the driver, or an existing one
    store       the experiment directory: Optuna study (SQLite), checkpoint, manifest, best recipe
    report      status line, fitness plot, model-card summary, export of the best recipe and model
    search      the driver: wires the above together for one search
    config, cli the search.yml schema and the command line
"""
