"""Stage 3: the KL objective, on-policy step properties, the smoke loop, resume and errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import distill as distill_config
from nextaccel_jax import inference, losses, sharding
from nextaccel_jax.models import aqvae as aqvae_lib
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common
from nextaccel_jax.stages import stage2_transformer as transformer
from nextaccel_jax.stages import stage3_distill as distill

# --------------------------------------------------------------------------------------------------
# The objective


def _np_kl(p_logits, q_logits):
  p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  q = np.exp(q_logits - q_logits.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_distillation_kl_matches_numpy(direction):
  rng = np.random.default_rng(0)
  layout = transformer_lib.sequence_layout((1, 2, 3))
  s = rng.normal(size=(2, 13, 7)) * 3
  t = rng.normal(size=(2, 13, 7)) * 3
  loss, aux = losses.distillation_kl(jnp.asarray(s), jnp.asarray(t), layout, direction)
  kl = _np_kl(s, t) if direction == "reverse" else _np_kl(t, s)
  per_scale = [kl[:, b:e].mean() for b, e in layout]
  np.testing.assert_allclose(np.asarray(aux["kl_BL"]), kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([float(v) for v in aux["kl_scales"]], per_scale, rtol=1e-5)
  # Every scale weighs the same, not every token.
  np.testing.assert_allclose(float(loss), np.mean(per_scale), rtol=1e-5)
  assert not np.isclose(float(loss), kl.mean())


def test_distillation_kl_rejects_unknown_direction():
  with pytest.raises(ValueError, match="direction"):
    losses.distillation_kl(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), ((0, 1),), "sideways")


# --------------------------------------------------------------------------------------------------
# One step on tiny random models


@pytest.fixture(scope="module")
def tiny():
  config = distill_config.get_config("smoke")
  mesh = sharding.make_mesh()
  tokenizer = transformer.make_tokenizer(config)
  tok_vars = aqvae_lib.init_variables(tokenizer, jax.random.key(1), config.data.image_size)
  student, teacher = distill.make_models(config)
  size = config.data.image_size
  p_student = transformer_lib.init_params(student, jax.random.key(2), size)["params"]
  p_teacher = transformer_lib.init_params(teacher, jax.random.key(3), size)["params"]
  rng = np.random.default_rng(0)
  levels = rng.normal(size=(8, 6, size, size, 2)).astype(np.float32)
  batch = {"levels": jnp.asarray(levels), "family": jnp.asarray(np.arange(8) % 4, jnp.int32)}
  return dict(
    config=config,
    mesh=mesh,
    tokenizer=tokenizer,
    tok_vars=tok_vars,
    student=student,
    teacher=teacher,
    p_student=p_student,
    p_teacher=p_teacher,
    batch=batch,
  )


def _loss(t, student_params, teacher_params, teacher_model, batch):
  return jax.jit(functools.partial(_loss_fn, t, teacher_model=teacher_model))(
    student_params, teacher_params, batch
  )


def _loss_fn(t, student_params, teacher_params, batch, *, teacher_model):
  rollout = distill.on_policy_batch(
    t["student"],
    teacher_model,
    t["tokenizer"],
    t["tok_vars"],
    student_params,
    teacher_params,
    batch,
    sampling=inference.MULTINOMIAL,
    rng=jax.random.key(0),
  )
  logits, _ = t["student"].apply(
    {"params": student_params}, rollout["inputs_BLZ"], rollout["context_BHW2"], batch["family"]
  )
  layout = transformer_lib.sequence_layout(t["student"].patch_nums)
  return losses.distillation_kl(logits, rollout["teacher_logits_BLV"], layout)[0]


def test_zero_loss_when_student_is_teacher_and_contexts_match(tiny):
  t = tiny
  levels = t["batch"]["levels"]
  # R = 32 context equal to the FS context, and the "teacher" is the student itself.
  same = {"levels": levels.at[:, -1].set(levels[:, 0]), "family": t["batch"]["family"]}
  loss = _loss(t, t["p_student"], t["p_student"], t["student"], same)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  # A different teacher gives a positive KL.
  assert float(_loss(t, t["p_student"], t["p_teacher"], t["teacher"], t["batch"])) > 1e-4


def test_gradient_reaches_only_the_student(tiny):
  t = tiny
  grad = jax.jit(
    jax.grad(functools.partial(_loss_fn, t, teacher_model=t["teacher"]), argnums=(0, 1))
  )
  g_student, g_teacher = grad(t["p_student"], t["p_teacher"], t["batch"])
  assert float(common.tree_norm(g_student)) > 0
  assert float(common.tree_norm(g_teacher)) == 0.0


def test_scoring_pass_has_no_drop_path_like_the_rollout(tiny):
  # The student scores its own rollout against itself as the teacher (same context): the KL is 0
  # only if the scoring pass runs the policy that sampled, i.e. without drop path.
  t = tiny
  student = t["student"].clone(drop_path_rate=0.5)
  levels = t["batch"]["levels"]
  same = {"levels": levels.at[:, -1].set(levels[:, 0]), "family": t["batch"]["family"]}
  tx = optax.sgd(0.0)
  state = distill.TrainState(
    step=jnp.zeros((), jnp.int32), params=t["p_student"], opt_state=tx.init(t["p_student"])
  )
  step = jax.jit(
    functools.partial(
      distill.train_step,
      model=student,
      teacher=student,
      tokenizer=t["tokenizer"],
      tx=tx,
      sampling=inference.MULTINOMIAL,
    )
  )
  _, out = step(state, same, t["tok_vars"], t["p_student"])
  assert float(out["loss"]) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The stage loop on the smoke dataset


def _train(workdir, key="loss"):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r[key] for r in lines if r.get("split") == "train"}


def test_distill_smoke_run_and_resume(smoke_pipeline, stage_config, tmp_path):
  # The smoke pipeline's distillation is this stage's smoke run.
  root = smoke_pipeline[0]
  straight, split = root / "distill", tmp_path / "split"
  final = json.loads((straight / "final_metrics.json").read_text())
  for key in ["kl", "neg_kl", "agree", "tf/ce", "recon/ssim", "recon/psnr", "zero_filled/ssim"]:
    assert np.isfinite(final[key]), key
  lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in lines if r["split"] == "train"][-1]
  for key in ["agree", "argmax_agree", "grad_norm", "update_norm"]:
    assert np.isfinite(last[key]), key
  # The loss weighs the five scales equally.
  kl = [last[f"kl/scale_{k}"] for k in range(1, 6)]
  assert last["loss"] == pytest.approx(np.mean(kl), rel=1e-5)
  assert last["update_norm"] > 0
  # The workdir loads like a stage-2 student's.
  student = transformer.make_model(stage_config("distill"))
  params = distill.load_transformer_params(str(straight), "x", student, 64, sharding.make_mesh())
  assert jax.tree.structure(params) == jax.tree.structure(
    transformer_lib.init_params(student, jax.random.key(0), 64)["params"]
  )
  # Rollout keys are functions of (seed, step): a run split in two repeats the straight losses.
  # Without tokenizer_from, the tokenizer is the stage-1 workdir the student recorded, and the
  # run writes it down.
  for _ in range(2):
    distill.train_and_evaluate(
      stage_config("distill", max_steps_per_run=1, tokenizer_from=""), split
    )
  written = json.loads((split / "config.json").read_text())
  assert written["tokenizer_from"] == str(root / "aqvae")
  np.testing.assert_allclose(
    list(_train(split).values()), list(_train(straight).values()), rtol=1e-5
  )


def test_distill_errors_name_the_field(smoke_pipeline, stage_config, tmp_path):
  with pytest.raises(ValueError, match="config.init_from is empty"):
    distill.train_and_evaluate(stage_config("distill", init_from=""), tmp_path)
  with pytest.raises(FileNotFoundError, match="config.teacher_from=.*no such directory"):
    distill.train_and_evaluate(
      stage_config("distill", teacher_from=str(tmp_path / "nope")), tmp_path
    )
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.teacher_from=.*no stage-2 checkpoint"):
    distill.train_and_evaluate(stage_config("distill", teacher_from=str(empty)), tmp_path)
  with pytest.raises(ValueError, match="does not match"):
    distill.train_and_evaluate(stage_config("distill", **{"teacher.width": 64}), tmp_path)
