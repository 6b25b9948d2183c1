"""fastMRI U-Net baseline: shapes, odd sizes, dropout, fields, the converter and PyTorch parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nextaccel_jax.convert import fastmri_baselines as fb
from nextaccel_jax.models import fields, layers, unet

SMALL = dict(in_chans=2, out_chans=1, chans=4, num_pool_layers=2)
# fp32 on CPU gives ~1e-6; the brief asks for 1e-4.
PARITY_RTOL = 1e-4

pytestmark = pytest.mark.usefixtures("fast_compile")


def _apply(model, params, x, train=False, rngs=None):
  return jax.jit(model.apply, static_argnames="train")(
    {"params": params}, x, train=train, rngs=rngs
  )


def _torch_state_dict(params) -> dict[str, np.ndarray]:
  """The fastMRI state dict a Flax `params` tree converts from (the converter's inverse)."""
  out = {}
  for path, v in traverse_util.flatten_dict(params).items():
    v = np.asarray(v)
    out[fb.torch_key(path)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
  return out


@pytest.fixture(scope="module")
def small():
  model = unet.Unet(**SMALL)
  return model, unet.init_params(model, jax.random.key(0), (16, 16))


@pytest.mark.parametrize("hw", [(16, 16), (19, 13)])
def test_output_shape_and_dtype_any_parity(small, hw):
  model, params = small
  x = jax.random.normal(jax.random.key(1), (2, *hw, 2))
  y, aux = _apply(model, params, x)
  assert y.shape == (2, *hw, 1) and y.dtype == jnp.float32 and aux == {}
  assert bool(jnp.all(jnp.isfinite(y)))


def test_param_paths_mirror_fastmri_keys(small):
  _, params = small
  keys = set(_torch_state_dict(params))
  expected = {f"down_sample_layers.{i}.layers.{j}.weight" for i in (0, 1) for j in (0, 4)}
  expected |= {f"conv.layers.{j}.weight" for j in (0, 4)}
  expected |= {f"up_transpose_conv.{i}.layers.0.weight" for i in (0, 1)}
  expected |= {"up_conv.0.layers.0.weight", "up_conv.0.layers.4.weight"}
  expected |= {"up_conv.1.0.layers.0.weight", "up_conv.1.0.layers.4.weight"}
  expected |= {"up_conv.1.1.weight", "up_conv.1.1.bias"}
  assert keys == expected
  # Transposed-conv kernels are (kh, kw, out, in): the torch weight (in, out, kh, kw) transposed.
  assert params["up_transpose_conv_0"]["layers_0"]["kernel"].shape == (2, 2, 8, 16)


def test_bfloat16_compute_keeps_fp32_params():
  model = unet.Unet(**SMALL, dtype=jnp.bfloat16)
  params = unet.init_params(model, jax.random.key(0), (16, 16))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  y, _ = _apply(model, params, jnp.ones((1, 16, 16, 2)))
  assert y.dtype == jnp.bfloat16


def test_dropout_only_in_training():
  model = unet.Unet(**SMALL, drop_prob=0.5)
  params = unet.init_params(model, jax.random.key(0), (16, 16))
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 2))
  eval_a, _ = _apply(model, params, x)
  eval_b, _ = _apply(model, params, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train, _ = _apply(model, params, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train, eval_a)


def test_rejects_wrong_channels_and_too_small_images(small):
  model, params = small
  with pytest.raises(ValueError, match="expects 2 input channels"):
    model.apply({"params": params}, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="needs H, W >= 4"):
    model.apply({"params": params}, jnp.zeros((1, 3, 16, 2)))


def test_from_fields_round_trips_json():
  model = unet.from_fields({**unet.PAPER, "dtype": "bfloat16"}, "config.model")
  assert model == unet.Unet(**unet.PAPER, dtype=jnp.bfloat16)
  assert unet.from_fields(fields.to_json(model)) == model
  with pytest.raises(ValueError, match="config.model: 'pools' is not a field of Unet"):
    unet.from_fields({"pools": 4}, "config.model")


def test_to_magnitude():
  y = jnp.array([[[[3.0, 4.0]]]])
  np.testing.assert_allclose(unet.to_magnitude(y), [[[5.0]]])
  np.testing.assert_array_equal(unet.to_magnitude(y[..., :1]), [[[3.0]]])
  with pytest.raises(ValueError, match="1 or 2 channels"):
    unet.to_magnitude(jnp.zeros((1, 2, 2, 3)))


def test_converter_round_trips_and_reads_sizes(small):
  _, params = small
  sd = _torch_state_dict(params)
  model, variables = fb.unet_from_state_dict({f"unet.{k}": v for k, v in sd.items()})
  assert model == unet.Unet(**SMALL)
  jax.tree.map(np.testing.assert_array_equal, variables["params"], params)


def test_converter_names_missing_unexpected_and_misshapen_keys(small):
  _, params = small
  sd = _torch_state_dict(params)
  missing = {k: v for k, v in sd.items() if k != "up_conv.1.1.bias"}
  with pytest.raises(KeyError, match=r"missing from the checkpoint: \['up_conv.1.1.bias \(1,\)"):
    fb.unet_from_state_dict(missing, where="u.pt")
  extra = {**sd, "up_conv.1.2.weight": np.zeros((1, 4, 1, 1))}
  with pytest.raises(KeyError, match=r"u.pt: torch keys .*: \['up_conv.1.2.weight'\]"):
    fb.unet_from_state_dict(extra, where="u.pt")
  bad = {**sd, "conv.layers.4.weight": np.zeros((16, 16, 3, 1))}
  with pytest.raises(
    ValueError,
    match=r"conv.layers.4.weight has shape \(16, 16, 3, 1\), the model expects \(16, 16, 3, 3\)",
  ):
    fb.unet_from_state_dict(bad)
  with pytest.raises(KeyError, match="no down_sample_layers"):
    fb.unet_from_state_dict({"x.weight": np.zeros(1)})


def test_convert_file_writes_an_orbax_checkpoint(small, tmp_path):
  from nextaccel_jax import checkpointing

  _, params = small
  np.savez(tmp_path / "unet.npz", **_torch_state_dict(params))
  summary = fb.convert_file("unet", tmp_path / "unet.npz", tmp_path / "out")
  assert summary["model"]["chans"] == 4 and summary["num_params"] == layers.count_params(params)
  tree = checkpointing.load_params(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, tree["params"], params)
  with pytest.raises(ValueError, match="kind='vit'"):
    fb.convert_file("vit", tmp_path / "unet.npz", tmp_path / "out2")


@pytest.mark.parity
def test_paper_size_param_count_matches_fastmri():
  torch = pytest.importorskip("torch")
  fastmri_models = pytest.importorskip("fastmri.models")
  del torch
  ref = fastmri_models.Unet(2, 1, chans=32, num_pool_layers=4)
  model = unet.Unet(**unet.PAPER)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 2)))
  assert layers.count_params(shapes) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parity
@pytest.mark.parametrize("hw,out_chans", [((32, 32), 1), ((37, 45), 2)])
def test_matches_fastmri_unet(hw, out_chans):
  torch = pytest.importorskip("torch")
  fastmri_models = pytest.importorskip("fastmri.models")
  torch.manual_seed(0)
  ref = fastmri_models.Unet(2, out_chans, chans=4, num_pool_layers=3, drop_prob=0.1).eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model, variables = fb.unet_from_state_dict(sd, drop_prob=0.1)
  x = np.random.default_rng(0).standard_normal((2, *hw, 2)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got, _ = _apply(model, variables["params"], x)
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert err <= PARITY_RTOL
