"""BiomedCLIP image tower: shapes, converter, preprocessing, freezing, parity with timm/open_clip.

The full-size parity test against `tests/fixtures/biomedclip_vit_b16.npz` needs numpy only; the
live tests rebuild the reference with timm / open_clip when they are installed.
"""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextaccel_jax.convert import checkpoints
from nextaccel_jax.models import biomedclip as bm
from nextaccel_jax.models.layers import count_params

ATOL = 5e-5


def _load_maker():
  path = Path(__file__).parents[1] / "fixtures" / "make_biomedclip_fixture.py"
  spec = importlib.util.spec_from_file_location("make_biomedclip_fixture", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


mk = _load_maker()
# Tiny models run a few times: cheap XLA compilation matters more than fast code.
_jit = functools.partial(
  jax.jit,
  compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
)

# A tiny tower (32² input, 8² patches → 17 tokens); shallow, because compile time grows with depth.
TINY_SIZES = dict(width=64, depth=4, mlp_dim=128, patch_size=8, image_size=32, proj_dim=16)
TINY = dict(TINY_SIZES, num_heads=4, feature_blocks=(1, 3))
TEXT_KEYS = {
  "text.proj.0.weight": np.ones((6, 4), np.float32),
  "text.transformer.embeddings.word_embeddings.weight": np.ones((3, 4), np.float32),
  "logit_scale": np.ones((), np.float32),
}


def _tiny_sd(prefix="visual.", seed=1):
  return mk.seeded_state_dict(seed, prefix=prefix, **TINY_SIZES)


@pytest.fixture(scope="module")
def tiny():
  params, report = bm.from_torch_state_dict(_tiny_sd(), **TINY)
  assert report["unfilled_leaves"] == [] and report["unused_torch_keys"] == []
  model = bm.BiomedCLIPVision(**TINY)
  return model, params, _jit(lambda p, x: model.apply({"params": p}, x))


def _images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, size, size, 3)), jnp.float32)


