"""Cached autoregressive inference: sampling filters, cached == uncached, teacher-forced argmax ==
AR argmax, forced prefixes, and a memorised example reproduced end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nextaccel_jax import inference as I
from nextaccel_jax import testing
from nextaccel_jax.models import aqvae
from nextaccel_jax.models import next_scale as NS

TOKENIZER = testing.TINY_TOKENIZER
TINY = testing.TINY_TRANSFORMER
IMAGE = testing.TINY_IMAGE  # 64² → 16² latent
B = 2
key = testing.rbg_key
# `tok` and `tiny` (the models) and `fast_compile` come from tests/conftest.py.
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def forward(tiny):
  return jax.jit(tiny[0].apply)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, IMAGE, IMAGE, 2)).astype(np.float32) * 0.3)
  return {"x": x, "family": jnp.array([1, 2])}


@pytest.fixture(scope="module")
def q32(tok, data):
  tokenizer, tv = tok

  @jax.jit
  def fn(x, family):
    f, _ = tokenizer.apply(tv, x, jnp.zeros_like(family), family, method=aqvae.AQVAE.encode)
    return tokenizer.apply(tv, f, 0, method=aqvae.AQVAE.tokenize_scale)

  return fn(data["x"], data["family"])


@pytest.fixture(scope="module")
def rollout_fn(tok, tiny):
  tokenizer, tv = tok
  model, _ = tiny
  return jax.jit(
    lambda params, idx0, x, fam, rng, forced, sampling: I.rollout(
      model,
      params,
      tokenizer,
      tv,
      idx0,
      x,
      fam,
      sampling=sampling,
      rng=rng,
      forced_idx=forced,
      return_logits=True,
    ),
    static_argnames=("sampling",),
  )


@pytest.fixture(scope="module")
def sharp(tiny):
  """Params whose logits are spread out: VAR's head init makes near-ties everywhere."""
  params = jax.tree.map(lambda v: v, tiny[1])
  params["params"]["head"]["kernel"] = params["params"]["head"]["kernel"] * 200.0
  return params


def _teacher_forced_logits(tok, tiny, forward, params, idx_list, x, family):
  tokenizer, tv = tok
  model, _ = tiny
  h = NS.lookup_contributions(tokenizer, tv, idx_list[:-1])
  logits, _ = forward(params, NS.build_inputs(h, model.patch_nums, model.input_mode), x, family)
  return np.asarray(logits)


# ------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_filters():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.asarray(np.log(probs))[None, None, :].repeat(3, axis=1)
  assert np.array_equal(I.sample_tokens(None, logits, I.ARGMAX), np.zeros((1, 3)))
  finite = lambda lg: np.isfinite(np.asarray(lg))[0, 0]  # noqa: E731
  assert finite(I.filter_logits(logits, top_k=2)).tolist() == [True, True, False, False]
  assert finite(I.filter_logits(logits, top_p=0.7)).tolist() == [True, True, False, False]
  assert finite(I.filter_logits(logits, top_p=0.85)).tolist() == [True, True, True, False]
  assert finite(I.filter_logits(logits, top_p=1e-6)).tolist() == [True, False, False, False]
  assert finite(I.filter_logits(logits)).all()

  many = jnp.broadcast_to(logits[:, :1], (1, 20000, 4))
  sample = jax.jit(I.sample_tokens, static_argnums=2)
  freq = np.bincount(np.asarray(sample(key(0), many, I.MULTINOMIAL)).ravel(), minlength=4) / 2e4
  np.testing.assert_allclose(freq, probs, atol=0.015)
  top2 = np.asarray(sample(key(1), many, I.SamplingConfig(greedy=False, top_k=2)))
  np.testing.assert_allclose(
    np.bincount(top2.ravel(), minlength=4) / 2e4, [0.625, 0.375, 0, 0], atol=0.015
  )
  cold = np.asarray(sample(key(2), many, I.SamplingConfig(greedy=False, temperature=0.05)))
  assert (cold == 0).mean() > 0.99
  with pytest.raises(ValueError, match="rng"):
    I.sample_tokens(None, logits, I.MULTINOMIAL)


