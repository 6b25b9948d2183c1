"""The Table 4 ablation switches of the transformer: no cross-attention (no context parameters,
the context image unused) and flat tokens (every scale at 16², tokenised by the hierarchical
tokenizer), each through the teacher-forced pass and the KV-cached sampler; the defaults are
untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import transformer as transformer_config
from nextaccel_jax import inference as I
from nextaccel_jax import testing
from nextaccel_jax.models import aqvae
from nextaccel_jax.models import next_scale as NS
from nextaccel_jax.models import transformer as T
from nextaccel_jax.models.quantizer import PATCH_NUMS

TINY = testing.TINY_TRANSFORMER
IMAGE = testing.TINY_IMAGE  # 64² → 16² latent
B = 2
FLAT = (16,) * 6
# `tok` (the tiny tokenizer) and `fast_compile` come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _model(tok, **fields):
  return T.from_fields({**TINY, **fields}, tok[0])


def _shapes(model):
  return jax.eval_shape(lambda: T.init_params(model, jax.random.key(0), IMAGE))


def _random_params(model):
  """`testing.random_like` weights: unit-scale logits, so argmax is rarely a near-tie (VAR's
  init makes near-ties everywhere), and no initializer to compile."""
  return testing.random_like(_shapes(model), seed=1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  levels = rng.standard_normal((B, 6, IMAGE, IMAGE, 2)).astype(np.float32) * 0.3
  return {"levels": jnp.asarray(levels), "family": jnp.array([1, 3])}


def _paths(params) -> set[str]:
  return {"/".join(p) for p in traverse_util.flatten_dict(dict(params["params"]))}


# ------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_the_paper_model():
  assert T.NextAccelTransformer.cross_attention is True
  assert T.NextAccelTransformer.flat_tokens is False
  for preset in ("paper", "demo", "smoke"):
    fields = transformer_config.model_config(preset, "student")
    assert fields.cross_attention is True and fields.flat_tokens is False
    # The new config fields at their defaults build exactly the model built without them.
    legacy = {k: v for k, v in fields.items() if k not in ("cross_attention", "flat_tokens")}
    model = T.from_fields(fields, aqvae.AQVAE())
    assert model == T.from_fields(legacy, aqvae.AQVAE())
    assert model.patch_nums == PATCH_NUMS and model.seq_len == 990


# ------------------------------------------------------------------------------------------------
# w/o Cross-Attention


def test_no_cross_attention_has_no_context_parameters(tok, data):
  plain = _model(tok, cross_attention=False)
  base_paths = _paths(_shapes(_model(tok)))
  p_plain = _random_params(plain)
  paths = _paths(p_plain)
  assert not any(p.startswith("context_encoder/") or "/cross_attn/" in p for p in paths)
  # Exactly the context encoder and the cross-attention layers are gone.
  context = {p for p in base_paths if p.startswith("context_encoder/") or "/cross_attn/" in p}
  assert paths == base_paths - context and context
  with pytest.raises(ValueError, match="no context encoder"):
    NS.insert_context_encoder(p_plain, NS.context_encoder_params_from_aqvae(tok[1]))

  forward = jax.jit(plain.apply)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, 990, 8)), jnp.float32)
  ctx = data["levels"][:, 0]
  logits, aux = forward(p_plain, x, ctx, data["family"])
  assert logits.shape == (B, 990, 64) and aux["cond_BD"].shape == (B, 64)
  # The context image is not read at all.
  np.testing.assert_array_equal(logits, forward(p_plain, x, ctx * 0.0 + 3.0, data["family"])[0])
  # The mask family still conditions every position (adaLN).
  other = forward(p_plain, x, ctx, (data["family"] + 1) % 4)[0]
  assert np.abs(np.asarray(other - logits)).max(axis=(0, 2)).min() > 0
  prepared = plain.apply(p_plain, ctx, data["family"], method=T.NextAccelTransformer.prepare)
  assert prepared["cross_kv"] == (None,) * TINY["depth"]


# ------------------------------------------------------------------------------------------------
# w/o Token Hierarchy


def test_flat_tokens_layout_fields_and_tokenizer(tok, data):
  tokenizer, tv = tok
  model = _model(tok, flat_tokens=True)
  assert model.patch_nums == FLAT and model.seq_len == 1280
  assert T.context_encoder_fields(tokenizer, flat_tokens=True)["patch_nums"] == FLAT
  layout = T.sequence_layout(model.patch_nums)
  assert layout == tuple((256 * j, 256 * (j + 1)) for j in range(5))
  mask = T.block_causal_mask(model.patch_nums)
  for begin, end in layout:
    assert mask[begin:end, :end].all() and not mask[begin:end, end:].any()
  # Stored fields (an export's) rebuild it; hierarchical grids contradict the flag.
  assert T.from_fields({**TINY, "flat_tokens": True, "patch_nums": FLAT}, tokenizer) == model
  with pytest.raises(ValueError, match="patch_nums"):
    T.from_fields({**TINY, "flat_tokens": True, "patch_nums": PATCH_NUMS}, tokenizer)
  with pytest.raises(ValueError, match="flat_tokens"):
    model.clone(patch_nums=PATCH_NUMS).init(
      jax.random.key(0), jnp.zeros((1, 990, 8)), data["levels"][:1, 0], jnp.zeros((1,), int)
    )

  # The same trained tokenizer at the full grid: nothing but the grids changes.
  assert NS.tokenizer_at(tokenizer, PATCH_NUMS) is tokenizer
  flat_tok = NS.tokenizer_at(tokenizer, FLAT)
  assert flat_tok.patch_nums == FLAT and flat_tok.vocab_size == tokenizer.vocab_size
  with pytest.raises(ValueError, match="latent side"):
    NS.tokenizer_at(tokenizer, (8,) * 5 + (20,))

  @jax.jit
  def tokens(levels, family):
    batch = NS.teacher_forcing_batch(model, tokenizer, tv, levels, family)
    hier = NS.tokenize_levels(tokenizer, tv, levels, family)
    idx = batch["idx"]
    phi = [
      tokenizer.apply(
        tv,
        jnp.take(tv["vq_ema"]["quantize"]["embed"], idx[k], axis=0).reshape(B, 16, 16, -1),
        k,
        method=lambda m, h, k: m.quantize.phi(h, k),
      )
      for k in range(6)
    ]
    looked = NS.lookup_contributions(flat_tok, tv, idx)
    return batch, hier, phi, looked

  batch, hier, phi, looked = tokens(data["levels"], data["family"])
  assert [i.shape for i in batch["idx"]] == [(B, 256)] * 6
  assert batch["targets_BL"].shape == (B, 1280) and batch["inputs_BLZ"].shape == (B, 1280, 8)
  # QFS is on the 16² grid in both layouts, so its tokens are the hierarchical ones.
  np.testing.assert_array_equal(batch["idx"][-1], hier[-1])
  # Scale k's contribution is the hierarchical tokenizer's Phi conv of scale k (VAR's map) of
  # the codes, with no resize.
  for k in range(6):
    np.testing.assert_allclose(looked[k], phi[k], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# KV-cached sampling == teacher-forced argmax, for both ablations


@pytest.mark.parametrize("fields", [{"flat_tokens": True}, {"cross_attention": False}])
def test_cached_rollout_matches_teacher_forcing(tok, data, fields):
  tokenizer, tv = tok
  model = _model(tok, **fields)
  params = _random_params(model)
  x, family = data["levels"][:, 0], data["family"]

  @jax.jit
  def run(params, x, family):
    tok_m = NS.tokenizer_at(tokenizer, model.patch_nums)
    idx0 = NS.r32_tokens(tok_m, tv, x, family)
    idx, h, aux = I.rollout(model, params, tokenizer, tv, idx0, x, family, return_logits=True)
    inputs = NS.build_inputs(h[:-1], model.patch_nums, model.input_mode)
    full, _ = model.apply(params, inputs, x, family)
    return idx, aux["logits"], full

  idx, logits, full = run(params, x, family)
  assert [i.shape for i in idx] == [(B, pn * pn) for pn in model.patch_nums]
  cached = np.concatenate([np.asarray(lg) for lg in logits], axis=1)
  full = np.asarray(full)
  assert cached.shape == full.shape == (B, model.seq_len, 64)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
  ar = np.concatenate([np.asarray(i) for i in idx[1:]], axis=1)
  top2 = np.sort(full, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 1e-4
  np.testing.assert_array_equal(ar[decided], full.argmax(-1)[decided])
  assert decided.mean() > 0.99 and len(np.unique(ar)) > 4