def test_tiny_shapes_and_aux(tiny):
  model, params, fwd = tiny
  emb, aux = fwd(params, _images())
  n = (32 // 8) ** 2 + 1
  assert emb.shape == (2, 16)
  assert set(aux) == {"embed", "block_1", "block_3", "pooled"}
  for key in ("embed", "block_1", "block_3"):
    assert aux[key].shape == (2, n, 64)
  assert aux["pooled"].shape == (2, 64)
  np.testing.assert_allclose(
    emb, aux["pooled"] @ params["head"]["proj"]["kernel"], atol=1e-5, rtol=1e-5
  )
  # Without the projection the embedding is the pooled CLS feature.
  pooled_model = bm.BiomedCLIPVision(**{**TINY, "proj_dim": None})
  p = {k: v for k, v in params.items() if k != "head"}
  y, _ = _jit(pooled_model.apply)({"params": p}, _images())
  np.testing.assert_allclose(y, aux["pooled"], atol=1e-5)
  with pytest.raises(ValueError, match="feature_blocks"):
    bm.BiomedCLIPVision(**{**TINY, "feature_blocks": (4,)}).apply({"params": params}, _images())


def test_default_feature_blocks_are_2_5_8_11():
  model = bm.BiomedCLIPVision(**{**TINY, "depth": 12, "feature_blocks": bm.FEATURE_BLOCKS})
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  (emb, aux), _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert emb.shape == (2, 16)
  assert {k: v.shape for k, v in aux.items() if k.startswith("block_")} == {
    f"block_{i}": (2, 17, 64) for i in (2, 5, 8, 11)
  }


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32(tiny):
  model, params, fwd = tiny
  x = _images(seed=3)
  ref, _ = fwd(params, x)
  model16 = bm.BiomedCLIPVision(**TINY, dtype=jnp.bfloat16)
  emb, aux = _jit(model16.apply)({"params": params}, x)
  assert aux["block_3"].dtype == jnp.bfloat16
  assert aux["pooled"].dtype == jnp.float32  # final LayerNorm is an fp32 island
  rel = float(jnp.linalg.norm(emb.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel < 5e-2
  shapes = jax.eval_shape(model16.init, jax.random.key(0), x)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_init_params_matches_converter_tree(tiny):
  _, params, _ = tiny
  shapes = jax.eval_shape(functools.partial(bm.init_params, **TINY), jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, params)
  assert count_params(params) == sum(int(np.prod(s)) for _, s in mk.vision_key_shapes(**TINY_SIZES))


# ------------------------------------------------------------------------------------------------
# Converter


def test_converter_open_clip_names_reports_text_keys_as_unused(tiny):
  _, params, _ = tiny
  sd = {**_tiny_sd("visual."), **TEXT_KEYS}
  out, report = bm.from_torch_state_dict(sd, **TINY)
  assert report["naming"] == "open_clip"
  assert report["unused_torch_keys"] == sorted(TEXT_KEYS)
  assert report["unexpected_unused"] == [] and report["unfilled_leaves"] == []
  jax.tree.map(np.testing.assert_array_equal, out, params)
  # Layouts: Linear transposed, patch conv (O, I, kh, kw) → (kh, kw, I, O), LayerNorm → scale.
  w = sd["visual.trunk.blocks.2.attn.qkv.weight"]
  np.testing.assert_array_equal(out["blocks_2"]["attn"]["qkv"]["kernel"], w.T)
  conv = sd["visual.trunk.patch_embed.proj.weight"]
  np.testing.assert_array_equal(out["patch_embed"]["proj"]["kernel"], conv.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(out["norm"]["scale"], sd["visual.trunk.norm.weight"])
  np.testing.assert_array_equal(out["head"]["proj"]["kernel"], sd["visual.head.proj.weight"].T)


def test_converter_timm_and_visual_tower_names(tiny):
  _, params, _ = tiny
  visual = _tiny_sd("")
  out, report = bm.from_torch_state_dict(visual, **TINY)
  assert report["naming"] == "open_clip_visual" and report["unused_torch_keys"] == []
  jax.tree.map(np.testing.assert_array_equal, out, params)

  timm_sd = {k.removeprefix("trunk."): v for k, v in visual.items() if k.startswith("trunk.")}
  timm_sd["head.weight"] = np.zeros((10, 64), np.float32)  # a stand-alone classifier
  timm_sd["head.bias"] = np.zeros((10,), np.float32)
  out, report = bm.from_torch_state_dict(timm_sd, **TINY)
  assert report["naming"] == "timm"
  assert report["unused_torch_keys"] == ["head.bias", "head.weight"]
  assert report["unexpected_unused"] == []
  # timm has no CLIP projection: the only leaf left at its init.
  assert report["unfilled_leaves"] == ["head/proj/kernel"]
  assert out["head"]["proj"]["kernel"].shape == (64, 16)
  np.testing.assert_array_equal(
    out["blocks_3"]["mlp"]["fc2"]["bias"], params["blocks_3"]["mlp"]["fc2"]["bias"]
  )


def test_converter_reports_missing_and_extra_keys_and_unwraps():
  sd = _tiny_sd("visual.")
  del sd["visual.trunk.blocks.3.mlp.fc1.bias"]
  sd["visual.trunk.fc_norm.weight"] = np.ones(64, np.float32)
  wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
  out, report = bm.from_torch_state_dict(wrapped, **TINY)
  assert report["unfilled_leaves"] == ["blocks_3/mlp/fc1/bias"]
  assert report["unexpected_unused"] == ["visual.trunk.fc_norm.weight"]
  np.testing.assert_array_equal(out["blocks_3"]["mlp"]["fc1"]["bias"], np.zeros(128))


def test_converter_wrong_shape_names_the_key():
  sd = _tiny_sd("visual.")
  sd["visual.trunk.blocks.2.attn.proj.weight"] = np.zeros((64, 32), np.float32)
  with pytest.raises(ValueError, match=r"visual\.trunk\.blocks\.2\.attn\.proj\.weight"):
    bm.from_torch_state_dict(sd, **TINY)
  with pytest.raises(ValueError, match="cls_token"):
    bm.from_torch_state_dict({"text.proj.0.weight": np.ones((2, 2))}, **TINY)


def test_converter_copies_arrays():
  sd = _tiny_sd("visual.")
  out, _ = bm.from_torch_state_dict(sd, **TINY)
  before = out["blocks_0"]["norm1"]["bias"].copy()
  sd["visual.trunk.blocks.0.norm1.bias"][:] = 123.0
  np.testing.assert_array_equal(out["blocks_0"]["norm1"]["bias"], before)


def test_weights_from_npz_and_torch_bin(tmp_path, tiny):
  _, params, _ = tiny
  sd = {**_tiny_sd("visual."), **TEXT_KEYS}
  np.savez(tmp_path / "tower.npz", **sd)
  out, report = bm.from_torch_state_dict(
    checkpoints.load_state_dict(tmp_path / "tower.npz"), **TINY
  )
  assert report["unused_torch_keys"] == sorted(TEXT_KEYS)
  jax.tree.map(np.testing.assert_array_equal, out, params)

  torch = pytest.importorskip("torch")
  path = tmp_path / bm.CHECKPOINT_NAME
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  out, report = bm.from_torch_state_dict(checkpoints.load_state_dict(path), **TINY)
  assert report["naming"] == "open_clip" and report["unfilled_leaves"] == []
  jax.tree.map(np.testing.assert_array_equal, out, params)


# ------------------------------------------------------------------------------------------------
# Preprocessing and freezing


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (256, 256), (96, 160)])
def test_preprocess_shape_range_and_gradient(hw):
  rng = np.random.default_rng(0)
  mag = jnp.asarray(rng.uniform(0.0, 2.0, (2, *hw)), jnp.float32)
  scale = jnp.array([2.0, 1.5])
  pre = jax.jit(bm.preprocess_magnitude)
  x = pre(mag, scale)
  assert x.shape == (2, 224, 224, 3) and x.dtype == jnp.float32
  mean, std = np.array(bm.CLIP_MEAN), np.array(bm.CLIP_STD)
  lo, hi = (0.0 - mean) / std, (1.0 - mean) / std
  assert np.all(np.asarray(x) >= lo - 1e-5) and np.all(np.asarray(x) <= hi + 1e-5)
  # Three copies of one grey image.
  x01 = np.asarray(x) * std + mean
  np.testing.assert_allclose(x01[..., 1], x01[..., 0], atol=1e-6)
  g = jax.grad(lambda m: jnp.sum(pre(m, scale) ** 2))(mag / 4)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_area_resize_rows_and_constant_image():
  for n_in, n_out in [(256, 224), (64, 224), (128, 224), (224, 224)]:
    a = bm.area_matrix(n_in, n_out)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)
  # 256 → 224: row 0 averages inputs [0, 2), row 1 inputs [1, 3).
  a = bm.area_matrix(256, 224)
  np.testing.assert_allclose(a[0, :3], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(a[1, :4], [0.0, 0.5, 0.5, 0.0])
  x = bm.preprocess_magnitude(jnp.full((1, 80, 80), 0.3), image_size=224)
  np.testing.assert_allclose(
    x[0, 5, 7], (0.3 - np.array(bm.CLIP_MEAN)) / np.array(bm.CLIP_STD), atol=1e-6
  )


def test_area_resize_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).uniform(size=(2, 96, 160)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(224, 224), mode="area")
  np.testing.assert_allclose(bm.resize_area(jnp.asarray(x), 224), ref[:, 0].numpy(), atol=1e-6)


def test_frozen_tower_gives_image_grads_only(tiny):
  model, params, _ = tiny
  mag = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 48, 48)), jnp.float32) * 0.9

  def loss(p, m):
    emb, aux = bm.apply_frozen(model, p, bm.preprocess_magnitude(m, image_size=32))
    return jnp.sum(emb**2) + jnp.mean(aux["block_1"] ** 2)

  g_params, g_mag = _jit(jax.grad(loss, argnums=(0, 1)))(params, mag)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_params))
  assert float(jnp.abs(g_mag).max()) > 0 and bool(jnp.all(jnp.isfinite(g_mag)))


