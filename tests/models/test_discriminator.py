"""Projected discriminator: heads, spectral norm, BatchNormLocal, LSGAN losses, a short D fit."""

import functools
import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from nextaccel_jax import losses
from nextaccel_jax.models import biomedclip as bm
from nextaccel_jax.models import discriminator as dm
from nextaccel_jax.models.layers import count_params


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
SIZE_KEYS = ("width", "depth", "mlp_dim", "patch_size", "image_size", "proj_dim")
TOWER_SIZES = {k: dm.TINY_TOWER[k] for k in SIZE_KEYS}
BLOCKS = dm.TINY_TOWER["feature_blocks"]
L = (dm.TINY_TOWER["image_size"] // dm.TINY_TOWER["patch_size"]) ** 2


@pytest.fixture(scope="module")
def tiny():
  """Tiny discriminator with a seeded (numpy) tower: no tower initialiser to compile."""
  disc = dm.tiny_discriminator()
  sd = mk.seeded_state_dict(3, **TOWER_SIZES)
  tower, report = bm.from_torch_state_dict(sd, **dm.TINY_TOWER)
  assert report["unfilled_leaves"] == []
  variables = dm.init_variables(disc, jax.random.key(0), tower_params=tower)
  return disc, variables, _jit(disc.apply, static_argnames=("train", "mutable"))


def _magnitudes(seed, b=4, size=48, smooth=True):
  rng = np.random.default_rng(seed)
  if not smooth:
    return jnp.asarray(rng.uniform(0.0, 1.0, (b, size, size)), jnp.float32)
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  out = []
  for _ in range(b):
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    out.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.1, 0.4)))
  return jnp.asarray(np.stack(out), jnp.float32)


def test_collections_shapes_and_frozen_tower(tiny):
  disc, variables, apply = tiny
  assert set(variables) == {"params", "tower", "spectral"}
  assert set(variables["params"]) == {"heads"}
  assert set(variables["params"]["heads"]) == {f"head_block_{i}" for i in BLOCKS}
  mag = _magnitudes(0)
  (logits, aux), new = apply(variables, mag, train=True, mutable=("spectral",))
  assert logits.shape == (4, 2 * L) and logits.dtype == jnp.float32
  assert {k: v.shape for k, v in aux["head_logits"].items()} == {
    f"block_{i}": (4, L) for i in BLOCKS
  }
  # Head order in the concatenation follows feature_blocks.
  np.testing.assert_array_equal(logits[:, L : 2 * L], aux["head_logits"]["block_1"])
  assert set(new) == {"spectral"}

  def g_loss(tower, m):
    fake, _ = disc.apply({**variables, "tower": tower}, m, train=False)
    return losses.lsgan_g_loss(fake)

  g_tower, g_mag = _jit(jax.grad(g_loss, argnums=(0, 1)))(variables["tower"], mag * 0.9)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_tower))
  assert float(jnp.abs(g_mag).max()) > 0 and bool(jnp.all(jnp.isfinite(g_mag)))


def test_spectral_state_updates_in_train_only(tiny):
  _, variables, apply = tiny
  mag = _magnitudes(1)
  (_, _), upd = apply(variables, mag, train=True, mutable=("spectral",))
  (_, _), same = apply(variables, mag, train=False, mutable=("spectral",))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), upd["spectral"], variables["spectral"])
  assert any(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, same["spectral"], variables["spectral"])


