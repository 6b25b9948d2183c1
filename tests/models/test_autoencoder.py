"""AQ-VAE encoder/decoder: VAR topology, parameter names, PyTorch parity, FiLM, remat, dtypes.

References: var_spec.md §1.2–1.4 (topology), §1.7 (names and conversion), §6.2 (FiLM).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nextaccel_jax.convert import var_vae
from nextaccel_jax.models import autoencoder as ae
from nextaccel_jax.models import layers

SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)
MID = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=8)
IMAGE = 32


def _random_torch_state(ref, size, seed):
  """VAR-style flat state dict (`encoder.*`, `decoder.*`) with random weights, as numpy."""
  import torch

  torch.manual_seed(seed)
  enc, dec = ref.Encoder(**size), ref.Decoder(**size)
  for model in (enc, dec):
    for module in model.modules():
      # Default GroupNorm affine params are 1 and 0, which would leave scale/bias untested.
      if isinstance(module, torch.nn.GroupNorm):
        torch.nn.init.uniform_(module.weight, 0.5, 1.5)
        torch.nn.init.normal_(module.bias, 0.0, 0.2)
    model.eval()
  state = {f"encoder.{k}": v.numpy() for k, v in enc.state_dict().items()}
  state.update({f"decoder.{k}": v.numpy() for k, v in dec.state_dict().items()})
  return enc, dec, state


def _labels(batch, seed):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.integers(0, 6, batch), jnp.int32),
    jnp.asarray(rng.integers(0, 4, batch), jnp.int32),
  )


def _fill(shapes, seed):
  """Concrete random parameters for a tree of ShapeDtypeStructs, drawn with numpy.

  Running `init` compiles every initializer; filling shapes from `eval_shape` keeps tests
  fast. FiLM starts at zero, as `init` leaves it (checked in `test_film_block_init`).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [k.key for k in path]
    if "film" in names:
      value = np.zeros(leaf.shape)
    elif names[-1] == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif names[-1] == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif names[-1] == "bias":
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:
      value = rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _init_encoder(model, image, batch=2, seed=0):
  x = jax.ShapeDtypeStruct((batch, image, image, 3), model.param_dtype)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return _fill(jax.eval_shape(model.init, jax.random.key(0), x, labels, labels)["params"], seed)


def _init_decoder(model, latent, z_channels, batch=2, seed=1):
  z = jax.ShapeDtypeStruct((batch, latent, latent, z_channels), model.param_dtype)
  return _fill(jax.eval_shape(model.init, jax.random.key(0), z)["params"], seed)


def _nchw(x_BHWC):
  return np.asarray(x_BHWC).transpose(0, 3, 1, 2)


def _set_film(params, value_fn):
  """Returns params with every FiLM Dense kernel/bias replaced by value_fn(path, leaf)."""
  flat = traverse_util.flatten_dict(params)
  out = {p: (value_fn(p, v) if "film" in p else v) for p, v in flat.items()}
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- sizes and names


