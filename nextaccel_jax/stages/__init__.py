"""The stages of the method, in pipeline order, dispatched by `main.py` from `config.stage`.

  data                  build the multi-scale dataset, summarise it (and open it for the others)
  stage1_aqvae          the AQ-VAE tokenizer
  stage2_transformer    the next-acceleration-scale transformer: student or privileged teacher
  stage3_distill        on-policy privileged distillation of the student
  evaluate              the report: every model against the zero-filled input at R = 32
  pipeline              all of them in order, resumable

Every training stage exposes `create_train_state`, `train_step`, `eval_step`,
`build_step(config, mesh, frozen, total_steps)` (the jitted steps `train_and_evaluate` and
`testing.stage_step` share) and `train_and_evaluate(config, workdir)`. The loop plumbing (metric
writer, finiteness checks, progress, timing, the ahead-of-time memory check) lives in `common` as
small functions rather than a trainer class; the optimizer policy is `nextaccel_jax.optim`. A
stage imports only stages before it in this order.
"""
