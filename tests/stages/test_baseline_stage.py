"""The baselines (U-Net, E2E-VarNet) on the smoke preset: training through the command line,
resume, the measured k-space they read, the evaluation rows and the report's winners."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import baseline as baseline_config
from configs import eval as eval_config
from nextaccel_jax import checkpointing, export, inference, optim, sharding, testing
from nextaccel_jax.data import pipeline, transforms
from nextaccel_jax.evaluation import report
from nextaccel_jax.stages import baseline, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = "fastmri_brain_multiscale/smoke"
FAMILIES = ("cartesian_y", "cartesian_x", "gaussian_2d", "radial")


def _main(workdir, model, data_dir, *overrides):
  """`python -m nextaccel_jax.main` on the smoke preset of `model`, sharing the tests' XLA
  settings and compilation cache so that the second run of a step compiles nothing."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env.pop("NEXTACCEL_TRACEBACK", None)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "nextaccel_jax.main",
      f"--config=configs/baseline.py:{model},smoke",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
      *overrides,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _lines(workdir, split):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in lines if r["split"] == split]


# The tests that read the trained baselines share one pytest-xdist worker, so they train once.
SHARED = pytest.mark.xdist_group("baselines")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_data_dir):
  """`{model: workdir}`: each baseline trained for three smoke steps in two invocations of the
  command line, the second resuming from the first's checkpoint at step 2."""
  out = {}
  for model in ("unet", "varnet"):
    workdir = tmp_path_factory.mktemp(model)
    first = _main(workdir, model, smoke_data_dir, "--config.max_steps_per_run=2")
    assert f"{model}: train step compiled in" in first.stdout
    _main(workdir, model, smoke_data_dir)
    out[model] = workdir
  return out


@SHARED
@pytest.mark.parametrize("model", ["unet", "varnet"])
def test_trains_and_resumes_through_main(trained, model):
  workdir = trained[model]
  assert [r["step"] for r in _lines(workdir, "train")] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in _lines(workdir, "train"))
  loss_term = "l1_loss" if model == "unet" else "ssim_loss"
  assert loss_term in _lines(workdir, "train")[0]
  config = json.loads((workdir / "config.json").read_text())
  assert (config["stage"], config["model_name"]) == ("baseline", model)
  final = json.loads((workdir / "final_metrics.json").read_text())
  for row in ("recon", "zero_filled"):
    for name in ("psnr", "ssim"):
      assert np.isfinite(final[f"{row}/{name}"])
      for family in FAMILIES:
        assert np.isfinite(final[f"{row}/{family}/{name}"]), (row, family, name)
  with checkpointing.Checkpointer(workdir) as ckpt:
    assert ckpt.latest_step() == 3
    assert ckpt.latest_step(best=True) == 3
  # Checkpoints hold the state and the run's kind, and read back as a reconstructor.
  stored = checkpointing.find_checkpoint(workdir)
  assert (stored.meta["stage"], stored.meta["model_name"]) == ("baseline", model)
  rec = export.load_reconstructor(workdir, "ignored/tokenizer")
  assert isinstance(rec, inference.BaselineReconstructor)
  assert rec.reads_kspace == (model == "varnet")


@SHARED
def test_resumed_run_repeats_the_straight_run(trained, smoke_data_dir, tmp_path):
  # The U-Net's split run (2 + 1 steps) against one straight run of the same config.
  config = baseline_config.get_config("unet,smoke")
  config.data.data_dir = smoke_data_dir
  baseline.train_and_evaluate(config, tmp_path)
  straight = {r["step"]: r["loss"] for r in _lines(tmp_path, "train")}
  split = {r["step"]: r["loss"] for r in _lines(trained["unet"], "train")}
  assert sorted(straight) == sorted(split) == [1, 2, 3]
  for step in (1, 2, 3):
    assert split[step] == pytest.approx(straight[step], rel=1e-4), step