def test_init_cache(tiny):
  cache = I.init_cache(tiny[0], 3)
  assert len(cache) == TINY["depth"]
  assert all(k.shape == (3, 4, 990, 16) and v.shape == k.shape for k, v in cache)


# ------------------------------------------------------------------------------------------------
# Cached rollout vs teacher forcing


def test_cached_rollout_matches_teacher_forcing(tok, tiny, sharp, forward, rollout_fn, data, q32):
  params = sharp
  idx, h, aux = rollout_fn(params, q32, data["x"], data["family"], None, (), sampling=I.ARGMAX)
  assert [i.shape for i in idx] == [(B, pn * pn) for pn in (11, 12, 13, 14, 15, 16)]
  assert len(h) == 6 and h[0].shape == (B, 16, 16, 8)
  np.testing.assert_array_equal(idx[0], q32)
  cached = np.concatenate([np.asarray(lg) for lg in aux["logits"]], axis=1)
  # Recomputing the whole sequence with the block-causal mask on the rollout's own prefix.
  full = _teacher_forced_logits(tok, tiny, forward, params, idx, data["x"], data["family"])
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
  # Greedy AR tokens == teacher-forced argmax on that prefix (barring exact near-ties).
  ar = np.concatenate([np.asarray(i) for i in idx[1:]], axis=1)
  top2 = np.sort(full, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 1e-4
  np.testing.assert_array_equal(ar[decided], full.argmax(-1)[decided])
  assert decided.mean() > 0.995
  # Tokens vary across positions, so the comparison is not vacuous.
  assert len(np.unique(ar)) > 4


def test_sampled_rollout_with_forced_prefix(tok, tiny, sharp, forward, rollout_fn, data, q32):
  params = sharp
  forced = (jnp.zeros((B, 144), jnp.int32) + 5,)
  run = functools.partial(rollout_fn, params, q32, data["x"], data["family"])
  idx_a, _, aux = run(key(0), forced, sampling=I.MULTINOMIAL)
  idx_b, _, _ = run(key(1), forced, sampling=I.MULTINOMIAL)
  np.testing.assert_array_equal(idx_a[1], forced[0])
  assert all(not np.array_equal(a, b) for a, b in zip(idx_a[2:], idx_b[2:], strict=True))
  # The cache stays consistent with the forced and sampled tokens.
  cached = np.concatenate([np.asarray(lg) for lg in aux["logits"]], axis=1)
  full = _teacher_forced_logits(tok, tiny, forward, params, idx_a, data["x"], data["family"])
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# End to end: a memorised example comes back through AR inference


def test_memorised_example_is_reproduced(tok, tiny, data, q32):
  tokenizer, tv = tok
  # A frozen context encoder halves the step's compile and run time; memorising needs no more.
  model, params = tiny[0].clone(stop_context_grad=True), tiny[1]
  x, family = data["x"][:1], data["family"][:1]
  rng = np.random.default_rng(5)
  targets = [q32[:1]] + [
    jnp.asarray(rng.integers(0, 64, (1, pn * pn)), jnp.int32) for pn in (12, 13, 14, 15, 16)
  ]
  tx = optax.adam(1e-2, b2=0.95)

  @jax.jit
  def train(params, targets):
    h = NS.lookup_contributions(tokenizer, tv, targets)
    inputs, labels = NS.build_inputs(h[:-1]), jnp.concatenate(targets[1:], axis=1)

    def loss_fn(p):
      logits, _ = model.apply(p, inputs, x, family)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    def step(carry, _):
      p, opt = carry
      (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
      updates, opt = tx.update(g, opt, p)
      return (optax.apply_updates(p, updates), opt), (loss, (logits.argmax(-1) == labels).mean())

    (p, _), (loss, acc) = jax.lax.scan(step, (params, tx.init(params)), None, length=22)
    f_hat = tokenizer.apply(tv, h, jnp.ones((1, 6)), method=aqvae.AQVAE.combine)
    return p, loss, acc, f_hat

  # The steps run long enough for XLA's optimisations to pay for themselves.
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    trained, loss, acc, f_hat = train(params, targets)
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
  assert float(acc[-1]) == 1.0, (float(loss[-1]), float(acc[-1]))

  rec = I.Reconstructor(tokenizer, tv, model, trained["params"])
  x_hat, aux = rec.reconstruct(x, family, return_intermediates=True)
  for k, (got, want) in enumerate(zip(aux["idx"], targets, strict=True)):
    pn = model.patch_nums[k]
    assert got.shape == (1, pn, pn)
    np.testing.assert_array_equal(got.reshape(1, -1), want)
  assert x_hat.shape == (1, IMAGE, IMAGE, 2)
  assert aux["levels_BKHW2"].shape == (1, 6, IMAGE, IMAGE, 2)
  # The reconstruction decodes the mean of the six scales' contributions of these tokens.
  np.testing.assert_allclose(aux["f_hat"], f_hat, atol=1e-5)
  plain = rec(x, family)
  np.testing.assert_allclose(plain, x_hat, atol=1e-5)
  np.testing.assert_allclose(aux["levels_BKHW2"][:, -1], x_hat, atol=1e-6)
  assert not np.allclose(aux["levels_BKHW2"][:, 0], x_hat)
  with pytest.raises(ValueError, match="rng"):
    rec(x, family, sampling=I.MULTINOMIAL)


def test_diagnose_decodes_ever_less_true_information(tok, tiny, sharp, forward, data):
  tokenizer, tv = tok
  model, _ = tiny
  rng = np.random.default_rng(3)
  levels = jnp.asarray(rng.standard_normal((B, 6, IMAGE, IMAGE, 2)).astype(np.float32) * 0.3)
  levels = levels.at[:, 0].set(data["x"])
  family = data["family"]
  rec = I.Reconstructor(tokenizer, tv, model, sharp["params"])
  out = rec.diagnose(levels, family)
  assert set(I.DIAGNOSTICS) <= set(out)
  for name in I.DIAGNOSTICS:
    assert out[name].shape == (B, IMAGE, IMAGE, 2), name
  # The ceiling is the tokenizer's own evaluation-mode reconstruction from all six levels.
  want = jax.jit(functools.partial(tokenizer.apply, method=aqvae.AQVAE.reconstruct))(
    tv, levels, family
  )
  np.testing.assert_allclose(out["tokenizer_all"], want, atol=1e-4)
  assert not np.allclose(out["tokenizer_fs"], out["tokenizer_all"], atol=1e-3)
  # The free rollout is the argmax reconstruction from the R = 32 level.
  np.testing.assert_allclose(out["rollout"], rec(levels[:, 0], family), atol=1e-5)
  # Teacher forcing: the argmax of one forward pass over the true tokens.
  true_idx = NS.tokenize_levels(tokenizer, tv, levels, family)
  logits = _teacher_forced_logits(tok, tiny, forward, sharp, true_idx, levels[:, 0], family)
  targets = np.concatenate([np.asarray(i) for i in true_idx[1:]], axis=1)
  np.testing.assert_array_equal(out["teacher_forced_correct_BL"], logits.argmax(-1) == targets)
  # Scale 1 reads only the true Q32 either way, so both modes predict it alike.
  first = slice(0, model.patch_nums[1] ** 2)
  np.testing.assert_array_equal(
    out["rollout_correct_BL"][:, first], out["teacher_forced_correct_BL"][:, first]
  )


# ------------------------------------------------------------------------------------------------
# Data consistency


def _dc_case(coils: int, seed: int = 0, n: int = 64):
  """An image, R = 32-like mask, normalised maps (Σ|S|² = 1) and the R = 32 image they give."""
  from nextaccel_jax.data import masks, transforms

  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, n, n)) + 1j * rng.standard_normal((2, n, n))
  mask = masks.nested_masks("gaussian_2d", (n, n), seed=seed)[32][None].repeat(2, 0)
  maps = rng.standard_normal((2, coils, n, n)) + 1j * rng.standard_normal((2, coils, n, n))
  maps /= np.sqrt((np.abs(maps) ** 2).sum(1, keepdims=True))
  x, maps = jnp.asarray(x, jnp.complex64), jnp.asarray(maps, jnp.complex64)
  mask_j = jnp.asarray(mask)
  x32 = transforms.mc_adjoint(transforms.mc_forward(x, maps, mask_j.astype(jnp.complex64)), maps)
  return x, mask_j, maps, x32