def test_paper_size_parameter_counts_and_paths():
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  enc = jax.eval_shape(ae.Encoder(film=False).init, jax.random.key(0), x)["params"]
  z = jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32)
  dec = jax.eval_shape(ae.Decoder().init, jax.random.key(0), z)["params"]
  assert layers.count_params(enc) == 44_107_872
  assert layers.count_params(dec) == 64_653_923

  assert enc["conv_in"]["kernel"].shape == (3, 3, 3, 160)
  assert enc["down_0"]["block_1"]["conv1"]["kernel"].shape == (3, 3, 160, 160)
  assert enc["down_0"]["block_1"]["norm1"]["scale"].shape == (160,)
  assert enc["down_2"]["block_0"]["nin_shortcut"]["kernel"].shape == (1, 1, 160, 320)
  assert "nin_shortcut" not in enc["down_2"]["block_1"]
  assert enc["down_3"]["downsample"]["conv"]["kernel"].shape == (3, 3, 320, 320)
  assert "downsample" not in enc["down_4"]
  assert sorted(enc["down_4"]) == ["attn_0", "attn_1", "block_0", "block_1"]
  assert sorted(enc["down_3"]) == ["block_0", "block_1", "downsample"]
  assert enc["mid"]["attn_1"]["qkv"]["bias"].shape == (1920,)
  assert enc["mid"]["attn_1"]["proj_out"]["kernel"].shape == (1, 1, 640, 640)
  assert sorted(enc["mid"]) == ["attn_1", "block_1", "block_2"]
  assert enc["conv_out"]["kernel"].shape == (3, 3, 640, 32)

  assert dec["conv_in"]["kernel"].shape == (3, 3, 32, 640)
  assert sorted(dec["up_4"]) == ["attn_0", "attn_1", "attn_2", "block_0", "block_1", "block_2"] + [
    "upsample"
  ]
  assert dec["up_3"]["block_0"]["nin_shortcut"]["kernel"].shape == (1, 1, 640, 320)
  assert dec["up_1"]["block_0"]["conv1"]["kernel"].shape == (3, 3, 320, 160)
  assert dec["up_3"]["upsample"]["conv"]["kernel"].shape == (3, 3, 320, 320)
  assert "upsample" not in dec["up_0"]
  assert dec["conv_out"]["kernel"].shape == (3, 3, 160, 3)

  # FiLM adds the label embedding and one Dense(2·C_out) per encoder ResnetBlock (12 blocks).
  film = jax.eval_shape(ae.Encoder().init, jax.random.key(0), x, labels, labels)["params"]
  block_widths = [160] * 4 + [320] * 4 + [640] * 4
  expected_extra = (6 + 4) * 256 + sum(257 * 2 * c for c in block_widths)
  assert layers.count_params(film) - layers.count_params(enc) == expected_extra
  assert film["down_4"]["block_1"]["film"]["kernel"].shape == (256, 1280)
  assert film["mid"]["block_2"]["film"]["kernel"].shape == (256, 1280)
  assert film["label_embed"]["acc"]["embedding"].shape == (6, 256)
  assert film["label_embed"]["family"]["embedding"].shape == (4, 256)


def _flax_names_of(torch_state):
  """Flax path → expected shape for each torch key, by the renaming rules of §1.7."""
  names = {}
  for key, tensor in torch_state.items():
    *modules, leaf = re.sub(r"\.(\d+)", r"_\1", key).split(".")
    shape = tuple(tensor.shape)
    if leaf == "weight" and len(shape) == 4:
      leaf, shape = "kernel", (shape[2], shape[3], shape[1], shape[0])
    elif leaf == "weight":
      leaf = "scale"
    names[(*modules, leaf)] = shape
  return names


def test_reference_has_var_key_names_and_paper_counts(ref):
  import torch

  with torch.device("meta"):
    torch_enc, torch_dec = ref.Encoder(), ref.Decoder()
  assert sum(p.numel() for p in torch_enc.parameters()) == 44_107_872
  assert sum(p.numel() for p in torch_dec.parameters()) == 64_653_923
  keys = set(torch_enc.state_dict()) | {f"dec.{k}" for k in torch_dec.state_dict()}
  for key in (
    "conv_in.weight",
    "down.0.block.1.norm1.weight",
    "down.2.block.0.nin_shortcut.weight",
    "down.4.attn.0.qkv.weight",
    "mid.block_1.conv1.weight",
    "mid.attn_1.proj_out.bias",
    "dec.up.3.upsample.conv.weight",
    "dec.up.4.attn.2.qkv.bias",
  ):
    assert key in keys, key

  # Every paper-size Flax leaf is the renamed torch key with the converted shape, and back.
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  z = jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32)
  for torch_model, model, arg in (
    (torch_enc, ae.Encoder(film=False), x),
    (torch_dec, ae.Decoder(), z),
  ):
    shapes = jax.eval_shape(model.init, jax.random.key(0), arg)["params"]
    flax_names = {p: v.shape for p, v in traverse_util.flatten_dict(shapes).items()}
    assert flax_names == _flax_names_of(torch_model.state_dict())