# ------------------------------------------------------------------------------------------------
# Full-size parity (ViT-B/16 at 224², fp32)

_B16 = bm.BiomedCLIPVision()
_b16_forward = jax.jit(lambda p, x: _B16.apply({"params": p}, x))


@pytest.fixture(scope="module")
def b16_seeded():
  """The fixture's seeded weights (open_clip vision-tower names) and preprocessed input."""
  sd = mk.seeded_state_dict(mk.SEED)
  mag = mk.seeded_magnitude(mk.SEED)
  scale = mag.reshape(1, -1).max(axis=1)
  x = bm.preprocess_magnitude(jnp.asarray(mag), jnp.asarray(scale))
  return sd, scale, x


def _assert_close(name, got, ref, atol=ATOL):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))))
  assert err <= atol, f"{name}: max abs err {err:.3g} > {atol:.1g}"
  return err


def test_fixture_parity_vit_b16(b16_seeded):
  fx = np.load(mk.FIXTURE)
  sd, scale, x = b16_seeded
  np.testing.assert_allclose(
    mk.weight_sums(sd),
    fx["weight_sums"],
    rtol=1e-6,
    err_msg="numpy no longer draws the fixture's weights: regenerate the fixture",
  )
  np.testing.assert_allclose(scale, fx["magnitude_scale"], rtol=1e-7)
  full = {f"visual.{k}": v for k, v in sd.items()} | TEXT_KEYS
  params, report = bm.from_torch_state_dict(full)
  assert report["unfilled_leaves"] == [] and report["unexpected_unused"] == []
  assert report["unused_torch_keys"] == sorted(TEXT_KEYS)
  assert count_params(params) == 86_191_872

  _assert_close("preprocess", x[0, ..., 0], fx["preprocessed_ch0"], atol=1e-5)
  emb, aux = _b16_forward(params, x)
  for name in ["embed", *(f"block_{i}" for i in mk.BLOCKS)]:
    assert aux[name].shape == (1, 197, 768)
    got = mk.summarise(np.asarray(aux[name]))
    for part, value in got.items():
      _assert_close(f"{name}/{part}", value, fx[f"{name}__{part}"])
  _assert_close("pooled", aux["pooled"][0], fx["pooled"])
  _assert_close("embedding", emb[0], fx["embedding"])