def test_init_variables_matches_module_init(tiny):
  disc, variables, _ = tiny
  # `disc.init` draws the tower itself (put into the `tower` collection); same layout.
  shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((2, 40, 40)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(jnp.shape, variables)


def test_missing_tower_collection_is_an_error(tiny):
  disc, variables, _ = tiny
  with pytest.raises(ValueError, match="tower"):
    disc.apply({"params": variables["params"], "spectral": variables["spectral"]}, _magnitudes(0))


def test_paper_head_parameter_count():
  feats = {f"block_{i}": jax.ShapeDtypeStruct((2, 197, 768), jnp.float32) for i in (2, 5, 8, 11)}
  shapes = jax.eval_shape(dm.ProjectedDiscriminator().init, jax.random.key(0), feats)
  assert count_params(shapes["params"]) == 23_614_468
  sn = traverse_util.flatten_dict(shapes["spectral"])
  assert sn[("head_block_2", "residual", "conv", "v")].shape == (768 * 9,)
  assert sn[("head_block_2", "cls", "u")].shape == (1,)
  disc = dm.paper_discriminator(hook_patch=True)
  assert disc.feature_keys == ("embed", "block_2", "block_5", "block_8", "block_11")


def _power_iterate(conv, variables, x, steps):
  """`steps` training calls of `conv`, returning the spectral state."""

  def body(_, sn):
    _, upd = conv.apply({**variables, "spectral": sn}, x, update_stats=True, mutable=["spectral"])
    return upd["spectral"]

  return _jit(lambda sn: jax.lax.fori_loop(0, steps, body, sn))(variables["spectral"])


def test_spectral_norm_top_singular_value_is_one():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 10, 24)), jnp.float32)
  for k in (1, 9):
    conv = dm.SNConv1d(12, k)
    variables = _jit(conv.init)(jax.random.key(k), x)
    variables = {**variables, "spectral": _power_iterate(conv, variables, x, 100)}
    # σ = uᵀWv is the largest singular value of the torch-layout (out, in·k) matrix, so W/σ has
    # spectral norm 1.
    w = np.asarray(variables["params"]["kernel"]).transpose(2, 1, 0).reshape(12, -1)
    u, v = np.asarray(variables["spectral"]["u"]), np.asarray(variables["spectral"]["v"])
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(u @ w @ v, s[0], rtol=1e-3)
    if k == 1:
      # Read W/σ from the layer's outputs on the identity (bias subtracted).
      eye = jnp.eye(24)[None]
      y = conv.apply(variables, jnp.concatenate([eye, jnp.zeros_like(eye)]))
      s_eff = np.linalg.svd(np.asarray(y[0] - y[1]).T, compute_uv=False)
      assert abs(s_eff[0] - 1.0) < 1e-3