def _measured(x, maps, mask):
  from nextaccel_jax.data import transforms

  return np.asarray(transforms.mc_forward(x, maps, mask.astype(jnp.complex64)))


def test_single_coil_consistency_replaces_the_measured_samples():
  from nextaccel_jax.data import transforms

  x, mask, _, _ = _dc_case(1)
  x32 = transforms.ifft2c(transforms.fft2c(x) * mask)
  rng = np.random.default_rng(1)
  guess = jnp.asarray(rng.standard_normal((2, 64, 64, 2)), jnp.float32)
  out = I.data_consistency(
    guess,
    transforms.complex_to_channels(x32),
    mask,
    consistency=I.ConsistencyConfig(iterations=1, phase="model"),
  )
  k_out = np.asarray(transforms.fft2c(transforms.channels_to_complex(out)))
  k_true = np.asarray(transforms.fft2c(x))
  k_guess = np.asarray(transforms.fft2c(transforms.channels_to_complex(guess)))
  m = np.asarray(mask)
  np.testing.assert_allclose(k_out[m], k_true[m], atol=1e-4)
  np.testing.assert_allclose(k_out[~m], k_guess[~m], atol=1e-4)


def test_multicoil_consistency_converges_and_keeps_a_consistent_image():
  from nextaccel_jax.data import transforms

  x, mask, maps, x32 = _dc_case(4)
  ch = transforms.complex_to_channels
  maps2 = ch(maps)
  want = _measured(x, maps, mask)
  guess = ch(x + 0.5 * jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32))
  errors = []
  for steps in (1, 5, 40):
    cfg = I.ConsistencyConfig(iterations=steps, phase="model")
    out = transforms.channels_to_complex(I.data_consistency(guess, ch(x32), mask, maps2, cfg))
    errors.append(np.linalg.norm(_measured(out, maps, mask) - want) / np.linalg.norm(want))
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2, errors
  # An image that already agrees with the measurements is left as it is.
  same = I.data_consistency(ch(x), ch(x32), mask, maps2, I.ConsistencyConfig(phase="model"))
  np.testing.assert_allclose(same, ch(x), atol=1e-4)


