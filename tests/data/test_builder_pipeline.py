"""Builder → loader round trips on tiny synthetic volumes (the `smoke` builder config)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from nextaccel_jax import sharding
from nextaccel_jax.data import (
  build,
  fastmri,
  masks,
  pipeline,
  synthetic,
  transforms,
)
from nextaccel_jax.data import fastmri_brain_multiscale as fbm
from nextaccel_jax.stages import data as data_stage

SMOKE = next(c for c in fbm.BUILDER_CONFIGS if c.name == "smoke")
N = SMOKE.crop


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = build.build("smoke", data_dir=data_dir)
  return builder, data_dir


@pytest.fixture(scope="module")
def sources(built):
  builder, _ = built
  return builder.as_data_source()


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


def test_splits_and_features(sources):
  counts = {k: len(v) for k, v in sources.items()}
  vols = SMOKE.synthetic_volumes
  assert counts == {s: vols[s] * SMOKE.synthetic_slices for s in ("train", "validation", "test")}
  tr, va = sources["train"][0], sources["validation"][0]
  assert tr["image"].shape == (N, N, 2) and tr["image"].dtype == np.float32
  assert tr["maps"].shape == (SMOKE.num_virtual_coils, N, N, 2)
  assert tr["levels"].shape == (0, 6, N, N, 2)
  assert va["levels"].shape == (4, 6, N, N, 2)
  assert va["mask_levels"].shape == (4, N, N) and va["mask_levels"].dtype == np.uint8
  for ex in (tr, va):
    acq = ex["acquisition"].decode()
    assert fastmri.CONTRAST_GROUPS[ex["contrast"]] == fastmri.contrast_group(acq)
    assert ex["file_name"].decode().startswith(f"file_brain_{acq}_999_")
    assert len(ex["patient_id"]) > 0
    # fs_max normalisation: the combined image peaks at magnitude 1, and the scale maps it back.
    mag = np.abs(transforms.channels_to_complex(ex["image"]))
    assert mag.max() == pytest.approx(1.0, abs=1e-5)
    assert ex["scale"] > 0
    assert 0.5 < ex["retained_energy"] <= 1.0 + 1e-6


def test_train_and_eval_patients_are_disjoint(sources):
  ids = {s: {sources[s][i]["patient_id"] for i in range(len(sources[s]))} for s in sources}
  assert not ids["train"] & ids["validation"]
  assert not ids["train"] & ids["test"]


def test_stored_levels_match_regenerated_eval_masks(sources):
  val = sources["validation"]
  for i in range(len(val)):
    ex = val[i]
    x = transforms.channels_to_complex(ex["image"])
    maps = transforms.channels_to_complex(ex["maps"])
    for fam in masks.FAMILIES:
      fid = masks.family_id(fam)
      m = masks.nested_masks(fam, (N, N), seed=masks.eval_seed(ex["file_name"].decode(), fam))
      m_MHW = np.stack([m[r] for r in transforms.ACCELERATIONS])
      np.testing.assert_array_equal(ex["mask_levels"][fid], masks.level_map(m))
      want = np.asarray(transforms.undersample_levels(x, maps, m_MHW))
      np.testing.assert_allclose(ex["levels"][fid], want, atol=2e-5)
      np.testing.assert_allclose(ex["levels"][fid][-1], ex["image"], atol=1e-6)


def test_eval_masks_shared_by_slices_of_a_volume(sources):
  val = sources["validation"]
  by_file = {}
  for i in range(len(val)):
    by_file.setdefault(val[i]["file_name"], []).append(val[i]["mask_levels"])
  for stack in by_file.values():
    for other in stack[1:]:
      np.testing.assert_array_equal(stack[0], other)


def test_eval_loader_round_trip(sources, mesh):
  val = sources["validation"]
  loader = pipeline.EvalLoader(val, global_batch_size=8, mesh=mesh)
  n_items = 4 * len(val)
  assert len(loader) == -(-n_items // 8)
  seen = 0
  for batch in loader:
    assert batch["levels"].shape == (8, 6, N, N, 2)
    assert batch["levels"].sharding == sharding.data_sharding(mesh)
    host = jax.tree.map(np.asarray, batch)
    for row in range(8):
      if not host["valid"][row]:
        continue
      fam = masks.FAMILIES[host["family"][row]]
      ex = val[int(host["record"][row])]
      np.testing.assert_array_equal(host["levels"][row], pipeline.stored_eval_levels(ex, fam))
      np.testing.assert_array_equal(host["acc_index"][row], np.arange(6))
      seen += 1
  assert seen == n_items
  # With maps, every row also carries its coil sensitivities (for data consistency).
  batch = next(iter(pipeline.EvalLoader(val, global_batch_size=8, mesh=mesh, with_maps=True)))
  host = jax.tree.map(np.asarray, batch)
  np.testing.assert_array_equal(host["maps"][0], val[int(host["record"][0])]["maps"])


def test_eval_loader_rejects_train_split(sources, mesh):
  loader = pipeline.EvalLoader(sources["train"], global_batch_size=8, mesh=mesh)
  with pytest.raises(ValueError, match="store_train_levels"):
    next(iter(loader))


def test_train_loader_batches(sources, mesh):
  train = sources["train"]
  loader = pipeline.TrainLoader(train, global_batch_size=8, mesh=mesh, seed=3)
  batch = next(loader)
  assert batch["levels"].shape == (8, 6, N, N, 2)
  assert batch["levels"].sharding == sharding.data_sharding(mesh)
  assert batch["family"].shape == (8,) and batch["acc_index"].shape == (8, 6)
  # What a stage compiles its train step for before reading any record.
  layout = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), t)
  assert layout(batch) == layout(pipeline.train_batch_spec(8, N, mesh))
  host = loader.host_batch(0)
  levels = np.asarray(batch["levels"])
  for row in range(8):
    lv = host["mask_levels"][row]
    m = masks.masks_from_level_map(lv)
    # Exact counts and strict nesting survive the uint8 level-map encoding.
    for k, r in enumerate(transforms.ACCELERATIONS):
      assert m[k].sum() == N * N // r
      if k:
        assert np.all(m[k - 1] <= m[k]) and m[k].sum() > m[k - 1].sum()
    x = transforms.channels_to_complex(host["image"][row])
    maps = transforms.channels_to_complex(host["maps"][row])
    want = transforms.undersample_levels_np(x, maps, m)
    np.testing.assert_allclose(levels[row], want, atol=2e-5)
  loader.close()


def test_train_loader_is_deterministic_and_resumable(sources, mesh):
  train = sources["train"]
  a = pipeline.TrainLoader(train, global_batch_size=8, mesh=mesh, seed=5)
  first = [jax.tree.map(np.asarray, next(a)) for _ in range(3)]
  b = pipeline.TrainLoader(train, global_batch_size=8, mesh=mesh, seed=5, start_step=2)
  resumed = jax.tree.map(np.asarray, next(b))
  for key in first[2]:
    np.testing.assert_array_equal(first[2][key], resumed[key])
  c = pipeline.TrainLoader(train, global_batch_size=8, mesh=mesh, seed=6)
  other = jax.tree.map(np.asarray, next(c))
  assert not np.array_equal(other["mask_levels"], first[0]["mask_levels"])
  for loader in (a, b, c):
    loader.close()


def test_train_loader_uses_every_family(sources, mesh):
  loader = pipeline.TrainLoader(
    sources["train"], global_batch_size=8, mesh=mesh, compute_levels=False
  )
  fams = np.concatenate([loader.host_batch(s)["family"] for s in range(8)])
  assert set(fams.tolist()) == {0, 1, 2, 3}
  batch = next(loader)
  assert "levels" not in batch and batch["image"].shape == (8, N, N, 2)
  loader.close()


def test_index_sampler_epochs_and_processes():
  s = pipeline.IndexSampler(num_records=10, global_batch_size=4, seed=1)
  stream = np.concatenate([s.indices(t) for t in range(5)])
  assert sorted(stream[:10].tolist()) == list(range(10))
  assert sorted(stream[10:20].tolist()) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:20])
  parts = [
    pipeline.IndexSampler(10, 4, seed=1, process_index=p, process_count=2).indices(3)
    for p in (0, 1)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), s.indices(3))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.IndexSampler(10, 3, process_count=2)


def test_rebuild_reuses_preprocessed_cache(tmp_path, monkeypatch):
  cfg = dataclasses.replace(
    SMOKE, name="smoke_cache", synthetic_volumes={"train": 1, "validation": 1}
  )
  build.build(cfg, data_dir=tmp_path)
  prepared = tmp_path / "fastmri_brain_multiscale" / "smoke_cache"
  import shutil

  shutil.rmtree(prepared)

  def fail(*args, **kwargs):
    raise AssertionError("volume preprocessed twice")

  monkeypatch.setattr(fbm, "preprocess_volume", fail)
  builder = build.build(cfg, data_dir=tmp_path)
  assert builder.info.splits["train"].num_examples == SMOKE.synthetic_slices


def test_real_source_skips_bad_and_narrow_volumes(tmp_path):
  root = tmp_path / "fastmri"
  for split, n in (("multicoil_train", 2), ("multicoil_val", 1)):
    synthetic.write_dataset(
      root / split, n, seed=len(split), num_slices=2, coils=(4, 4), geometry="tiny"
    )
  (root / "multicoil_train" / "file_brain_AXT2_999_9999999.h5").write_bytes(b"not an hdf5 file")
  narrow = synthetic.generate_volume(
    7, "AXFLAIR", num_slices=2, coils=(4, 4), geometry="tiny_narrow"
  )
  fastmri.write_volume(
    root / "multicoil_train" / "file_brain_AXFLAIR_999_8888888.h5",
    narrow.kspace_SCHW,
    acquisition="AXFLAIR",
    patient_id="narrow",
    header=narrow.header,
    reconstruction_rss=narrow.reconstruction_rss,
  )
  cfg = dataclasses.replace(SMOKE, name="real_smoke", source="fastmri", central_slices=1)
  builder = build.build(cfg, data_dir=tmp_path / "tfds", manual_dir=root)
  assert builder.info.splits["train"].num_examples == 2  # two good volumes, one central slice each
  assert builder.info.splits["validation"].num_examples == 1
  skipped = dict(builder.skipped)
  assert any("9999999" in p for p in skipped)
  assert any("8888888" in p for p in skipped)


def test_real_source_needs_manual_dir(tmp_path):
  with pytest.raises(ValueError, match="manual_dir"):
    build.build("fastmri", data_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown builder config"):
    build.build("nope", data_dir=tmp_path)


def test_load_split_errors(built, tmp_path):
  _, data_dir = built
  with pytest.raises(FileNotFoundError, match="not built"):
    pipeline.load_split("fastmri_brain_multiscale/demo", "train", tmp_path)
  with pytest.raises(ValueError, match="no split"):
    pipeline.load_split("fastmri_brain_multiscale/smoke", "nope", data_dir)


def test_data_stage_summary(built, tmp_path):
  _, data_dir = built
  from configs import data as data_config

  config = data_config.get_config("smoke")
  config.data.data_dir = str(data_dir)
  report = data_stage.run(config, tmp_path)
  saved = json.loads((tmp_path / "data_summary.json").read_text())
  assert saved["splits"]["train"]["slices"] == report["splits"]["train"]["slices"]
  table = report["zero_filled_validation"]
  assert set(table) == set(masks.FAMILIES)
  assert data_stage.is_monotone(table), data_stage.format_table(table)


def test_central_slices():
  np.testing.assert_array_equal(fbm.central_slice_indices(16, 10), np.arange(3, 13))
  np.testing.assert_array_equal(fbm.central_slice_indices(4, 10), np.arange(4))
  np.testing.assert_array_equal(fbm.central_slice_indices(5, None), np.arange(5))


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of 32"):
    dataclasses.replace(SMOKE, name="bad", crop=48)
  with pytest.raises(ValueError, match="norm"):
    dataclasses.replace(SMOKE, name="bad", norm="max")