def test_r32_kspace_is_the_measurement_of_the_r32_level(smoke_data_dir):
  mesh = sharding.make_mesh()
  train = pipeline.load_split(SMOKE, "train", smoke_data_dir)
  loader = pipeline.TrainLoader(train, global_batch_size=8, mesh=mesh, seed=1, keep_maps=True)
  batch = jax.device_get(next(loader))
  loader.close()
  assert batch["maps"].shape == (8, 5, 64, 64, 2)
  kspace, mask = pipeline.r32_kspace(batch)
  assert kspace.shape == (8, 5, 64, 64, 2) and mask.dtype == bool
  np.testing.assert_array_equal(mask, batch["mask_levels"] == 0)
  k = transforms.channels_to_complex(kspace)
  # Zero off the mask, and its multicoil adjoint is the loader's R = 32 level.
  assert np.all(k[~np.broadcast_to(mask[:, None], k.shape)] == 0)
  maps = transforms.channels_to_complex(batch["maps"])
  x32 = transforms.complex_to_channels(transforms.mc_adjoint(k, maps))
  np.testing.assert_allclose(x32, batch["levels"][:, 0], atol=1e-5)
  # The single-coil measurement gives the single-coil level.
  k1, _ = pipeline.r32_kspace(batch, single_coil=True)
  x_fs = transforms.channels_to_complex(batch["levels"][:, -1])
  m_BMHW = batch["mask_levels"][:, None] <= np.arange(5)[:, None, None]
  single = transforms.undersample_levels_single(x_fs, m_BMHW)[:, 0]
  x1 = transforms.complex_to_channels(transforms.ifft2c(transforms.channels_to_complex(k1[:, 0])))
  np.testing.assert_allclose(x1, single, atol=1e-5)

  # The evaluation split's stored levels (built in numpy) are the adjoint of it too.
  val = pipeline.load_split(SMOKE, "validation", smoke_data_dir)
  batch = jax.device_get(
    next(iter(pipeline.EvalLoader(val, global_batch_size=8, mesh=mesh, with_maps=True)))
  )
  kspace, _ = pipeline.r32_kspace(batch)
  x32 = transforms.mc_adjoint(
    transforms.channels_to_complex(kspace), transforms.channels_to_complex(batch["maps"])
  )
  np.testing.assert_allclose(transforms.complex_to_channels(x32), batch["levels"][:, 0], atol=1e-5)


@SHARED
def test_evaluation_rows_and_winners(trained, smoke_data_dir, tmp_path):
  config = eval_config.get_config("smoke")
  config.data.data_dir = smoke_data_dir
  config.models.unet = str(trained["unet"])
  config.models.varnet = str(trained["varnet"])
  config.decoding = ("argmax", "top_k")
  metrics = evaluate.run(config, tmp_path)
  for family in FAMILIES:
    for row in ("unet/argmax", "varnet/argmax", "unet+DC/argmax", "varnet+DC/argmax"):
      for key in ("paper/psnr", "paper/ssim", "paper/lpips_alex", "fastmri/ssim"):
        assert np.isfinite(metrics[f"{row}/{family}/{key}"]), (row, family, key)
  # A baseline samples no tokens: one row each, whatever the decodings.
  assert not any(k.startswith(("unet/top_k", "varnet/top_k")) for k in metrics)

  text = (tmp_path / "report.md").read_text()
  assert "unet ← `" in text and "(Unet baseline)" in text and "(VarNet baseline)" in text
  assert "### Decoding variants" not in text
  winners = text.split("## Winners")[1].split("## Protocol")[0]
  for family in FAMILIES:
    for protocol in ("paper", "fastmri"):
      line = next(x for x in winners.splitlines() if x.startswith(f"| {family} | `{protocol}`"))
      rows = ["zero_filled"] + [f"{m}/argmax" for m in ("unet", "varnet", "unet+DC", "varnet+DC")]
      best, value = report.winners(metrics, rows, family, protocol, "psnr")
      labels = [report.row_label(r) for r in best]
      assert f"{', '.join(labels)} ({value:.2f})" in line
  assert (tmp_path / "figures" / "radial.png").is_file()


def test_winners_table_marks_ties_and_direction():
  metrics = {
    "zero_filled/radial/paper/psnr": 10.0,
    "a/argmax/radial/paper/psnr": 12.004,
    "b/argmax/radial/paper/psnr": 11.996,
    "zero_filled/radial/paper/lpips_alex": 0.5,
    "a/argmax/radial/paper/lpips_alex": 0.3,
    "b/argmax/radial/paper/lpips_alex": float("nan"),
  }
  rows = ["zero_filled", "a/argmax", "b/argmax"]
  assert report.winners(metrics, rows, "radial", "paper", "psnr") == (
    ["a/argmax", "b/argmax"],
    12.0,
  )
  assert report.winners(metrics, rows, "radial", "paper", "lpips_alex") == (["a/argmax"], 0.3)
  assert report.winners(metrics, rows, "radial", "paper", "ssim") == ([], None)
  table = report.winners_table(metrics, rows, ["radial"], ["paper"], ["psnr", "ssim", "lpips_alex"])
  assert table.splitlines()[0] == "| Mask | Protocol | PSNR ↑ | SSIM ↑ | LPIPS-alex ↓ |"
  assert table.splitlines()[2] == "| radial | `paper` | a, b (12.00) | – | a (0.3000) |"


def test_pipeline_trains_and_reports_the_unet(smoke_pipeline):
  root, config, metrics = smoke_pipeline
  assert config.unet.model_name == "unet"
  state = json.loads((root / "pipeline.json").read_text())
  assert list(state["stages"]).index("unet") < list(state["stages"]).index("evaluate")
  for family in FAMILIES:
    assert np.isfinite(metrics[f"unet/argmax/{family}/paper/ssim"])
    assert np.isfinite(metrics[f"unet+DC/argmax/{family}/fastmri/psnr"])
  text = (root / "evaluate" / "report.md").read_text()
  assert "## Winners" in text and "- **unet budget**: " in text
  assert "min for aqvae + student" in (root / "pipeline.md").read_text()