def test_consistency_input_phase_and_errors():
  from nextaccel_jax.data import transforms

  x, mask, _, _ = _dc_case(1)
  x32 = transforms.complex_to_channels(transforms.ifft2c(transforms.fft2c(x) * mask))
  # "input" starts from the magnitude of the guess with the input's phase: a guess that differs
  # from the truth only in phase gives what the truth gives.
  wrong_phase = transforms.complex_to_channels(jnp.abs(x) * jnp.exp(0.7j))
  a = I.data_consistency(wrong_phase, x32, mask, consistency=I.ConsistencyConfig(1, "input"))
  b = I.data_consistency(
    transforms.complex_to_channels(
      jnp.abs(x) * jnp.exp(1j * jnp.angle(x32[..., 0] + 1j * x32[..., 1]))
    ),
    x32,
    mask,
    consistency=I.ConsistencyConfig(1, "model"),
  )
  np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="phase"):
    I.data_consistency(x32, x32, mask, consistency=I.ConsistencyConfig(phase="zero"))
  with pytest.raises(ValueError, match="iterations"):
    I.data_consistency(x32, x32, mask, consistency=I.ConsistencyConfig(iterations=0))


def test_reconstructor_applies_consistency_to_its_output(tok, tiny, data):
  tokenizer, tv = tok
  model, params = tiny
  rec = I.Reconstructor(tokenizer, tv, model, params)
  mask = jnp.zeros((B, IMAGE, IMAGE), bool).at[:, IMAGE // 2 - 4 : IMAGE // 2 + 4].set(True)
  plain = rec(data["x"], data["family"])
  dc, aux = rec(data["x"], data["family"], mask_BHW=mask, return_intermediates=True)
  np.testing.assert_array_equal(aux["decoded_BHW2"], plain)
  np.testing.assert_allclose(
    dc,
    I.data_consistency(plain, data["x"], mask, consistency=rec.consistency),
    atol=1e-6,
    rtol=1e-6,
  )
