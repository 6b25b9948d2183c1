"""Inference exports: export → load gives the in-memory reconstruction bit for bit, fields survive
JSON, training workdirs (best / latest / fallbacks) load like an export, and bad input fails
clearly."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nextaccel_jax import checkpointing, testing
from nextaccel_jax import export as E
from nextaccel_jax import inference as I
from nextaccel_jax.data import masks, transforms
from nextaccel_jax.models import aqvae
from nextaccel_jax.models import fields as F
from nextaccel_jax.models import transformer as T
from nextaccel_jax.stages import common
from nextaccel_jax.stages import stage2_transformer as stage

# `config.tokenizer` / `config.model` sections as a training run records them (lists, dtype names).
TOKENIZER = dict(
  ch=16,
  ch_mult=[1, 1, 2],
  num_res_blocks=1,
  z_channels=8,
  vocab_size=64,
  norm_groups=8,
  label_features=16,
  dtype="float32",
  remat=False,
)
# Both blocks attend to 16² context (256 tokens): the 64² level costs most of a CPU step.
MODEL = dict(
  depth=2, width=64, num_heads=4, context_map=[0, 1], role="student", dtype="float32", remat=False
)
IMAGE = aqvae.min_image_size(TOKENIZER["ch_mult"])  # 64² → 16² latent
B = 2


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """XLA without its expensive optimisation passes: these tiny models spend far longer in the
  compiler than running. Both sides of every comparison compile with the same setting."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def run_config(tokenizer_from: str = "") -> ml_collections.ConfigDict:
  """The parts of a stage-2 config that inference reads."""
  return ml_collections.ConfigDict(
    {
      "stage": "transformer",
      "seed": 0,
      "data": {"image_size": IMAGE, "builder_config": "smoke", "single_coil": False},
      "model": {k: tuple(v) if isinstance(v, list) else v for k, v in MODEL.items()},
      "tokenizer": {k: tuple(v) if isinstance(v, list) else v for k, v in TOKENIZER.items()},
      "tokenizer_from": tokenizer_from,
      "init_from": "",
    }
  )


@pytest.fixture(scope="module")
def models():
  """Modules built as the training stage builds them, with random variables."""
  config = run_config()
  tokenizer, model = stage.make_tokenizer(config), stage.make_model(config)
  tv = testing.random_tokenizer_variables(tokenizer, IMAGE)
  params = testing.random_like(
    jax.eval_shape(lambda: T.init_params(model, jax.random.key(0), IMAGE))["params"], 1
  )
  return tokenizer, tv, model, params


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, IMAGE, IMAGE, 2)).astype(np.float32) * 0.3)
  return x, jnp.array([1, 3])


@pytest.fixture(scope="module")
def reference(models, data):
  """The in-memory reconstruction, plain and with intermediates."""
  rec = I.Reconstructor(*models)
  plain = np.asarray(rec.reconstruct(*data))
  x_hat, aux = rec.reconstruct(*data, return_intermediates=True)
  # The comparisons below are not vacuous: finite images, varied tokens.
  assert np.isfinite(plain).all() and np.abs(plain).max() > 0
  assert all(len(np.unique(np.asarray(i))) > 4 for i in aux["idx"][1:])
  return plain, jax.tree.map(np.asarray, (x_hat, aux))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write_stage1(workdir, tv, step: int = 7) -> str:
  """A stage-1 workdir with periodic checkpoints only (no best kept)."""
  with checkpointing.Checkpointer(workdir, keep_best=False) as ckpt:
    state = {"step": np.int32(step), **tv, "opt_state": {"count": np.int32(step)}}
    ckpt.save(step, state, meta={"stage": "aqvae", "model": TOKENIZER, "image_size": IMAGE})
  with common.MetricWriter(workdir) as writer:
    writer.write_config({"stage": "aqvae", "model": TOKENIZER, "data": {"image_size": IMAGE}})
  return str(workdir)


