"""Training stages, one module each, dispatched by `main.py` from `config.stage` (style.md §2).

Every stage module exposes the same four functions: `create_train_state`, `train_step`,
`eval_step` and `train_and_evaluate(config, workdir)`. The loop plumbing they share (metric
writer, schedules and optimiser, finiteness checks, progress and timing) lives in `common.py` as
small functions rather than a trainer class.
"""