@pytest.mark.parametrize(
  ("image", "ch_mult"), [(64, (1, 1, 2)), (128, (1, 1, 2, 2)), (256, (1, 1, 2, 2, 4))]
)
def test_presets_reach_a_16x16_latent(image, ch_mult):
  x = jax.ShapeDtypeStruct((2, image, image, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  enc = ae.Encoder(ch=32, ch_mult=ch_mult, z_channels=32)
  variables = jax.eval_shape(enc.init, jax.random.key(0), x, labels, labels)
  h, feats = jax.eval_shape(enc.apply, variables, x, labels, labels)
  assert h.shape == (2, 16, 16, 32)
  last = len(ch_mult) - 1
  for i, mult in enumerate(ch_mult):
    side = image // 2**i
    assert feats[f"down_{i}"].shape == (2, side, side, 32 * mult)
  assert feats["pre_mid"].shape == feats["mid"].shape == (2, 16, 16, 32 * ch_mult[last])

  dec = ae.Decoder(ch=32, ch_mult=ch_mult, z_channels=32)
  z = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)
  y, aux = jax.eval_shape(dec.apply, jax.eval_shape(dec.init, jax.random.key(0), z), z)
  assert y.shape == (2, image, image, 3)
  assert aux["up_0"].shape == (2, image, image, 32)


def test_narrow_presets_with_fewer_norm_groups():
  x = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  enc = ae.Encoder(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=16, norm_groups=8)
  variables = jax.eval_shape(enc.init, jax.random.key(0), x, labels, labels)
  h, _ = jax.eval_shape(enc.apply, variables, x, labels, labels)
  assert h.shape == (1, 16, 16, 16)
  with pytest.raises(ValueError, match="groups"):
    jax.eval_shape(ae.Encoder(ch=16, ch_mult=(1, 2)).init, jax.random.key(0), x, labels, labels)
  y = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
  gn = layers.GroupNorm(8)
  out = gn.apply(gn.init(jax.random.key(0), y), y)
  groups = np.asarray(out).reshape(2, 16, 8, 2)
  np.testing.assert_allclose(groups.mean(axis=(1, 3)), 0.0, atol=1e-5)


def test_model_input_convention():
  x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  x3 = ae.to_model_input(x)
  assert x3.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(x3[..., 2], 0.0)
  np.testing.assert_array_equal(ae.from_model_output(x3), x)


def test_group_norm_matches_flax_two_pass_group_norm():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 64)) * 3.0 + 1.5
  ours = layers.GroupNorm()
  theirs = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
  params = {
    "scale": jax.random.uniform(jax.random.key(1), (64,), minval=0.5, maxval=1.5),
    "bias": jax.random.normal(jax.random.key(2), (64,)),
  }
  assert jax.tree_util.tree_structure(jax.eval_shape(ours.init, jax.random.key(0), x)) == (
    jax.tree_util.tree_structure({"params": params})
  )
  y = jax.jit(ours.apply)({"params": params}, x)
  np.testing.assert_allclose(y, jax.jit(theirs.apply)({"params": params}, x), atol=2e-6)
  y16 = jax.eval_shape(
    layers.GroupNorm(dtype=jnp.bfloat16).apply, {"params": params}, x.astype(jnp.bfloat16)
  )
  assert y16.dtype == jnp.bfloat16


def test_film_block_init():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
  cond = jax.random.normal(jax.random.key(1), (2, 8))
  film_block = layers.ResnetBlock(64, film=True)
  params = jax.jit(film_block.init)(jax.random.key(2), x, cond)["params"]
  assert sorted(params) == ["conv1", "conv2", "film", "nin_shortcut", "norm1", "norm2"]
  assert params["film"]["kernel"].shape == (8, 128)
  np.testing.assert_array_equal(params["film"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["film"]["bias"], 0.0)
  y, aux = jax.jit(film_block.apply)({"params": params}, x, cond)
  plain = {k: v for k, v in params.items() if k != "film"}
  y_plain, _ = jax.jit(layers.ResnetBlock(64).apply)({"params": plain}, x)
  np.testing.assert_array_equal(y, y_plain)
  np.testing.assert_array_equal(aux["film_gamma"], 0.0)
  with pytest.raises(ValueError, match="cond_BD"):
    jax.eval_shape(film_block.apply, {"params": params}, x)

  # Zero-initialised FiLM still receives gradient, so training can move it off zero.
  loss = lambda p: jnp.sum(film_block.apply({"params": p}, x, cond)[0] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads["film"]["kernel"]).min()) > 0
  assert float(jnp.abs(grads["film"]["bias"]).min()) > 0


# ----------------------------------------------------------------------------- PyTorch parity


