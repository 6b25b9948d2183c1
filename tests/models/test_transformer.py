"""Next-acceleration-scale transformer: sequence/mask tables, block causality, init, roles,
prefix randomisation, context encoder from stage 1, and the paper-size parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nextaccel_jax import optim, testing
from nextaccel_jax.convert import var_transformer
from nextaccel_jax.models import autoencoder
from nextaccel_jax.models import next_scale as NS
from nextaccel_jax.models import transformer as T

TOKENIZER = testing.TINY_TOKENIZER
TINY = testing.TINY_TRANSFORMER
IMAGE = testing.TINY_IMAGE  # 64² → 16² latent
B = 2
key = testing.rbg_key
# `tok` and `tiny` (the models) and `fast_compile` come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def forward(tiny):
  model, _ = tiny
  return jax.jit(model.apply, static_argnames=("train",))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  levels = jnp.asarray(rng.standard_normal((B, 6, IMAGE, IMAGE, 2)).astype(np.float32) * 0.3)
  x = jnp.asarray(rng.standard_normal((B, 990, TOKENIZER["z_channels"])).astype(np.float32))
  return {"levels": levels, "family": jnp.array([0, 3]), "x": x}


def _film_perturbed(params):
  return jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.1 if "film" in jax.tree_util.keystr(p) else v, params
  )


# ------------------------------------------------------------------------------------------------
# Static tables


def test_sequence_layout_and_block_causal_mask():
  layout = T.sequence_layout()
  assert layout == ((0, 144), (144, 313), (313, 509), (509, 734), (734, 990))
  assert T.sequence_length() == 990
  mask = T.block_causal_mask()
  lvl = T.level_ids()
  assert mask.shape == (990, 990) and mask.dtype == bool
  assert np.array_equal(mask, lvl[:, None] >= lvl[None, :])
  for begin, end in layout:
    # Every query of a scale sees its whole scale and all earlier ones, nothing later.
    assert np.all(mask[begin:end].sum(axis=1) == end)
    assert mask[begin:end, begin:end].all() and not mask[begin:end, end:].any()
  assert mask.sum() == sum((e - b) * e for b, e in layout)


def test_context_map_and_counts():
  assert T.default_context_map(16, 4) == (0,) * 4 + (1,) * 4 + (2,) * 4 + (3,) * 4
  assert T.allocate_counts(16, [1, 1, 1]) == [5, 5, 6]
  assert T.allocate_counts(16, [1, 1, 2, 2, 1, 1]) == [2, 2, 4, 4, 2, 2]
  # Ties go to the larger index, so a depth-2 model sees the two finest levels.
  assert T.default_context_map(2, 4) == (2, 3)
  with pytest.raises(ValueError, match="context_map"):
    T.NextAccelTransformer(depth=2, width=64, num_heads=4, context_map=(0,)).init(
      jax.random.key(0), jnp.zeros((1, 990, 32)), jnp.zeros((1, 16, 16, 2)), jnp.zeros((1,), int)
    )


def test_sincos_2d_is_two_dimensional():
  pe = T.sincos_2d(4, 5, 16).reshape(4, 5, 16)
  # Row half depends on the row only, column half on the column only.
  assert np.allclose(pe[:, :1, :8], pe[:, :, :8]) and np.allclose(pe[:1, :, 8:], pe[:, :, 8:])
  flat = pe.reshape(20, 16)
  assert len({tuple(np.round(r, 6)) for r in flat}) == 20
  assert np.allclose(pe[0, 0], [0, 0, 0, 0, 1, 1, 1, 1] * 2)


# ------------------------------------------------------------------------------------------------
# Forward pass


def test_forward_shapes_and_block_causality(tiny, forward, data):
  model, params = tiny
  ctx = data["levels"][:, 0]
  logits, aux = forward(params, data["x"], ctx, data["family"])
  assert logits.shape == (B, 990, 64) and logits.dtype == jnp.float32
  assert aux["cond_BD"].shape == (B, 64)
  assert np.isfinite(logits).all()
  # Changing the inputs of scale 3 (sequence block 2) changes only scales ≥ 3.
  begin, end = T.sequence_layout()[2]
  x2 = data["x"].at[:, begin:end].add(1.0)
  logits2, _ = forward(params, x2, ctx, data["family"])
  diff = np.abs(np.asarray(logits2 - logits)).max(axis=(0, 2))
  assert diff[:begin].max() == 0.0
  assert diff[begin:end].min() > 0 and diff[end:].min() > 0
  # The context reaches every position (cross-attention has no mask).
  logits3, _ = forward(params, data["x"], ctx + 0.5, data["family"])
  assert np.abs(np.asarray(logits3 - logits)).max(axis=(0, 2)).min() > 0


def test_init_follows_var(tiny):
  model, variables = tiny
  p = variables["params"]
  c, depth = TINY["width"], TINY["depth"]
  std = math.sqrt(1 / (3 * c))

  def close(x, target, rel=0.15):
    assert abs(float(np.std(np.asarray(x))) - target) < rel * target

  close(p["word_embed"]["kernel"], std)
  close(p["pos_1LC"], std)
  close(p["head"]["kernel"], std * 0.02)
  close(p["head_nm"]["ada_lin"]["kernel"], std * 0.5)
  assert not np.any(p["head"]["bias"]) and not np.any(p["head_nm"]["ada_lin"]["bias"])
  for i in range(depth):
    blk = p[f"blocks_{i}"]
    ada = np.asarray(blk["ada_lin"]["kernel"])
    close(ada[:, : 2 * c], std * 1e-3)  # gates γ1, γ2: blocks start near the identity
    close(ada[:, 2 * c :], std * 0.5)  # scales and shifts
    assert not np.any(blk["ada_lin"]["bias"])
    close(blk["attn"]["proj"]["kernel"], std / math.sqrt(2 * depth))
    close(blk["ffn"]["fc2"]["kernel"], std / math.sqrt(2 * depth))
    close(blk["cross_attn"]["proj"]["kernel"], std / math.sqrt(2 * depth))
    for attn in ("attn", "cross_attn"):
      np.testing.assert_allclose(blk[attn]["scale_mul_1H11"], math.log(4.0))
      assert not np.any(blk[attn]["q_bias"]) and not np.any(blk[attn]["v_bias"])
  # The context encoder's FiLM starts at zero, like stage 1.
  film = [v for k, v in jax.tree_util.tree_leaves_with_path(p) if "film" in jax.tree_util.keystr(k)]
  assert film and not any(np.any(v) for v in film)
  # Drop path grows linearly over depth, from 0 in the first block.
  np.testing.assert_allclose(T.NextAccelTransformer().drop_path_rates, np.linspace(0, 0.025, 16))


def test_drop_path_only_in_training():
  blk = T.CrossSelfBlock(
    width=32, num_heads=4, mlp_ratio=4.0, cross_inner_dim=32, drop_path=0.5, depth=2
  )
  n = 64
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, 6, 32)).astype(np.float32))
  cond = jnp.asarray(rng.standard_normal((n, 32)).astype(np.float32))
  ctx = jnp.asarray(rng.standard_normal((n, 9, 8)).astype(np.float32))

  @jax.jit
  def run(x, cond, ctx):
    variables = blk.init(key(0), x, cond, ctx)
    out = []
    for train, seed in ((False, 0), (False, 1), (True, 0), (True, 1)):
      out.append(
        blk.apply(variables, x, cond, ctx, None, None, 0, train, rngs={"dropout": key(seed)})[0]
      )
    return out

  eval0, eval1, train0, train1 = map(np.asarray, run(x, cond, ctx))
  assert np.array_equal(eval0, eval1)
  assert not np.allclose(train0, train1) and not np.allclose(train0, eval0)
  # Per sample and branch: a sample whose three branches were all dropped passes x through.
  passed = np.all(train0 == np.asarray(x), axis=(1, 2))
  assert 0 < passed.sum() < n // 2
  assert not np.any(np.all(eval0 == np.asarray(x), axis=(1, 2)))


def test_bf16_compute_runs(tiny, forward, data):
  model, params = tiny
  model16 = model.clone(dtype=jnp.bfloat16)
  logits16, _ = jax.jit(model16.apply)(params, data["x"], data["levels"][:, 0], data["family"])
  logits, _ = forward(params, data["x"], data["levels"][:, 0], data["family"])
  assert logits16.dtype == jnp.float32 and np.isfinite(logits16).all()
  scale = float(np.abs(np.asarray(logits)).max())
  assert float(np.abs(np.asarray(logits16 - logits)).max()) < 0.1 * scale + 1e-3


# ------------------------------------------------------------------------------------------------
# Roles, teacher forcing, prefix randomisation


def test_randomize_prefix_statistics():
  b, p_max, v = 1000, 0.6, 64
  rng = np.random.default_rng(1)
  idx = [jnp.asarray(rng.integers(0, v, (b, pn * pn)), jnp.int32) for pn in (11, 12, 13, 14, 15)]
  randomize = jax.jit(NS.randomize_prefix, static_argnums=(2, 3))
  noisy, aux = randomize(key(3), idx, p_max, v)
  assert all(n.dtype == jnp.int32 for n in noisy)
  noisy, idx = [np.asarray(n) for n in noisy], [np.asarray(i) for i in idx]
  prob, replaced = np.asarray(aux["prob_B"]), np.asarray(aux["replaced_B"])
  assert [n.shape for n in noisy] == [i.shape for i in idx]
  # p ~ U(0, p_max) per sample: Kolmogorov–Smirnov distance to the uniform CDF.
  ks = np.abs(np.sort(prob) / p_max - (np.arange(b) + 0.5) / b).max()
  assert prob.min() >= 0 and prob.max() <= p_max and ks < 0.06
  # Per-sample replacement rate ≈ p (binomial over 855 ids).
  sigma = np.sqrt(prob * (1 - prob) / 855) + 1e-3
  assert np.all(np.abs(replaced - prob) < 5 * sigma)
  changed = np.concatenate([n != i for n, i in zip(noisy, idx, strict=True)], axis=1)
  # A redrawn id equals the old one with probability 1/V.
  np.testing.assert_allclose(changed.mean(), prob.mean() * (1 - 1 / v), rtol=0.02)
  pairs = list(zip(noisy, idx, strict=True))
  new_ids = np.concatenate([n[n != i] for n, i in pairs])
  counts = np.bincount(new_ids, minlength=v)
  assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
  # p_max = 0 changes nothing.
  same, _ = randomize(key(4), idx, 0.0, v)
  assert all(np.array_equal(a, b) for a, b in zip(same, idx, strict=True))


def test_roles_context_and_prefix_noise(tok, tiny, data):
  tokenizer, tv = tok
  student, _ = tiny
  teacher = student.clone(role="teacher", prefix_noise_max=1.0)
  assert student.context_acc == 0 and teacher.context_acc == 5
  with pytest.raises(ValueError, match="rng"):
    NS.teacher_forcing_batch(teacher, tokenizer, tv, data["levels"], data["family"])

  @jax.jit
  def batches(levels, family, rng):
    s = NS.teacher_forcing_batch(student, tokenizer, tv, levels, family)
    t = NS.teacher_forcing_batch(teacher, tokenizer, tv, levels, family, rng=rng)
    s["rebuilt_BLZ"] = NS.build_inputs(NS.lookup_contributions(tokenizer, tv, s["input_idx"]))
    return s, t

  s, t = batches(data["levels"], data["family"], key(7))
  np.testing.assert_array_equal(s["context_BHW2"], data["levels"][:, 0])
  np.testing.assert_array_equal(t["context_BHW2"], data["levels"][:, -1])
  # Labels are the clean scales 1..5 for both roles.
  np.testing.assert_array_equal(s["targets_BL"], t["targets_BL"])
  np.testing.assert_array_equal(s["targets_BL"], jnp.concatenate(s["idx"][1:], axis=1))
  assert s["targets_BL"].shape == (B, 990) and s["inputs_BLZ"].shape == (B, 990, 8)
  # Student inputs come from the clean prefix; the teacher's from the randomised one.
  assert all(np.array_equal(a, b) for a, b in zip(s["input_idx"], s["idx"][:-1], strict=True))
  assert not np.any(s["prefix_prob_B"])
  pairs = list(zip(t["input_idx"], t["idx"][:-1], strict=True))
  flips = np.mean(np.concatenate([np.asarray(a != b) for a, b in pairs], axis=1))
  assert flips > 0 and float(np.max(t["prefix_prob_B"])) > 0
  assert not np.allclose(s["inputs_BLZ"], t["inputs_BLZ"])
  # Inputs are exactly what lookup gives for the input ids.
  np.testing.assert_allclose(s["rebuilt_BLZ"], s["inputs_BLZ"], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Context encoder from stage 1, freezing


def test_context_encoder_from_aqvae_roles_and_freezing(tok, tiny, data):
  tokenizer, tv = tok
  student, params = tiny
  # The default map of a depth-2 model uses the 32² and 64² levels.
  student = student.clone(context_map=None)
  teacher = student.clone(role="teacher")
  enc = NS.context_encoder_params_from_aqvae(
    {"params": _film_perturbed(tv["params"]), "vq_ema": tv["vq_ema"]}
  )
  new = NS.insert_context_encoder(params, enc)
  assert set(new) == {"params"}
  x, fam = data["levels"][:, 0], data["family"]
  method = T.NextAccelTransformer.encode_context

  @jax.jit
  def contexts(p, enc, x, fam):
    # The role picks the context encoder's acceleration label: 0 (R = 32) or 5 (FS).
    feats = {}
    for acc in (0, 5):
      _, feats[acc] = tokenizer.apply(
        {"params": {"encoder": enc}},
        x,
        jnp.full((B,), acc),
        fam,
        method=lambda m, x, a, f: m.encoder(autoencoder.to_model_input(x), a, f),
      )
    return student.apply(p, x, fam, method=method), teacher.apply(p, x, fam, method=method), feats

  ctx_s, ctx_t, feats = contexts(new, enc, x, fam)
  names = ("mid", "pre_mid", "down_1", "down_0")  # 16², 16², 32², 64²
  for j in student.block_context:
    for ctx, acc in ((ctx_s, 0), (ctx_t, 5)):
      f = feats[acc][names[j]]
      pos = T.sincos_2d(f.shape[1], f.shape[2], f.shape[3])
      np.testing.assert_allclose(ctx[j], f.reshape(B, -1, f.shape[-1]) + pos, atol=1e-5)
    assert not np.allclose(ctx_s[j], ctx_t[j])
  with pytest.raises(ValueError, match="encoder trees differ"):
    NS.insert_context_encoder(params, {"conv_in": enc["conv_in"]})

  grads = jax.tree.map(jnp.ones_like, new["params"])
  for trainable in (True, False):
    tx = optim.mask_frozen(optax.sgd(1.0), trainable_context_encoder=trainable)
    updates, _ = tx.update(grads, tx.init(new["params"]), new["params"])
    enc_upd = updates["context_encoder"]
    assert not np.any(enc_upd["conv_out"]["kernel"]) and not np.any(enc_upd["norm_out"]["scale"])
    assert np.all(np.asarray(updates["head"]["kernel"]) == -1.0)
    assert bool(np.all(np.asarray(enc_upd["conv_in"]["kernel"]) == -1.0)) == trainable


def test_var_d16_converter_maps_blocks_and_head(tiny):
  _, params = tiny
  c, heads, rng = TINY["width"], TINY["num_heads"], np.random.default_rng(3)
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  sd = {
    "word_embed.weight": r(c, 8),
    "word_embed.bias": r(c),
    "class_emb.weight": r(11, c),
    "pos_start": r(1, 1, c),
    "pos_1LC": r(1, 30, c),
    "lvl_embed.weight": r(10, c),
    "lvl_1L": r(1, 30),
    "attn_bias_for_masking": r(1, 1, 30, 30),
    "head_nm.ada_lin.1.weight": r(2 * c, c),
    "head_nm.ada_lin.1.bias": r(2 * c),
    "head.weight": r(64, c),
    "head.bias": r(64),
    "extra.weight": r(3),
  }
  for i in range(TINY["depth"]):
    b = f"blocks.{i}."
    sd |= {
      b + "attn.mat_qkv.weight": r(3 * c, c),
      b + "attn.q_bias": r(c),
      b + "attn.v_bias": r(c),
      b + "attn.zero_k_bias": np.zeros(c, np.float32),
      b + "attn.scale_mul_1H11": r(1, heads, 1, 1),
      b + "attn.proj.weight": r(c, c),
      b + "attn.proj.bias": r(c),
      b + "ffn.fc1.weight": r(4 * c, c),
      b + "ffn.fc1.bias": r(4 * c),
      b + "ffn.fc2.weight": r(c, 4 * c),
      b + "ffn.fc2.bias": r(c),
      b + "ada_lin.1.weight": r(6 * c, c),
      b + "ada_lin.1.bias": r(6 * c),
    }
  new, report = var_transformer.from_var_state_dict(sd, params, class_rows=[7, 1, 2, 9])
  p, old = new["params"], params["params"]
  np.testing.assert_array_equal(
    p["blocks_1"]["attn"]["mat_qkv"]["kernel"], sd["blocks.1.attn.mat_qkv.weight"].T
  )
  np.testing.assert_array_equal(
    p["blocks_0"]["ada_lin"]["kernel"], sd["blocks.0.ada_lin.1.weight"].T
  )
  np.testing.assert_array_equal(
    p["blocks_0"]["attn"]["scale_mul_1H11"], sd["blocks.0.attn.scale_mul_1H11"]
  )
  np.testing.assert_array_equal(p["head"]["kernel"], sd["head.weight"].T)
  np.testing.assert_array_equal(p["head_nm"]["ada_lin"]["bias"], sd["head_nm.ada_lin.1.bias"])
  np.testing.assert_array_equal(p["class_emb"]["embedding"], sd["class_emb.weight"][[7, 1, 2, 9]])
  # Our sequence tables, the cross-attention inputs and the context encoder keep their init;
  # the cross-attention output starts at zero.
  np.testing.assert_array_equal(p["pos_1LC"], old["pos_1LC"])
  np.testing.assert_array_equal(
    p["blocks_0"]["cross_attn"]["mat_q"]["kernel"], old["blocks_0"]["cross_attn"]["mat_q"]["kernel"]
  )
  assert not np.any(p["blocks_1"]["cross_attn"]["proj"]["kernel"])
  assert report["reinitialised"] == ["lvl_embed.weight", "pos_1LC", "pos_start"]
  assert report["unused_torch_keys"] == ["extra.weight"]
  assert len(report["ignored_buffers"]) == 2 + TINY["depth"]
  assert "pos_1LC" in report["kept"] and "blocks_0/attn/proj/kernel" in report["filled"]
  with pytest.raises(ValueError, match="does not fit"):
    var_transformer.from_var_state_dict({"head.weight": r(64, c + 1)}, params)


# ------------------------------------------------------------------------------------------------
# Paper size


def test_paper_size_parameter_count():
  model = T.NextAccelTransformer()  # depth 16, width 1024, 16 heads, VAR's VQ-VAE encoder
  shapes = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.zeros((1, 990, 32)),
    jnp.zeros((1, 256, 256, 2)),
    jnp.zeros((1,), jnp.int32),
  )["params"]
  count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
  c, v = 1024, 4096
  per_block = (
    (3 * c * c + 2 * c + 16 + c * c + c)  # self-attention
    + (8 * c * c + 5 * c)  # FFN
    + (6 * c * c + 6 * c)  # adaLN
    + (c * c + c + c + 16 + c * c + c)  # cross-attention without mat_kv (its input varies)
  )
  ctx_in = [640] * 8 + [320] * 8  # mid / pre_mid (16²), then 32², 64²
  transformer = (
    16 * per_block
    + sum(ch * 2 * c for ch in ctx_in)
    + 4 * c  # class_emb
    + 32 * c
    + c  # word_embed
    + 5 * c  # lvl_embed
    + 990 * c  # pos_1LC
    + 2 * c * c
    + 2 * c  # head_nm
    + c * v
    + v  # head
  )
  encoder = count(shapes["context_encoder"])
  assert count(shapes) - encoder == transformer
  assert encoder > 44_107_872  # VAR's encoder plus FiLM and label embeddings
  print(f"paper-size transformer: {count(shapes):,} params ({encoder:,} in the context encoder)")
