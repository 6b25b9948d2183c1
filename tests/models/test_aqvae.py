"""AQ-VAE: the stage-2 API and the VAR VQ-VAE converter against a PyTorch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextaccel_jax.convert import checkpoints, var_vae
from nextaccel_jax.models import aqvae, quantizer

SMALL = dict(
  ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=8, vocab_size=64, label_features=16
)
IMAGE = aqvae.min_image_size(SMALL["ch_mult"])  # 64² → 16² latent


@pytest.fixture(scope="module")
def model_and_vars():
  model = aqvae.AQVAE(**SMALL)
  variables = aqvae.init_variables(model, jax.random.key(0), IMAGE, batch=2)
  return model, variables


def _levels(seed, b=2):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((b, 6, IMAGE, IMAGE, 2)).astype(np.float32) * 0.3)


def test_collections_and_shapes(model_and_vars):
  model, variables = model_and_vars
  assert set(variables) == {"params", "vq_ema"}
  assert set(variables["vq_ema"]["quantize"]) == {"embed", "embed_avg", "cluster_size"}
  assert set(variables["params"]["quantize"]["quant_resi"]) == {f"qresi_ls_{j}" for j in range(4)}
  levels, family = _levels(0), jnp.array([0, 3])
  (x_hat, aux), new = model.apply(variables, levels, family, train=True, mutable=["vq_ema"])
  assert x_hat.shape == (2, IMAGE, IMAGE, 2)
  assert [i.shape for i in aux["idx"]] == [(2, p * p) for p in quantizer.PATCH_NUMS]
  assert aux["f_hat"].shape == (2, 16, 16, SMALL["z_channels"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new["vq_ema"], variables["vq_ema"])
  assert any(jax.tree.leaves(changed))


def test_stage2_api_reproduces_the_forward_pass(model_and_vars):
  model, variables = model_and_vars
  levels, family = _levels(1), jnp.array([1, 2])
  x_ref = model.apply(variables, levels, family, method=aqvae.AQVAE.reconstruct)
  f, feats = model.apply(variables, levels, family, method=aqvae.AQVAE.encode_levels)
  assert f.shape == (2, 6, 16, 16, SMALL["z_channels"])
  assert {"mid", "pre_mid", "down_0"} <= set(feats)
  idx = model.apply(variables, f, method=aqvae.AQVAE.tokenize)
  h = [model.apply(variables, i, k, method=aqvae.AQVAE.lookup) for k, i in enumerate(idx)]
  f_hat = model.apply(variables, h, jnp.ones((2, 6)), method=aqvae.AQVAE.combine)
  x = model.apply(variables, f_hat, method=aqvae.AQVAE.decode)
  # The rotation trick's forward value is the codeword, so lookup-based decoding equals the call.
  np.testing.assert_allclose(x, x_ref, atol=1e-4)
  # Only scale 0 active: the R = 32 tokens alone.
  r32 = jnp.zeros((2, 6)).at[:, 0].set(1.0)
  x_r32 = model.apply(variables, levels, family, r32, method=aqvae.AQVAE.reconstruct)
  h0 = model.apply(variables, h, r32, method=aqvae.AQVAE.combine)
  np.testing.assert_allclose(
    model.apply(variables, h0, method=aqvae.AQVAE.decode), x_r32, atol=1e-4
  )


def test_labels_condition_the_encoder(model_and_vars):
  model, variables = model_and_vars
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.05 if "film" in jax.tree_util.keystr(p) else x, variables["params"]
  )
  v = {"params": params, "vq_ema": variables["vq_ema"]}
  x = _levels(2)[:, 0]
  f_a, _ = model.apply(v, x, jnp.array([0, 0]), jnp.array([0, 0]), method=aqvae.AQVAE.encode)
  f_b, _ = model.apply(v, x, jnp.array([5, 0]), jnp.array([0, 1]), method=aqvae.AQVAE.encode)
  assert not np.allclose(f_a, f_b)


# ------------------------------------------------------------------------------------------------
# Converter


def _torch_vae(torch, ref):
  """VAR's VQVAE layout: encoder, quant_conv, quantize (embedding, Phi convs), decoder."""
  nn = torch.nn
  fields = dict(ch=SMALL["ch"], ch_mult=SMALL["ch_mult"], num_res_blocks=1, z_channels=8)
  vae = nn.Module()
  vae.encoder = ref.Encoder(**fields)
  vae.decoder = ref.Decoder(**fields)
  vae.quant_conv = nn.Conv2d(8, 8, 3, padding=1)
  vae.post_quant_conv = nn.Conv2d(8, 8, 3, padding=1)
  vae.quantize = nn.Module()
  vae.quantize.embedding = nn.Embedding(SMALL["vocab_size"], 8)
  vae.quantize.quant_resi = nn.Module()
  vae.quantize.quant_resi.qresi_ls = nn.ModuleList(
    [nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)]
  )
  vae.quantize.register_buffer("ema_vocab_hit_SV", torch.zeros(10, SMALL["vocab_size"]))
  with torch.no_grad():
    for p in vae.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return vae.eval()