def _check_parity(ref, size, seed, dtype, atol):
  import torch

  torch_enc, torch_dec, state = _random_torch_state(ref, size, seed)
  rng = np.random.default_rng(seed)
  batch = 2
  latent = IMAGE // 2 ** (len(size["ch_mult"]) - 1)
  x = rng.uniform(-1, 1, (batch, IMAGE, IMAGE, 3))
  z = rng.normal(size=(batch, latent, latent, size["z_channels"]))
  acc, fam = _labels(batch, seed)
  tdtype = torch.float64 if dtype == jnp.float64 else torch.float32

  enc = ae.Encoder(**size, film=True, label_features=16, dtype=dtype, param_dtype=dtype)
  enc_params, used_enc = var_vae.params_from_torch(state, "encoder.", _init_encoder(enc, IMAGE))
  assert used_enc == {k for k in state if k.startswith("encoder.")}
  h, feats = jax.jit(enc.apply)({"params": enc_params}, jnp.asarray(x, dtype), acc, fam)
  with torch.no_grad():
    th, tfeats = torch_enc.to(tdtype).forward_with_features(torch.as_tensor(_nchw(x), dtype=tdtype))
  np.testing.assert_allclose(_nchw(h), th.numpy(), atol=atol, rtol=atol)
  assert set(feats) == set(tfeats)
  for name, value in tfeats.items():
    np.testing.assert_allclose(_nchw(feats[name]), value.numpy(), atol=atol, rtol=atol)

  dec = ae.Decoder(**size, dtype=dtype, param_dtype=dtype)
  dec_params, used_dec = var_vae.params_from_torch(
    state, "decoder.", _init_decoder(dec, latent, size["z_channels"])
  )
  assert used_dec == {k for k in state if k.startswith("decoder.")}
  y, _ = jax.jit(dec.apply)({"params": dec_params}, jnp.asarray(z, dtype))
  with torch.no_grad():
    ty = torch_dec.to(tdtype)(torch.as_tensor(_nchw(z), dtype=tdtype))
  np.testing.assert_allclose(_nchw(y), ty.numpy(), atol=atol, rtol=atol)


@pytest.mark.parity
@pytest.mark.parametrize("size", [SMALL, MID], ids=["small", "mid"])
def test_parity_with_torch_float32(ref, size):
  _check_parity(ref, size, seed=3, dtype=jnp.float32, atol=1e-4)


@pytest.mark.parity
def test_parity_with_torch_float64(ref):
  with jax.enable_x64(True):
    _check_parity(ref, SMALL, seed=4, dtype=jnp.float64, atol=1e-12)


@pytest.mark.parity
def test_converter_reports_unmapped_and_missing(ref):
  _, _, state = _random_torch_state(ref, SMALL, seed=5)
  enc = ae.Encoder(**SMALL, film=True, label_features=16)
  target = _init_encoder(enc, IMAGE)
  params, _ = var_vae.params_from_torch(state, "encoder.", target)
  # FiLM and the label embedding have no torch counterpart and keep their init.
  np.testing.assert_array_equal(params["down_1"]["block_0"]["film"]["kernel"], 0.0)
  np.testing.assert_array_equal(
    params["label_embed"]["acc"]["embedding"], target["label_embed"]["acc"]["embedding"]
  )
  np.testing.assert_array_equal(
    params["down_0"]["block_0"]["conv1"]["kernel"],
    state["encoder.down.0.block.0.conv1.weight"].transpose(2, 3, 1, 0),
  )

  with pytest.raises(KeyError, match="without a flax leaf"):
    var_vae.params_from_torch(
      {**state, "encoder.down.0.extra.weight": np.zeros(3)}, "encoder.", target
    )
  partial = {k: v for k, v in state.items() if k != "encoder.mid.attn_1.qkv.bias"}
  with pytest.raises(KeyError, match="mid/attn_1/qkv/bias"):
    var_vae.params_from_torch(partial, "encoder.", target)
  bad = {**state, "encoder.conv_in.bias": np.zeros(7, np.float32)}
  with pytest.raises(ValueError, match="conv_in.bias"):
    var_vae.params_from_torch(bad, "encoder.", target)


# ----------------------------------------------------------------------------- FiLM


@pytest.fixture(scope="module")
def small_film_encoder():
  enc = ae.Encoder(**SMALL, film=True, label_features=16)
  params = _init_encoder(enc, IMAGE)
  x = jax.random.uniform(jax.random.key(7), (4, IMAGE, IMAGE, 3), minval=-1, maxval=1)
  return enc, params, x, jax.jit(enc.apply)


def test_film_zero_init_is_label_independent(small_film_encoder):
  _, params, x, apply = small_film_encoder
  acc_a, fam_a = jnp.array([0, 1, 2, 3]), jnp.array([0, 1, 2, 3])
  acc_b, fam_b = jnp.array([5, 4, 3, 2]), jnp.array([3, 2, 1, 0])
  h_a, _ = apply({"params": params}, x, acc_a, fam_a)
  h_b, _ = apply({"params": params}, x, acc_b, fam_b)
  np.testing.assert_array_equal(h_a, h_b)


