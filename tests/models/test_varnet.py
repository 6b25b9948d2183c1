"""E2E-VarNet baseline: the ACS rule, shapes, single coil, the converter and PyTorch parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nextaccel_jax.convert import fastmri_baselines as fb
from nextaccel_jax.data import masks, transforms
from nextaccel_jax.models import fields, layers, varnet

# Parity size; the other tests use SMALL, which compiles faster.
TINY = dict(num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2)
SMALL = dict(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
# fp32 on CPU gives ~1e-6; the brief asks for 1e-4.
PARITY_RTOL = 1e-4

pytestmark = pytest.mark.usefixtures("fast_compile")
_windows = jax.jit(varnet.low_frequency_window)


@functools.cache
def _jitted(model):
  return jax.jit(model.apply, static_argnames="train")


def _torch_state_dict(params) -> dict[str, np.ndarray]:
  """The fastMRI state dict a Flax `params` tree converts from (the converter's inverse)."""
  out = {}
  for path, v in traverse_util.flatten_dict(params).items():
    v = np.asarray(v)
    out[fb.torch_key(path)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
  return out


def _column_masks(rng, batch: int, width: int, runs) -> np.ndarray:
  """fastMRI-style 1-D masks `[B, W]`: sampled runs `[c - left, c + right)` plus random columns
  outside them that never touch the run (so its length is known)."""
  c = width // 2
  m = np.zeros((batch, width), bool)
  for b, (left, right) in enumerate(runs):
    m[b] = rng.random(width) < 0.3
    m[b, c - left - 1] = m[b, c + right] = False
    m[b, c - left : c + right] = True
  return m


def _reference_window(mask_HW: np.ndarray) -> np.ndarray:
  """The ACS rule of `models.varnet` written out with loops (its module docstring)."""
  h, w = mask_HW.shape

  def candidates(n):
    c = n // 2
    out = [((c, c + 1), (c, c + 1))]
    for k in range(1, n // 2 + 1):
      p = (n - 2 * k + 1) // 2
      out.append(((c - k, c + k), (p, p + 2 * k)))
    return out + [((0, n), (0, n))]

  best, best_key = None, None
  for i, ((r0, r1), rows) in enumerate(candidates(h)):
    for j, ((c0, c1), cols) in enumerate(candidates(w)):
      if not mask_HW[r0:r1, c0:c1].all():
        continue
      hh, ww = r1 - r0, c1 - c0
      key = (hh * ww, hh + ww, -i, -j)
      if best_key is None or key > best_key:
        best, best_key = (rows, cols), key
  window = np.zeros((h, w), bool)
  if best is None:
    window[h // 2, w // 2] = True
  else:
    (r0, r1), (c0, c1) = best
    window[r0:r1, c0:c1] = True
  return window


def _box(shape, rows, cols) -> np.ndarray:
  out = np.zeros(shape, bool)
  out[rows[0] : rows[1], cols[0] : cols[1]] = True
  return out


def _window(mask_HW) -> np.ndarray:
  return np.asarray(_windows(jnp.asarray(mask_HW)[None])[0])


def test_acs_window_hand_cases():
  shape = (16, 16)
  box = _box(shape, (5, 11), (6, 10))
  scattered = box.copy()
  scattered[0, 0] = scattered[15, 3] = scattered[8, 1] = True
  np.testing.assert_array_equal(_window(scattered), box)

  columns = np.zeros(shape, bool)
  columns[:, [1, 6, 7, 8, 9, 13]] = True
  np.testing.assert_array_equal(_window(columns), _box(shape, (0, 16), (6, 10)))
  np.testing.assert_array_equal(_window(columns.T), _box(shape, (6, 10), (0, 16)))
  np.testing.assert_array_equal(_window(np.ones(shape, bool)), np.ones(shape, bool))
  # Not even DC sampled: the DC point (all zeros in the masked k-space anyway).
  np.testing.assert_array_equal(_window(~box), _box(shape, (8, 9), (8, 9)))
  # Odd width: runs of 2 left and 3 right of c = 7 give n = 4, placed at (15 - 4 + 1) // 2 = 6.
  odd = np.zeros((16, 15), bool)
  odd[:, 5:10] = True
  np.testing.assert_array_equal(_window(odd), _box((16, 15), (0, 16), (6, 10)))


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_acs_window_matches_the_written_rule_on_project_masks(family):
  nested = masks.nested_masks(family, (64, 64), seed=3)
  stack = np.stack([nested[r] for r in (32, 8, 2)])
  got = np.asarray(_windows(jnp.asarray(stack)))
  for m, g in zip(stack, got, strict=True):
    want = _reference_window(m)
    np.testing.assert_array_equal(g, want)
    assert m[want].all(), "an even-sized window is fully sampled"
  if family == "cartesian_y":
    assert got.all(axis=1).any(axis=1).all(), "a column mask keeps whole columns"


def test_acs_window_on_column_masks_follows_fastmri_rule():
  rng = np.random.default_rng(0)
  for width in (36, 35):
    m = _column_masks(rng, 4, width, [(4, 4), (3, 5), (6, 2), (0, 3)])
    got = np.asarray(_windows(jnp.asarray(np.broadcast_to(m[:, None], (4, 8, width)))))
    for b, (left, right) in enumerate([(4, 4), (3, 5), (6, 2), (0, 3)]):
      n = max(2 * min(left, right), 1)
      pad = (width - n + 1) // 2
      np.testing.assert_array_equal(got[b], _box((8, width), (0, 8), (pad, pad + n)))


def test_fft_helpers_equal_the_package_transforms():
  x = jax.random.normal(jax.random.key(0), (2, 3, 17, 14, 2))
  xc = varnet.to_complex(x)
  np.testing.assert_allclose(varnet.fft2c(xc), transforms.fft2c(xc), rtol=0, atol=1e-6)
  np.testing.assert_allclose(varnet.ifft2c(xc), transforms.ifft2c(xc), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(varnet.to_channels(xc), x)


@pytest.fixture(scope="module")
def small():
  model = varnet.VarNet(**SMALL)
  return model, varnet.init_params(model, jax.random.key(0), coils=3, shape=(16, 16))


def _kspace(shape, mask_HW, seed=1):
  k = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return k * mask_HW[..., None]


def test_multicoil_shapes_odd_size_and_normalised_maps(small):
  model, params = small
  h, w = 21, 19
  mask = np.zeros((h, w), bool)
  mask[:, ::3] = True
  mask[:, 7:12] = True
  k = _kspace((2, 3, h, w, 2), mask)
  y, aux = _jitted(model)({"params": params}, k, mask)
  assert y.shape == (2, h, w) and y.dtype == jnp.float32
  assert aux["kspace"].shape == aux["sens_maps"].shape == (2, 3, h, w, 2)
  assert aux["image"].shape == (2, h, w, 2) and aux["acs_window"].shape == (2, h, w)
  assert bool(jnp.all(jnp.isfinite(y)))
  np.testing.assert_allclose(jnp.sum(jnp.square(aux["sens_maps"]), axis=(1, 4)), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match=r"\[H, W\] or \[B, H, W\]"):
    model.apply({"params": params}, k, mask[:, :5])


def test_param_paths_mirror_fastmri_keys(small):
  _, params = small
  keys = set(_torch_state_dict(params))
  assert "cascades.0.dc_weight" in keys
  assert "sens_net.norm_unet.unet.down_sample_layers.0.layers.0.weight" in keys
  assert "sens_net.norm_unet.unet.up_transpose_conv.0.layers.0.weight" in keys
  assert "cascades.0.model.unet.up_conv.0.1.bias" in keys
  assert params["cascades_0"]["dc_weight"].shape == (1,)


def test_single_coil_variant():
  model = varnet.VarNet(**SMALL, estimate_sens=False)
  params = varnet.init_params(model, jax.random.key(0), coils=1, shape=(16, 16))
  assert "sens_net" not in params
  mask = np.zeros((16, 16), bool)
  mask[:, 6:10] = mask[:, ::4] = True
  k = _kspace((2, 1, 16, 16, 2), mask)
  y, aux = _jitted(model)({"params": params}, k, mask)
  assert y.shape == (2, 16, 16)
  np.testing.assert_array_equal(aux["sens_maps"][..., 0], 1.0)
  np.testing.assert_array_equal(aux["sens_maps"][..., 1], 0.0)
  # One coil with maps 1: the RSS image is the magnitude of the combined image.
  np.testing.assert_allclose(y, jnp.linalg.norm(aux["image"], axis=-1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="single-coil variant; got 3 coils"):
    model.apply({"params": params}, np.zeros((1, 3, 16, 16, 2), np.float32), mask)


def test_bfloat16_unets_keep_complex64_consistency():
  model = varnet.VarNet(**SMALL, dtype=jnp.bfloat16)
  params = varnet.init_params(model, jax.random.key(0), coils=2, shape=(16, 16))
  mask = np.ones((16, 16), bool)
  y, aux = _jitted(model)({"params": params}, _kspace((1, 2, 16, 16, 2), mask), mask)
  assert y.dtype == aux["kspace"].dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_from_fields_round_trips_json():
  model = varnet.from_fields({**varnet.PAPER, "dtype": "bfloat16"}, "config.model")
  assert model == varnet.VarNet(**varnet.PAPER, dtype=jnp.bfloat16)
  assert varnet.from_fields(fields.to_json(model)) == model


def test_converter_round_trips_and_names_missing_keys(small):
  _, params = small
  sd = _torch_state_dict(params)
  model, variables = fb.varnet_from_state_dict({f"varnet.{k}": v for k, v in sd.items()})
  assert model == varnet.VarNet(**SMALL)
  jax.tree.map(np.testing.assert_array_equal, variables["params"], params)
  without = {k: v for k, v in sd.items() if k != "cascades.0.dc_weight"}
  with pytest.raises(
    KeyError, match=r"v.pt: model parameters missing .*cascades.0.dc_weight \(1,\)"
  ):
    fb.varnet_from_state_dict(without, where="v.pt")
  bad = {**sd, "cascades.0.dc_weight": np.ones(2, np.float32)}
  with pytest.raises(ValueError, match=r"cascades.0.dc_weight has shape \(2,\), .*expects \(1,\)"):
    fb.varnet_from_state_dict(bad)
  single = {k: v for k, v in sd.items() if not k.startswith("sens_net.")}
  assert fb.varnet_fields(single) == dict(num_cascades=1, chans=2, pools=1, estimate_sens=False)
  with pytest.raises(KeyError, match="no cascades"):
    fb.varnet_from_state_dict({"unet.x": np.zeros(1)})


# PyTorch parity: fastMRI's own modules at random weights, eval mode, fp32.


def _fastmri():
  torch = pytest.importorskip("torch")
  fastmri = pytest.importorskip("fastmri")
  pytest.importorskip("fastmri.models")
  return torch, fastmri


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parity
def test_fft_helpers_match_fastmri():
  torch, fastmri = _fastmri()
  x = np.random.default_rng(0).standard_normal((2, 3, 17, 14, 2)).astype(np.float32)
  for ours, theirs in ((varnet.fft2c, fastmri.fft2c), (varnet.ifft2c, fastmri.ifft2c)):
    want = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(varnet.to_channels(ours(varnet.to_complex(x))), want, atol=1e-6)


@pytest.mark.parity
def test_acs_window_matches_fastmri_on_column_masks():
  torch, _ = _fastmri()
  from fastmri.models import SensitivityModel

  sens = SensitivityModel(chans=4, num_pools=2)
  rng = np.random.default_rng(1)
  for width in (36, 35, 64):
    runs = [(int(a), int(b)) for a, b in rng.integers(0, width // 2 - 2, (8, 2))]
    m = _column_masks(rng, len(runs), width, runs)
    pad, n = sens.get_pad_and_num_low_freqs(torch.from_numpy(m[:, None, None, :, None]))
    got = np.asarray(_windows(jnp.asarray(m[:, None, :])))[:, 0]
    for b in range(len(runs)):
      want = np.zeros(width, bool)
      want[int(pad[b]) : int(pad[b] + n[b])] = True
      np.testing.assert_array_equal(got[b], want)


@pytest.mark.parity
def test_paper_size_param_count_matches_fastmri():
  _fastmri()
  from fastmri.models import VarNet

  ref = VarNet(**varnet.PAPER)
  model = varnet.VarNet(**varnet.PAPER)
  k, mask = jnp.zeros((1, 5, 32, 32, 2)), jnp.ones((32, 32), bool)
  shapes = jax.eval_shape(model.init, jax.random.key(0), k, mask)
  assert layers.count_params(shapes) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parity
@pytest.mark.parametrize("hw", [(40, 36), (33, 35)])
def test_matches_fastmri_varnet_on_column_masks(hw):
  torch, _ = _fastmri()
  from fastmri.models import VarNet

  torch.manual_seed(0)
  ref = VarNet(**TINY).eval()
  model, variables = fb.varnet_from_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
  h, w = hw
  m = _column_masks(np.random.default_rng(2), 2, w, [(4, 4), (3, 5)])
  k = _kspace((2, 3, h, w, 2), m[:, None, None, :], seed=3)
  with torch.no_grad():
    want = ref(torch.from_numpy(k), torch.from_numpy(m[:, None, None, :, None])).numpy()
  got, _ = _jitted(model)(variables, k, np.broadcast_to(m[:, None], (2, h, w)))
  assert _rel_err(got, want) <= PARITY_RTOL


@pytest.mark.parity
def test_matches_fastmri_varnet_with_a_2d_mask_and_its_hand_window():
  """fastMRI cannot read an ACS region off a 2-D mask: its sensitivity net gets the k-space
  already cut to the hand-computed box (`mask_center=False`), its cascades the 2-D mask."""
  torch, fastmri = _fastmri()
  from fastmri.models import VarNet

  h, w = 40, 36
  rng = np.random.default_rng(4)
  mask = rng.random((h, w)) < 0.25
  box = _box((h, w), (20 - 3, 20 + 3), (18 - 4, 18 + 4))
  mask[box] = True
  mask[20 - 4, 18 - 5 : 18 + 5] = False  # rows 16 and 23, columns 13 and 22 stop the box
  mask[20 + 3, 18 - 5 : 18 + 5] = False
  mask[20 - 4 : 20 + 4, 18 - 5] = mask[20 - 4 : 20 + 4, 18 + 4] = False
  np.testing.assert_array_equal(_window(mask), box)

  torch.manual_seed(0)
  ref = VarNet(**TINY, mask_center=False).eval()
  model, variables = fb.varnet_from_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
  k = _kspace((2, 3, h, w, 2), mask, seed=5)
  mask_t = torch.from_numpy(np.broadcast_to(mask[None, None, :, :, None], (2, 1, h, w, 1)).copy())
  with torch.no_grad():
    k_t = torch.from_numpy(k)
    sens = ref.sens_net(k_t * torch.from_numpy(box[..., None]), mask_t)
    pred = k_t.clone()
    for cascade in ref.cascades:
      pred = cascade(pred, k_t, mask_t, sens)
    want = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(pred)), dim=1).numpy()
  # Broadcast to [B, H, W]: the same call as the column-mask test at this size, compiled once.
  got, aux = _jitted(model)(variables, k, np.broadcast_to(mask, (2, h, w)))
  np.testing.assert_array_equal(aux["acs_window"][0], box)
  assert _rel_err(got, want) <= PARITY_RTOL