def write_stage2(workdir, params_best, params_latest, tokenizer_from, meta_tokenizer_from=None):
  """A stage-2 workdir as `stage2_transformer.train_and_evaluate` leaves it: best at step 2,
  newest periodic checkpoint at step 3, config.json."""
  config = run_config(tokenizer_from)
  tx = optax.adamw(1e-3)
  meta = {
    "stage": "transformer",
    "role": "student",
    "model": MODEL,
    "tokenizer": TOKENIZER,
    "tokenizer_from": meta_tokenizer_from or tokenizer_from,
    "image_size": IMAGE,
  }

  def state(step, params):
    return stage.TrainState(step=jnp.int32(step), params=params, opt_state=tx.init(params))

  with checkpointing.Checkpointer(workdir, best_metric="neg_ce") as ckpt:
    ckpt.save(2, state(2, params_best), meta=meta)
    ckpt.save_best(2, state(2, params_best), -1.0, meta=meta)
    ckpt.save(3, state(3, params_latest), meta=meta)
  with common.MetricWriter(workdir) as writer:
    writer.write_config(config)
  return str(workdir)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, models):
  tokenizer, tv, model, params = models
  root = tmp_path_factory.mktemp("runs")
  tok_dir = write_stage1(root / "aqvae", tv)
  later = jax.tree.map(lambda p: p * 0.5, params)
  t_dir = write_stage2(root / "student", params, later, tok_dir)
  return tok_dir, t_dir, later


def export_models(path, models, **kw):
  tokenizer, tv, model, params = models
  return E.export(
    path,
    tokenizer_fields=TOKENIZER,
    tokenizer_variables=tv,
    transformer_fields=MODEL,
    transformer_params={"params": params},
    image_size=IMAGE,
    **kw,
  )


# ------------------------------------------------------------------------------------------------
# Export → load