def test_config_arguments():
  config = baseline_config.get_config("unet")
  assert (config.stage, config.model_name) == ("baseline", "unet")
  assert config.data.builder_config == "demo"
  assert config.num_train_steps > 0 and config.optim.name == "rmsprop"
  paper = baseline_config.get_config("varnet,paper")
  assert (paper.model.num_cascades, paper.model.chans, paper.model.pools) == (12, 18, 4)
  assert (paper.model.sens_chans, paper.model.sens_pools) == (8, 4)
  assert (paper.optim.name, paper.optim.lr) == ("adam", 3e-4)
  assert (paper.loss.ssim, paper.num_epochs) == (1.0, 50)
  unet_paper = baseline_config.get_config(" unet , paper ")
  assert (unet_paper.model.chans, unet_paper.model.num_pool_layers) == (32, 4)
  with pytest.raises(ValueError, match="model 'resnet'; choose one of unet, varnet"):
    baseline_config.get_config("resnet,smoke")
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    baseline_config.get_config("unet,huge")
  with pytest.raises(ValueError, match=r"expected <model>\[,<preset>\]"):
    baseline_config.get_config("unet,smoke,extra")
  with pytest.raises(ValueError, match=r"expected <model>\[,<preset>\]"):
    baseline_config.get_config(",smoke")


def test_bad_loss_and_optimizer_are_named(smoke_data_dir, tmp_path):
  config = baseline_config.get_config("unet,smoke")
  config.data.data_dir = smoke_data_dir
  config.loss.l1 = 0.0
  with pytest.raises(ValueError, match="config.loss: every weight is 0"):
    baseline.train_and_evaluate(config, tmp_path)
  config = baseline_config.get_config("unet,smoke")
  config.optim.name = "sgd"
  with pytest.raises(ValueError, match="config.optim.name must be one of rmsprop, adam"):
    baseline.build_step(config, sharding.make_mesh(), 3)


def test_step_schedule_and_pytorch_rmsprop():
  schedule = optim.step_schedule(base_lr=1e-3, total_steps=50, decay_at=(0.8,))
  assert float(schedule(39)) == pytest.approx(1e-3)
  assert float(schedule(40)) == pytest.approx(1e-4)
  with pytest.raises(ValueError, match="decay_at must lie in"):
    optim.step_schedule(base_lr=1e-3, total_steps=50, decay_at=(1.5,))
  config = baseline_config.get_config("unet,smoke")
  tx, _ = optim.baseline_optimizer(config.optim, 50)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, -3.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # PyTorch's RMSprop: v = 0.01 · g², step = lr · g / (sqrt(v) + eps).
  g = np.array([0.5, -3.0])
  np.testing.assert_allclose(updates["w"], -1e-3 * g / (np.sqrt(0.01 * g * g) + 1e-8), rtol=1e-5)


def test_magnitude_output_takes_the_input_phase():
  x_r32 = np.zeros((1, 2, 2, 2), np.float32)
  x_r32[0, 0, 0] = (0.0, 2.0)  # phase π/2
  x_r32[0, 0, 1] = (-1.0, 0.0)  # phase π
  y = np.full((1, 2, 2, 1), 3.0, np.float32)
  x = np.asarray(inference.baseline_image(jnp.asarray(y), jnp.asarray(x_r32)))
  np.testing.assert_allclose(x[0, 0, 0], (0.0, 3.0), atol=1e-6)
  np.testing.assert_allclose(x[0, 0, 1], (-3.0, 0.0), atol=1e-6)
  # Where the input is zero the phase is 0; a complex output passes through unchanged.
  np.testing.assert_allclose(x[0, 1], [(3.0, 0.0), (3.0, 0.0)], atol=1e-6)
  y2 = np.random.default_rng(0).standard_normal((1, 2, 2, 2)).astype(np.float32)
  np.testing.assert_array_equal(inference.baseline_image(jnp.asarray(y2), jnp.asarray(x_r32)), y2)


@SHARED
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(smoke_data_dir, tmp_path):
  config = baseline_config.get_config("unet,smoke")
  config.data.data_dir = smoke_data_dir
  config.ckpt.every = 1
  config.ckpt.max_to_keep = 3
  baseline.train_and_evaluate(config, tmp_path)
  testing.damage_checkpoint(tmp_path / "checkpoints" / "3")
  # The killed job had also logged a step its checkpoint never reached.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "split": "train", "loss": 1.0}) + "\n" + '{"step": 5, "spl')
  baseline.train_and_evaluate(config, tmp_path)
  assert (tmp_path / "damaged_checkpoints" / "3").is_dir()
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2, 3]
  # Steps 3 was trained again from step 2, and each step is logged once.
  assert [r["step"] for r in _lines(tmp_path, "train")] == [1, 2, 3]
  assert [r["step"] for r in _lines(tmp_path, "validation")] == [3]