def test_film_nonzero_changes_output_and_labels_matter(small_film_encoder):
  enc, params, x, apply = small_film_encoder
  keys = iter(jax.random.split(jax.random.key(11), 64))
  film_params = _set_film(params, lambda p, v: 0.2 * jax.random.normal(next(keys), v.shape))
  acc, fam = jnp.array([0, 1, 2, 3]), jnp.array([0, 1, 2, 3])
  h_zero, _ = apply({"params": params}, x, acc, fam)
  h_film, _ = apply({"params": film_params}, x, acc, fam)
  assert float(jnp.abs(h_film - h_zero).max()) > 1e-2
  h_other_acc, _ = apply({"params": film_params}, x, jnp.array([5, 5, 5, 5]), fam)
  h_other_fam, _ = apply({"params": film_params}, x, acc, jnp.array([3, 3, 0, 3]))
  assert float(jnp.abs(h_other_acc - h_film).max()) > 1e-2
  # Samples 0..2 changed family and must change; sample 3 kept its labels, and batch items are
  # independent, so it must not.
  per_sample = jnp.abs(h_other_fam - h_film).max(axis=(1, 2, 3))
  assert float(per_sample[:3].min()) > 1e-2
  np.testing.assert_allclose(h_other_fam[3], h_film[3], atol=1e-6)

  with pytest.raises(ValueError, match="acc_B and family_B"):
    jax.eval_shape(enc.apply, {"params": params}, x)


# ----------------------------------------------------------------------------- remat and dtypes


@pytest.fixture(scope="module")
def small_decoder():
  dec = ae.Decoder(**SMALL)
  return dec, _init_decoder(dec, 16, SMALL["z_channels"]), jax.jit(dec.apply)


def test_remat_keeps_paths_outputs_and_gradients(small_film_encoder, small_decoder):
  enc, params, x, _ = small_film_encoder
  enc_remat = ae.Encoder(**SMALL, film=True, label_features=16, remat=True)
  remat_params = _init_encoder(enc_remat, IMAGE)
  assert jax.tree_util.tree_structure(remat_params) == jax.tree_util.tree_structure(params)
  keys = iter(jax.random.split(jax.random.key(12), 64))
  params = _set_film(params, lambda p, v: 0.1 * jax.random.normal(next(keys), v.shape))
  acc, fam = jnp.array([0, 1, 2, 3]), jnp.array([3, 2, 1, 0])

  def loss(model):
    return lambda p: jnp.mean(model.apply({"params": p}, x, acc, fam)[0] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss(enc)))(params)
  value_r, grads_r = jax.jit(jax.value_and_grad(loss(enc_remat)))(params)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for g_r, g in zip(
    jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads), strict=True
  ):
    np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)

  _, dec_params, dec_apply = small_decoder
  dec_remat = ae.Decoder(**SMALL, remat=True)
  assert jax.tree_util.tree_structure(_init_decoder(dec_remat, 16, SMALL["z_channels"])) == (
    jax.tree_util.tree_structure(dec_params)
  )
  z = jax.random.normal(jax.random.key(13), (4, 16, 16, SMALL["z_channels"]))
  y, _ = dec_apply({"params": dec_params}, z)
  y_r, _ = jax.jit(dec_remat.apply)({"params": dec_params}, z)
  np.testing.assert_allclose(y_r, y, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(small_film_encoder, small_decoder):
  _, params, x, apply = small_film_encoder
  acc, fam = jnp.array([0, 1, 2, 3]), jnp.array([3, 2, 1, 0])
  enc16 = ae.Encoder(**SMALL, film=True, label_features=16, dtype=jnp.bfloat16)
  h32, feats32 = apply({"params": params}, x, acc, fam)
  h16, feats16 = jax.jit(enc16.apply)({"params": params}, x, acc, fam)
  assert h16.dtype == feats16["mid"].dtype == jnp.bfloat16

  def rel(a, b):
    return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

  assert rel(h16, h32) < 5e-2
  assert rel(feats16["mid"], feats32["mid"]) < 5e-2

  _, dec_params, dec_apply = small_decoder
  dec16 = ae.Decoder(**SMALL, dtype=jnp.bfloat16)
  y32, _ = dec_apply({"params": dec_params}, h32)
  y16, _ = jax.jit(dec16.apply)({"params": dec_params}, h32)
  assert y16.dtype == jnp.bfloat16
  assert rel(y16, y32) < 5e-2