def test_converter_matches_pytorch_reference(ref):
  import torch

  torch.manual_seed(0)
  vae = _torch_vae(torch, ref)
  sd = {k: v.detach().numpy() for k, v in vae.state_dict().items()}
  variables, report = var_vae.from_var_state_dict(sd, **SMALL)
  assert report["unused_torch_keys"] == []
  assert report["ignored_torch_keys"] == ["quantize.ema_vocab_hit_SV"]
  assert report["unexpected_unfilled"] == []
  assert report["unfilled_leaves"], "FiLM layers and the label embedding stay at their init"
  assert all("film" in p or "label_embed" in p for p in report["unfilled_leaves"])
  np.testing.assert_array_equal(
    variables["vq_ema"]["quantize"]["embed"], sd["quantize.embedding.weight"]
  )

  model = aqvae.AQVAE(**SMALL)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, IMAGE, IMAGE, 2)).astype(np.float32) * 0.5
  x3 = np.concatenate([x, np.zeros_like(x[..., :1])], -1).transpose(0, 3, 1, 2)
  with torch.no_grad():
    f_t = vae.quant_conv(vae.encoder(torch.from_numpy(x3))).numpy().transpose(0, 2, 3, 1)
  labels = jnp.array([0, 5]), jnp.array([2, 1])
  f, _ = model.apply(variables, jnp.asarray(x), *labels, method=aqvae.AQVAE.encode)
  np.testing.assert_allclose(f, f_t, atol=1e-4)

  with torch.no_grad():
    y_t = vae.decoder(vae.post_quant_conv(torch.from_numpy(f_t.transpose(0, 3, 1, 2))))
  y_t = y_t.numpy().transpose(0, 2, 3, 1)[..., :2]
  y = model.apply(variables, jnp.asarray(f_t), method=aqvae.AQVAE.decode)
  np.testing.assert_allclose(y, y_t, atol=1e-4)

  # Tokens of one scale and their contribution: area → nearest code → bicubic → Phi (VAR §2.3).
  import torch.nn.functional as F

  embed = torch.from_numpy(sd["quantize.embedding.weight"])
  f_nchw = torch.from_numpy(f_t.transpose(0, 3, 1, 2))
  for k, pn in enumerate(quantizer.PATCH_NUMS):
    z = F.interpolate(f_nchw, size=(pn, pn), mode="area") if pn != 16 else f_nchw
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    d = (z_flat**2).sum(1, keepdim=True) + (embed**2).sum(1) - 2 * z_flat @ embed.T
    idx_t = d.argmin(1).reshape(2, pn * pn).numpy()
    idx = model.apply(variables, jnp.asarray(f_t), k, method=aqvae.AQVAE.tokenize_scale)
    np.testing.assert_array_equal(idx, idx_t)
    with torch.no_grad():
      q = embed[torch.from_numpy(idx_t).reshape(-1)].reshape(2, pn, pn, 8).permute(0, 3, 1, 2)
      if pn != 16:
        q = F.interpolate(q, size=(16, 16), mode="bicubic", align_corners=False)
      conv = vae.quantize.quant_resi.qresi_ls[quantizer.phi_index(k)]
      h_t = (0.5 * q + 0.5 * conv(q)).numpy().transpose(0, 2, 3, 1)
    h = model.apply(variables, jnp.asarray(idx), k, method=aqvae.AQVAE.lookup)
    np.testing.assert_allclose(h, h_t, atol=1e-4)


def test_converter_rejects_wrong_codebook_shape():
  sd = {"quantize.embedding.weight": np.zeros((10, 8), np.float32)}
  with pytest.raises((ValueError, KeyError)):
    var_vae.from_var_state_dict(sd, **SMALL)


def test_convert_var_cli_writes_an_init_from_checkpoint(ref, tmp_path):
  import torch

  from nextaccel_jax import checkpointing

  torch.manual_seed(1)
  vae = _torch_vae(torch, ref)
  pth = tmp_path / "vae.pth"
  torch.save(vae.state_dict(), pth)
  out = tmp_path / "converted"
  report = var_vae.convert_file(pth, out, **SMALL)
  assert report["unused_torch_keys"] == [] and report["unexpected_unfilled"] == []
  tree = checkpointing.load_params(out)
  np.testing.assert_array_equal(
    tree["vq_ema"]["quantize"]["embed"], vae.quantize.embedding.weight.detach().numpy()
  )
  w = vae.encoder.conv_in.weight.detach().numpy()
  np.testing.assert_array_equal(
    tree["params"]["encoder"]["conv_in"]["kernel"], w.transpose(2, 3, 1, 0)
  )
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    checkpoints.load_state_dict(tmp_path / "missing.pth")