def test_batchnorm_local_virtual_batches():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 5, 3)) * 3 + 1, jnp.float32)
  bn = dm.BatchNormLocal()
  y, _ = bn.init_with_output(jax.random.key(0), x)
  groups = np.asarray(y).reshape(2, 8, 5, 3)
  np.testing.assert_allclose(groups.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(groups.var(axis=(1, 2)), 1.0, atol=1e-3)
  # Group statistics: shifting the second half leaves the first half's output unchanged.
  y2 = bn.apply({"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}, x.at[8:].add(5.0))
  np.testing.assert_allclose(y2[:8], y[:8], atol=1e-6)
  with pytest.raises(ValueError, match="virtual batches"):
    bn.init(jax.random.key(0), x[:9])


def test_lsgan_losses_known_values():
  real = jnp.array([[0.5, 1.5]])
  fake = jnp.array([[0.2, -0.2]])
  np.testing.assert_allclose(losses.lsgan_d_loss(real, fake), 0.5 * 0.25 + 0.5 * 0.04, rtol=1e-6)
  np.testing.assert_allclose(losses.lsgan_g_loss(fake), (0.64 + 1.44) / 2, rtol=1e-6)
  # "image" averages each image's logits first: means 1 and 0 are perfect scores.
  np.testing.assert_allclose(losses.lsgan_d_loss(real, fake, reduce="image"), 0.0, atol=1e-7)
  np.testing.assert_allclose(losses.lsgan_g_loss(fake, reduce="image"), 1.0, rtol=1e-6)
  ones, zeros = jnp.ones((3, 7)), jnp.zeros((3, 7))
  assert float(losses.lsgan_d_loss(ones, zeros)) == 0.0
  assert float(losses.lsgan_d_loss(zeros, ones)) == 1.0
  assert float(losses.lsgan_g_loss(ones.astype(jnp.bfloat16))) == 0.0
  with pytest.raises(ValueError, match="reduce"):
    losses.lsgan_g_loss(fake, reduce="mean")


def test_d_loss_decreases_separating_two_distributions(tiny):
  disc, variables, _ = tiny
  real, fake = _magnitudes(10, smooth=True), _magnitudes(11, smooth=False)
  opt = optax.adam(3e-3)

  @_jit
  def d_step(params, opt_state, sn, tower):
    def loss_fn(p):
      v = {"params": p, "tower": tower}
      (r, _), upd = disc.apply({**v, "spectral": sn}, real, train=True, mutable=["spectral"])
      (f, _), upd = disc.apply({**v, **upd}, fake, train=True, mutable=["spectral"])
      return losses.lsgan_d_loss(r, f), upd["spectral"]

    (loss, sn), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sn, loss

  params, sn = variables["params"], variables["spectral"]
  opt_state = opt.init(params)
  history = []
  for _ in range(12):
    params, opt_state, sn, loss = d_step(params, opt_state, sn, variables["tower"])
    history.append(float(loss))
  assert history[-1] < 0.5 * history[0], history


def test_heads_match_torch_reference():
  torch = pytest.importorskip("torch")
  b, n, c, k = 4, 17, 16, 9
  feats_np = np.random.default_rng(0).standard_normal((b, n, c)).astype(np.float32)
  feats = {"block_0": jnp.asarray(feats_np)}
  pd = dm.ProjectedDiscriminator(feature_keys=("block_0",), kernel_size=k)
  variables = _jit(pd.init)(jax.random.key(0), feats)
  # Perturb every parameter (BatchNorm affines start at 1 and 0) so a mis-mapped one shows.
  rng = np.random.default_rng(1)
  params = jax.tree.map(
    lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape), variables["params"]
  )
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  variables = {"params": params, "spectral": variables["spectral"]}
  apply = _jit(pd.apply, static_argnames=("train", "mutable"))
  (logits, _), upd = apply(variables, feats, train=True, mutable=("spectral",))
  (eval_logits, _), _ = apply(variables, feats, train=False, mutable=("spectral",))

  ref = _torch_head(torch, params["head_block_0"], variables["spectral"]["head_block_0"], c, k)
  x = torch.from_numpy(feats_np)
  tokens = (x[:, 1:] + x[:, :1]).transpose(1, 2)
  ref.eval()
  with torch.no_grad():
    expect_eval = ref(tokens)[:, 0].numpy()
  ref.train()
  with torch.no_grad():
    expect_train = ref(tokens)[:, 0].numpy()
  np.testing.assert_allclose(eval_logits, expect_eval, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, expect_train, atol=1e-5, rtol=1e-5)
  sn = upd["spectral"]["head_block_0"]
  np.testing.assert_allclose(sn["residual"]["conv"]["u"], ref.residual_conv.weight_u, atol=1e-6)
  np.testing.assert_allclose(sn["residual"]["conv"]["v"], ref.residual_conv.weight_v, atol=1e-6)


def _torch_head(torch, params, spectral, c, k):
  """A plain PyTorch rendering of spec §3.2, loaded with the Flax head's variables."""
  tnn = torch.nn

  def sn_conv(p, s, cin, cout, ksize):
    conv = tnn.Conv1d(cin, cout, ksize, padding=ksize // 2, padding_mode="circular")
    conv = tnn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12)
    with torch.no_grad():
      conv.weight_orig.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(2, 1, 0).copy()))
      conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"])))
      conv.weight_u.copy_(torch.from_numpy(np.array(s["u"])))
      conv.weight_v.copy_(torch.from_numpy(np.array(s["v"])))
    return conv

  def bn_local(p, x):
    g = math.ceil(x.shape[0] / 8)
    y = x.view(g, -1, *x.shape[1:])
    mean = y.mean(dim=(1, 3), keepdim=True)
    var = y.var(dim=(1, 3), keepdim=True, unbiased=False)
    y = ((y - mean) / torch.sqrt(var + 1e-5)).view(x.shape)
    scale, bias = (torch.from_numpy(np.asarray(p[n])) for n in ("scale", "bias"))
    return y * scale[None, :, None] + bias[None, :, None]

  class Head(tnn.Module):
    def __init__(self):
      super().__init__()
      self.pointwise_conv = sn_conv(
        params["pointwise"]["conv"], spectral["pointwise"]["conv"], c, c, 1
      )
      self.residual_conv = sn_conv(
        params["residual"]["conv"], spectral["residual"]["conv"], c, c, k
      )
      self.cls = sn_conv(params["cls"], spectral["cls"], c, 1, 1)

    def forward(self, x):
      act = tnn.functional.leaky_relu
      h = act(bn_local(params["pointwise"]["norm"], self.pointwise_conv(x)), 0.2)
      r = act(bn_local(params["residual"]["norm"], self.residual_conv(h)), 0.2)
      return self.cls((r + h) / math.sqrt(2.0))

  return Head()


def test_diff_augment_bf16_and_augment_flag(tiny):
  _, variables, _ = tiny
  x = _magnitudes(3, size=32)
  y = _jit(dm.diff_augment)(x, jax.random.key(0))
  assert y.shape == x.shape and not np.allclose(y, x)
  g = _jit(jax.grad(lambda a: jnp.sum(dm.diff_augment(a, jax.random.key(0)) ** 2)))(x)
  assert float(jnp.abs(g).max()) > 0
  # One compiled variant covers both options: bf16 compute and augmentation.
  aug = dm.tiny_discriminator(augment=True, dtype=jnp.bfloat16)
  apply = _jit(lambda v, m, r: aug.apply(v, m, rngs={"augment": r})[0])
  a = apply(variables, _magnitudes(0), jax.random.key(1))
  b = apply(variables, _magnitudes(0), jax.random.key(2))
  assert a.shape == (4, 2 * L) and a.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)