def test_live_parity_timm_vit_b16(b16_seeded):
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  sd, _, x = b16_seeded
  # open_clip builds BiomedCLIP's trunk exactly like this (timm_pool="" keeps the CLS pool).
  ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
  trunk = {k.removeprefix("trunk."): torch.from_numpy(v) for k, v in sd.items() if "trunk." in k}
  ref.load_state_dict(trunk, strict=True)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    feats = ref.forward_intermediates(
      xt,
      indices=list(bm.FEATURE_BLOCKS),
      norm=False,
      output_fmt="NLC",
      intermediates_only=True,
      return_prefix_tokens=True,
    )
    pooled = ref(xt).numpy()
  # The converter reads the reference's own state dict (timm names), not our arrays.
  params, report = bm.from_torch_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
  assert report["naming"] == "timm" and report["unfilled_leaves"] == ["head/proj/kernel"]
  _, aux = _b16_forward(params, x)
  for i, (patch_tokens, prefix_tokens) in zip(bm.FEATURE_BLOCKS, feats, strict=True):
    expect = torch.cat([prefix_tokens, patch_tokens], dim=1).numpy()
    _assert_close(f"block_{i}", aux[f"block_{i}"], expect)
  _assert_close("pooled", aux["pooled"], pooled)


def test_live_parity_open_clip_vision_tower(b16_seeded):
  pytest.importorskip("open_clip")
  torch = pytest.importorskip("torch")
  from open_clip.model import CLIPVisionCfg, _build_vision_tower

  sd, _, x = b16_seeded
  cfg = CLIPVisionCfg(
    timm_model_name="vit_base_patch16_224",
    timm_model_pretrained=False,
    timm_pool="",
    timm_proj="linear",
    image_size=224,
  )
  tower = _build_vision_tower(512, cfg).eval()
  tower.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    expect = tower(xt).numpy()
  state = {f"visual.{k}": v.numpy() for k, v in tower.state_dict().items()}
  params, report = bm.from_torch_state_dict(state | TEXT_KEYS)
  assert report["naming"] == "open_clip" and report["unfilled_leaves"] == []
  assert report["unused_torch_keys"] == sorted(TEXT_KEYS)
  emb, _ = _b16_forward(params, x)
  _assert_close("embedding", emb, expect)