def test_export_round_trip(tmp_path, models, data, reference):
  tokenizer, tv, model, params = models
  path = export_models(tmp_path / "exp", models, meta={"norm": "fs_max", "run": "test"})
  assert path == str(tmp_path / "exp")
  # Staging folders are gone; only the export remains.
  assert sorted(os.listdir(tmp_path)) == ["exp"]

  ex = E.load_export(path)
  # The config-style fields rebuild the modules the training stage builds.
  assert ex.tokenizer == tokenizer and ex.transformer == model
  assert_trees_equal(ex.tokenizer_variables, tv)
  assert_trees_equal(ex.transformer_params, params)

  meta = ex.meta
  assert meta == E.read_meta(path)
  assert (meta["format"], meta["version"], meta["image_size"]) == (E.FORMAT, E.VERSION, IMAGE)
  assert meta["meta"] == {"norm": "fs_max", "run": "test"}
  assert meta["transformer"]["dtype"] == "float32"
  assert meta["transformer"]["enc_ch_mult"] == [1, 1, 2]
  assert meta["num_params"]["transformer"] == sum(p.size for p in jax.tree.leaves(params))
  d = meta["data"]
  assert d["mask_families"] == {name: i for i, name in enumerate(masks.FAMILIES)}
  assert d["accelerations"] == list(transforms.ACCELERATIONS) and d["input_acceleration"] == 32
  assert d["norm"] == "fs_max" and "ortho" in d["fft"]
  assert f"[B, {IMAGE}, {IMAGE}, 2]" in d["layout"]

  rec = E.load_reconstructor(path)
  np.testing.assert_array_equal(rec.reconstruct(*data), reference[0])
  x_hat, aux = rec.reconstruct(*data, return_intermediates=True)
  assert_trees_equal((x_hat, aux), reference[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fields_round_trip(models, dtype):
  tokenizer, _, model, _ = models
  for module in (
    tokenizer,
    model.clone(dtype=jnp.dtype(dtype)),
    aqvae.AQVAE(dtype=jnp.dtype(dtype)),
    T.NextAccelTransformer(context_levels=("mid", "32"), cross_inner_dim=48),
  ):
    stored = json.loads(json.dumps(F.to_json(module)))
    rebuilt = F.build(type(module), stored)
    assert rebuilt == module
    assert F.to_json(rebuilt) == stored
  assert F.to_json(model.clone(dtype=jnp.dtype(dtype)))["dtype"] == dtype
  with pytest.raises(ValueError, match="'depthh' is not a field of NextAccelTransformer"):
    F.build(T.NextAccelTransformer, {"depthh": 2})
  with pytest.raises(ValueError, match="vocab_size=99 disagrees with the tokenizer"):
    T.from_fields({**MODEL, "vocab_size": 99}, TOKENIZER)
  # The training stages build the same modules from their config sections.
  assert aqvae.from_fields(TOKENIZER, remat=False) == tokenizer
  assert T.from_fields(MODEL, TOKENIZER) == model


# ------------------------------------------------------------------------------------------------
# Training workdirs


def test_from_workdirs(tmp_path, workdirs, models, data, reference):
  tok_dir, t_dir, later = workdirs
  rec = E.load_reconstructor(t_dir)
  assert rec.tokenizer == models[0] and rec.transformer == models[2]
  x_hat, aux = rec.reconstruct(*data, return_intermediates=True)
  assert_trees_equal((x_hat, aux), reference[1])

  path = E.export_from_workdirs(tmp_path / "exp", transformer_from=t_dir)
  ex = E.load_export(path)
  src = ex.meta["meta"]
  # The transformer's best checkpoint; the tokenizer kept no best, so its newest periodic one.
  assert (src["transformer_checkpoint"], src["transformer_step"]) == ("best", 2)
  assert (src["tokenizer_checkpoint"], src["tokenizer_step"]) == ("latest", 7)
  assert src["tokenizer_from"] == tok_dir and src["transformer_from"] == t_dir
  assert ex.meta["data"]["norm"] == "fs_max" and ex.meta["data"]["builder_config"] == "smoke"
  np.testing.assert_array_equal(E.load_reconstructor(path).reconstruct(*data), reference[0])

  newest = E.load_workdirs(t_dir, tok_dir, best=False)
  assert newest.meta["meta"]["transformer_step"] == 3
  assert_trees_equal(newest.transformer_params, later)


def test_tokenizer_from_recorded_paths(tmp_path, workdirs, models):
  tok_dir, _, _ = workdirs
  params = models[3]
  # config.json keeps the path relative to the training job's cwd; the checkpoint meta has it
  # absolute, which is used when the relative one does not resolve from here.
  t_dir = write_stage2(tmp_path / "a", params, params, "no/such/aqvae", meta_tokenizer_from=tok_dir)
  ex = E.load_workdirs(t_dir)
  assert ex.meta["meta"]["tokenizer_from"] == tok_dir
  assert_trees_equal(ex.tokenizer_variables, models[1])

  gone = str(tmp_path / "gone")
  t_dir = write_stage2(tmp_path / "b", params, params, "no/such/aqvae", meta_tokenizer_from=gone)
  with pytest.raises(FileNotFoundError, match="tokenizer workdir not found.*no/such/aqvae"):
    E.load_workdirs(t_dir)
  # An explicit tokenizer_from wins over what the run recorded.
  assert E.load_workdirs(t_dir, tok_dir).meta["meta"]["tokenizer_from"] == tok_dir


# ------------------------------------------------------------------------------------------------
# Errors


def test_export_target_errors(tmp_path, models):
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=f"{taken} exists.*overwrite=True"):
    export_models(taken, models)
  # overwrite replaces exports only, never an arbitrary folder.
  with pytest.raises(FileExistsError, match="not a nextaccel_jax export"):
    export_models(taken, models, overwrite=True)
  assert (taken / "notes.txt").read_text() == "keep me"

  path = export_models(tmp_path / "exp", models, meta={"run": 1})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    export_models(path, models)
  export_models(path, models, meta={"run": 2}, overwrite=True)
  assert E.read_meta(path)["meta"] == {"run": 2}
  assert sorted(os.listdir(tmp_path)) == ["exp", "taken"]

  tokenizer, tv, model, params = models
  bad = jax.tree.map(lambda v: v, tv)
  bad["params"]["quant_conv"]["kernel"] = bad["params"]["quant_conv"]["kernel"][..., :4]
  with pytest.raises(ValueError, match="tokenizer_variables do not match.*quant_conv/kernel"):
    E.export(
      tmp_path / "bad",
      tokenizer_fields=TOKENIZER,
      tokenizer_variables=bad,
      transformer_fields=MODEL,
      transformer_params=params,
      image_size=IMAGE,
    )
  with pytest.raises(ValueError, match="meta must be JSON"):
    export_models(tmp_path / "bad", models, meta={"x": object()})
  assert not (tmp_path / "bad").exists()


def test_load_export_errors(tmp_path, models, workdirs):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    E.load_export(tmp_path / "missing")
  plain = tmp_path / "plain"
  plain.mkdir()
  (plain / "x.txt").write_text("")
  with pytest.raises(ValueError, match=f"{plain} is not a nextaccel_jax export"):
    E.load_export(plain)
  with pytest.raises(ValueError, match="training workdir"):
    E.load_export(workdirs[1])

  path = export_models(tmp_path / "exp", models)
  meta_file = os.path.join(path, "export", "metadata")
  record = json.loads(open(meta_file).read())
  record["version"] = 99
  with open(meta_file, "w") as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match="format version 99"):
    E.load_export(path)


def test_workdir_errors(tmp_path, workdirs):
  tok_dir, t_dir, _ = workdirs
  with pytest.raises(FileNotFoundError, match="transformer_from=.*missing: no such directory"):
    E.load_workdirs(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    E.load_workdirs(empty)
  with pytest.raises(FileNotFoundError, match="tokenizer_from=.*nope: no such directory"):
    E.load_reconstructor(t_dir, tmp_path / "nope")
  with pytest.raises(ValueError, match="stage 'aqvae' is the tokenizer"):
    E.load_workdirs(tok_dir)

  # A config that no longer matches the checkpoint: named by config field and parameter path.
  wider = tmp_path / "wider"
  shutil.copytree(t_dir, wider)
  config = json.loads((wider / "config.json").read_text())
  config["model"]["width"] = 32
  (wider / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"do not match config\.model.*has shape"):
    E.load_workdirs(wider)

  # A workdir without checkpoints.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(t_dir, "config.json"), bare / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    E.load_workdirs(bare, tok_dir)
  with pytest.raises(FileExistsError, match="overwrite"):
    E.export_from_workdirs(t_dir, transformer_from=t_dir)


def test_load_reconstructor_dispatches_on_config_json(monkeypatch, tmp_path):
  calls = []

  def load_workdirs(path, tokenizer_from=None, *, best=True):
    calls.append(("workdir", path, tokenizer_from, best))
    return E.Exported(None, None, None, None, {})

  def load_export(path):
    calls.append(("export", path))
    return E.Exported(None, None, None, None, {})

  monkeypatch.setattr(E, "load_workdirs", load_workdirs)
  monkeypatch.setattr(E, "load_export", load_export)
  monkeypatch.setattr(I, "Reconstructor", lambda *args: args)
  workdir, export = tmp_path / "student", tmp_path / "export"
  workdir.mkdir()
  export.mkdir()
  (workdir / "config.json").write_text("{}")
  E.load_reconstructor(str(workdir))
  E.load_reconstructor(str(workdir), "runs/aqvae", best=False)
  # Exports carry their tokenizer: an override is ignored.
  E.load_reconstructor(str(export), "ignored/for/exports")
  assert calls == [
    ("workdir", str(workdir), None, True),
    ("workdir", str(workdir), "runs/aqvae", False),
    ("export", str(export)),
  ]
  with pytest.raises(FileNotFoundError, match="nowhere: no such stage-2/3 workdir"):
    E.load_reconstructor(str(tmp_path / "nowhere"))
