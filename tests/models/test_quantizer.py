"""Tests of `nextaccel_jax.models.quantizer` (var_spec.md §2.2, §2.6, §5, §6.2–6.3).

Compilation dominates on the 2-core CI, so the quantizer runs through a few cached `jax.jit`
functions that the tests share.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nextaccel_jax.models import quantizer as qz

V, C = 64, 8
SIDE = qz.PATCH_NUMS[-1]
K = len(qz.PATCH_NUMS)
MODEL = qz.MultiScaleQuantizer(vocab_size=V, dim=C)
MODEL_D0 = qz.MultiScaleQuantizer(vocab_size=V, dim=C, ema_decay=0.0)
MODEL_BF16 = qz.MultiScaleQuantizer(vocab_size=V, dim=C, dtype=jnp.bfloat16)
MASK = np.array([[1, 1, 0, 1, 0, 1], [0, 1, 1, 0, 1, 1]], np.float32)


@functools.cache
def _init():
  f = jnp.zeros((2, K, SIDE, SIDE, C))
  return jax.jit(MODEL.init, static_argnames="train")(
    jax.random.key(0), f, jnp.ones((2, K)), train=False
  )


def _variables(seed: int = 0):
  """Initial Phi params with a unit-scale codebook, so assignments are spread over the codes."""
  embed = np.random.default_rng(seed + 100).normal(size=(V, C)).astype(np.float32)
  return {
    "params": _init()["params"],
    "vq_ema": {"embed": embed, "embed_avg": embed, "cluster_size": np.ones(V, np.float32)},
  }


def _latents(seed: int, b: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(b, K, SIDE, SIDE, C)).astype(np.float32)


def _apply(model, train: bool, variables, f, mask):
  (f_hat, aux), state = model.apply(variables, f, mask, train=train, mutable=["vq_ema"])
  return f_hat, aux, state["vq_ema"]


@functools.cache
def _forward(model, train: bool):
  return jax.jit(functools.partial(_apply, model, train))


@functools.cache
def _method(name: str, static_argnums=()):
  return jax.jit(functools.partial(MODEL.apply, method=name), static_argnums=static_argnums)


def _np_z(f_BhwC: np.ndarray, pn: int) -> np.ndarray:
  a = qz.area_matrix(pn, SIDE)
  return np.einsum("oi,bijc,pj->bopc", a, np.asarray(f_BhwC, np.float64), a)


def _np_nearest(z_NC: np.ndarray, embed_VC: np.ndarray) -> np.ndarray:
  d = ((z_NC[:, None, :] - np.asarray(embed_VC, np.float64)[None]) ** 2).sum(-1)
  return d.argmin(-1)


# --------------------------------------------------------------------------------------------------
# Static tables.


def _torch_matrix(torch, mode: str, out_size: int, in_size: int) -> np.ndarray:
  """Row o, column i: the weight of input i in output o, read off by resizing an identity."""
  eye = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, in_size, 1)
  kw = {"align_corners": False} if mode == "bicubic" else {}
  out = torch.nn.functional.interpolate(eye, size=(out_size, 1), mode=mode, **kw)
  return out[:, 0, :, 0].numpy().T


def test_resize_matrices_match_torch():
  torch = pytest.importorskip("torch")
  for pn in range(1, SIDE + 1):
    pairs = [
      ("bicubic", qz.bicubic_matrix(SIDE, pn), SIDE, pn),
      ("area", qz.area_matrix(SIDE, pn), SIDE, pn),
      ("area", qz.area_matrix(pn, SIDE), pn, SIDE),
    ]
    for mode, ours, out_size, in_size in pairs:
      ref = _torch_matrix(torch, mode, out_size, in_size)
      assert ours.shape == (out_size, in_size) and ours.dtype == np.float64
      np.testing.assert_allclose(
        ours, ref, rtol=0, atol=1e-12, err_msg=f"{mode} {in_size}->{out_size}"
      )
      np.testing.assert_allclose(ours.sum(1), 1.0, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(qz.area_matrix(SIDE, SIDE), np.eye(SIDE))
  np.testing.assert_allclose(qz.bicubic_matrix(SIDE, SIDE), np.eye(SIDE), atol=1e-15)


def test_separable_resize_matches_torch_2d():
  torch = pytest.importorskip("torch")
  x_BhwC = np.random.default_rng(0).normal(size=(2, SIDE, SIDE, 3))
  resize = jax.jit(qz.resize)
  for pn in (11, 13, 15):
    t = torch.from_numpy(x_BhwC.transpose(0, 3, 1, 2))
    down_ref = torch.nn.functional.interpolate(t, size=(pn, pn), mode="area").numpy()
    a = qz.area_matrix(pn, SIDE)
    down = np.einsum("oi,bijc,pj->bopc", a, x_BhwC, a)
    np.testing.assert_allclose(down, down_ref.transpose(0, 2, 3, 1), atol=1e-12)
    up_ref = torch.nn.functional.interpolate(
      torch.from_numpy(down_ref), size=(SIDE, SIDE), mode="bicubic", align_corners=False
    ).numpy()
    up = resize(jnp.asarray(down, jnp.float32), qz.bicubic_matrix(SIDE, pn))
    np.testing.assert_allclose(np.asarray(up), up_ref.transpose(0, 2, 3, 1), atol=1e-5)


def test_phi_index_maps():
  assert [qz.phi_index(k) for k in range(6)] == [0, 0, 1, 2, 3, 3]
  assert [qz.phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
  assert [qz.phi_index(k, 6, 6) for k in range(6)] == list(range(6))
  assert qz.phi_index(0, 1, 4) == 3
  with pytest.raises(ValueError, match="outside"):
    qz.phi_index(6)


def test_phi_matches_torch_conv_blend():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 5, 5, C)).astype(np.float32)
  params = {
    "kernel": (0.2 * rng.normal(size=(3, 3, C, C))).astype(np.float32),
    "bias": rng.normal(size=(C,)).astype(np.float32),
  }
  y = jax.jit(qz.Phi(C, quant_resi=0.5).apply)({"params": params}, h)
  th = torch.from_numpy(h.astype(np.float64).transpose(0, 3, 1, 2))
  w = torch.from_numpy(params["kernel"].astype(np.float64).transpose(3, 2, 0, 1))
  b = torch.from_numpy(params["bias"].astype(np.float64))
  ref = 0.5 * th + 0.5 * torch.nn.functional.conv2d(th, w, b, padding=1)
  np.testing.assert_allclose(np.asarray(y), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  assert qz.Phi(C, quant_resi=0.0).apply({}, h) is h


# --------------------------------------------------------------------------------------------------
# Rotation trick.


@jax.jit
def _rotate_vjp(z, q, g):
  value, vjp = jax.vjp(qz.rotate_to, z, q)
  return (value, *vjp(g))


def _np_rotation_grad(z: np.ndarray, q: np.ndarray, g: np.ndarray) -> np.ndarray:
  out = []
  for zi, qi, gi in zip(z, q, g, strict=True):
    u = zi / np.linalg.norm(zi)
    q_hat = qi / np.linalg.norm(qi)
    w = (u + q_hat) / np.linalg.norm(u + q_hat)
    rot = np.eye(len(zi)) - 2 * np.outer(w, w) + 2 * np.outer(q_hat, u)
    np.testing.assert_allclose(rot @ u, q_hat, atol=1e-12)
    out.append(np.linalg.norm(qi) / np.linalg.norm(zi) * rot.T @ gi)
  return np.stack(out)


def test_rotate_to_value_and_gradient():
  rng = np.random.default_rng(2)
  z, q, g = (rng.normal(size=(8, C)).astype(np.float32) for _ in range(3))
  q *= 0.3
  value, grad_z, grad_q = _rotate_vjp(z, q, g)
  np.testing.assert_allclose(np.asarray(value), q, atol=1e-5)
  ref = _np_rotation_grad(*(a.astype(np.float64) for a in (z, q, g)))
  np.testing.assert_allclose(np.asarray(grad_z), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(grad_q), 0.0)
  # Not the straight-through identity.
  assert not np.allclose(np.asarray(grad_z), g, atol=1e-2)


def test_rotate_to_degenerate_inputs_stay_finite():
  rng = np.random.default_rng(3)
  q, g, noise = (rng.normal(size=(8, C)).astype(np.float32) for _ in range(3))
  cases = {
    "antiparallel": -2.0 * q,
    "nearly_antiparallel": -2.0 * q + 1e-7 * noise,
    "zero": np.zeros_like(q),
  }
  for name, z in cases.items():
    value, grad_z, _ = (np.asarray(a) for a in _rotate_vjp(z, q, g))
    assert np.isfinite(value).all() and np.isfinite(grad_z).all(), name
    np.testing.assert_allclose(value, q, atol=1e-5, err_msg=name)
    if name == "zero":
      np.testing.assert_allclose(grad_z, g, atol=1e-6)
    else:
      # R is orthogonal, so only the norm ratio ‖q‖/‖z‖ = 1/2 changes the gradient's length.
      np.testing.assert_allclose(
        np.linalg.norm(grad_z, axis=-1), 0.5 * np.linalg.norm(g, axis=-1), rtol=1e-4, err_msg=name
      )


# --------------------------------------------------------------------------------------------------
# Tokenisation, lookup, combine.


def test_param_and_state_layout():
  variables = _init()
  paths = {
    "/".join(str(getattr(p, "key", p)) for p in path)
    for path, _ in jax.tree.leaves_with_path(variables)
  }
  expected = {f"params/quant_resi/qresi_ls_{j}/{n}" for j in range(4) for n in ("kernel", "bias")}
  expected |= {"vq_ema/embed", "vq_ema/embed_avg", "vq_ema/cluster_size"}
  assert paths == expected
  assert variables["params"]["quant_resi"]["qresi_ls_0"]["kernel"].shape == (3, 3, C, C)
  ema = variables["vq_ema"]
  assert ema["embed"].dtype == jnp.float32 and float(jnp.abs(ema["embed"]).max()) <= 1.0 / V
  np.testing.assert_array_equal(ema["embed_avg"], ema["embed"])
  np.testing.assert_array_equal(ema["cluster_size"], 1.0)


def test_nearest_codes_match_bruteforce():
  f, variables = _latents(1), _variables()
  idx_list = _method("tokenize")(variables, f)
  _, aux, _ = _forward(MODEL, False)(variables, f, np.ones((2, K), np.float32))
  for k, pn in enumerate(qz.PATCH_NUMS):
    z = _np_z(f[:, k], pn)
    ref = _np_nearest(z.reshape(-1, C), variables["vq_ema"]["embed"]).reshape(2, pn * pn)
    assert idx_list[k].shape == (2, pn * pn) and idx_list[k].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx_list[k]), ref)
    np.testing.assert_array_equal(np.asarray(aux["idx"][k]), ref)
    if k in (0, K - 1):
      single = _method("tokenize_scale", static_argnums=(2,))(variables, f[:, k], k)
      np.testing.assert_array_equal(np.asarray(single), ref)


def test_lookup_and_combine_reproduce_forward():
  f, variables = _latents(2), _variables()
  f_hat, aux, _ = _forward(MODEL, False)(variables, f, MASK)
  lookup = _method("lookup", static_argnums=(2,))
  h_list = [lookup(variables, idx, k) for k, idx in enumerate(aux["idx"])]
  for k in range(K):
    np.testing.assert_allclose(np.asarray(h_list[k]), np.asarray(aux["h"][:, k]), atol=1e-5)
  from_list = _method("combine")(variables, h_list, MASK)
  from_stack = _method("combine")(variables, jnp.stack(h_list, 1), MASK)
  np.testing.assert_allclose(np.asarray(from_list), np.asarray(f_hat), atol=1e-5)
  np.testing.assert_allclose(np.asarray(from_stack), np.asarray(from_list), atol=1e-6)
  # Mean of the active contributions, per sample.
  h = np.asarray(aux["h"])
  ref = (MASK[:, :, None, None, None] * h).sum(1) / MASK.sum(1)[:, None, None, None]
  np.testing.assert_allclose(np.asarray(f_hat), ref, atol=1e-5)


def test_commitment_and_statistics():
  f, variables = _latents(3), _variables()
  _, aux, _ = _forward(MODEL, False)(variables, f, MASK)
  embed = variables["vq_ema"]["embed"].astype(np.float64)
  mse = np.zeros((2, K))
  for k, pn in enumerate(qz.PATCH_NUMS):
    z = _np_z(f[:, k], pn)
    idx = np.asarray(aux["idx"][k])
    mse[:, k] = ((z.reshape(2, -1, C) - embed[idx]) ** 2).mean((1, 2))
    counts = np.bincount(idx.reshape(-1), weights=np.repeat(MASK[:, k], pn * pn), minlength=V)
    np.testing.assert_allclose(float(aux["usage_per_scale"][k]), (counts > 0).mean(), atol=1e-7)
    p = counts[counts > 0] / counts.sum()
    np.testing.assert_allclose(
      float(aux["perplexity_per_scale"][k]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5
    )
  np.testing.assert_allclose(
    float(aux["commitment"]), 0.25 * (MASK * mse).sum() / MASK.sum(), rtol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(aux["commitment_per_scale"]), (MASK * mse).sum(0) / MASK.sum(0), rtol=1e-5
  )


def test_inactive_scales_have_no_effect():
  f, variables = _latents(4), _variables()
  f_other = np.where(MASK[:, :, None, None, None] > 0, f, 10.0 * _latents(5))
  fwd = _forward(MODEL, True)
  f_hat_a, aux_a, ema_a = fwd(variables, f, MASK)
  f_hat_b, aux_b, ema_b = fwd(variables, f_other, MASK)
  np.testing.assert_array_equal(np.asarray(f_hat_a), np.asarray(f_hat_b))
  for key in ("commitment", "commitment_per_scale", "usage_per_scale", "perplexity_per_scale"):
    np.testing.assert_array_equal(np.asarray(aux_a[key]), np.asarray(aux_b[key]), err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, ema_a, ema_b)
  assert not np.array_equal(np.asarray(ema_a["embed"]), variables["vq_ema"]["embed"])
  # A sample with no active scale gets a zero latent instead of NaN.
  f_hat, _, _ = fwd(variables, f, MASK * np.array([[0.0], [1.0]], np.float32))
  np.testing.assert_array_equal(np.asarray(f_hat[0]), 0.0)


def test_bfloat16_compute_keeps_float32_islands():
  f, variables = _latents(13), _variables()
  f_hat32, aux32, _ = _forward(MODEL, True)(variables, f, MASK)
  f_hat, aux, ema = _forward(MODEL_BF16, True)(variables, f, MASK)
  assert f_hat.dtype == jnp.bfloat16 and aux["h"].dtype == jnp.bfloat16
  for key in ("commitment", "commitment_per_scale", "usage_per_scale", "perplexity_per_scale"):
    assert aux[key].dtype == jnp.float32, key
    np.testing.assert_array_equal(np.asarray(aux[key]), np.asarray(aux32[key]), err_msg=key)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ema))
  for a, b in zip(aux["idx"], aux32["idx"], strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(f_hat, np.float32), np.asarray(f_hat32), atol=0.05)


# --------------------------------------------------------------------------------------------------
# EMA codebook.


def _np_ema(variables, f, mask, idx_list, decay, eps=1e-5):
  ema = {k: np.asarray(v, np.float64) for k, v in variables["vq_ema"].items()}
  counts, sums = np.zeros(V), np.zeros((V, C))
  for k, pn in enumerate(qz.PATCH_NUMS):
    z = _np_z(f[:, k], pn).reshape(-1, C)
    idx = np.asarray(idx_list[k]).reshape(-1)
    w = np.repeat(mask[:, k], pn * pn)
    np.add.at(counts, idx, w)
    np.add.at(sums, idx, z * w[:, None])
  cluster = decay * ema["cluster_size"] + (1 - decay) * counts
  embed_avg = decay * ema["embed_avg"] + (1 - decay) * sums
  n = cluster.sum()
  smoothed = (cluster + eps) / (n + V * eps) * n
  return {"cluster_size": cluster, "embed_avg": embed_avg, "embed": embed_avg / smoothed[:, None]}


def test_ema_counts_sum_to_active_tokens_with_decay_zero():
  f, variables = _latents(6), _variables()
  _, aux, ema = _forward(MODEL_D0, True)(variables, f, MASK)
  cluster = np.asarray(ema["cluster_size"])
  n_active = sum(MASK[:, k].sum() * pn * pn for k, pn in enumerate(qz.PATCH_NUMS))
  assert cluster.sum() == n_active
  ref = _np_ema(variables, f, MASK, aux["idx"], decay=0.0)
  np.testing.assert_array_equal(cluster, ref["cluster_size"])
  for key in ("embed_avg", "embed"):
    np.testing.assert_allclose(np.asarray(ema[key]), ref[key], rtol=1e-5, atol=1e-5)


def test_ema_update_formula_and_unused_codes():
  f, variables = _latents(7), _variables()
  # Codes pushed far from the data are never assigned.
  embed = variables["vq_ema"]["embed"].copy()
  embed[V // 2 :] += 100.0
  variables["vq_ema"] = {**variables["vq_ema"], "embed": embed, "embed_avg": embed}
  _, aux, ema = _forward(MODEL, True)(variables, f, MASK)
  assert max(int(np.asarray(i).max()) for i in aux["idx"]) < V // 2
  ref = _np_ema(variables, f, MASK, aux["idx"], decay=0.99)
  for key, val in ema.items():
    np.testing.assert_allclose(np.asarray(val), ref[key], rtol=1e-5, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(np.asarray(ema["embed"])[V // 2 :], embed[V // 2 :], rtol=1e-3)


def test_ema_single_assignment_moves_by_formula():
  f, variables = _latents(8), _variables()
  embed = variables["vq_ema"]["embed"]
  f[:, K - 1] = embed[0]
  f[0, K - 1, 3, 7] = embed[3] + 0.01
  mask = np.zeros((2, K), np.float32)
  mask[:, K - 1] = 1.0
  _, aux, ema = _forward(MODEL_D0, True)(variables, f, mask)
  counts = np.bincount(np.asarray(aux["idx"][K - 1]).reshape(-1), minlength=V)
  assert counts[3] == 1 and counts[0] == 2 * SIDE * SIDE - 1
  n, eps = 2.0 * SIDE * SIDE, 1e-5
  smoothed_3 = (1 + eps) / (n + V * eps) * n
  new = np.asarray(ema["embed"])
  np.testing.assert_allclose(new[3], (embed[3] + 0.01) / smoothed_3, rtol=1e-6)
  # With decay 0 a code that got nothing collapses to 0 / smoothed = 0.
  np.testing.assert_array_equal(np.delete(new, [0, 3], axis=0), 0.0)


def test_eval_leaves_codebook_unchanged():
  f, variables = _latents(9), _variables()
  _, _, ema = _forward(MODEL, False)(variables, f, MASK)
  jax.tree.map(np.testing.assert_array_equal, ema, variables["vq_ema"])


# --------------------------------------------------------------------------------------------------
# Sharding and gradients.


def test_sharded_batch_matches_single_device():
  assert jax.device_count() == 8
  b = 8
  f, variables = _latents(10, b), _variables()
  mask = np.random.default_rng(0).integers(0, 2, (b, K)).astype(np.float32)
  mask[:, K - 1] = 1.0
  fwd = _forward(MODEL, True)
  single = fwd(variables, f, mask)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = NamedSharding(mesh, P("data"))
  f_sh, mask_sh = jax.device_put(f, data), jax.device_put(mask, data)
  assert len(f_sh.addressable_shards) == 8 and f_sh.addressable_shards[0].data.shape[0] == 1
  sharded = fwd(variables, f_sh, mask_sh)
  assert len(sharded[0].sharding.device_set) == 8
  flat_single, tree_single = jax.tree.flatten(single)
  flat_sharded, tree_sharded = jax.tree.flatten(sharded)
  assert tree_single == tree_sharded
  for a, s in zip(flat_single, flat_sharded, strict=True):
    np.testing.assert_allclose(np.asarray(s), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_gradients_reach_encoder_and_phi_but_not_codebook():
  f, variables = _latents(11), _variables()
  target = np.random.default_rng(12).normal(size=(2, SIDE, SIDE, C)).astype(np.float32)

  def loss_fn(params, vq_ema, f):
    f_hat, aux, _ = _apply(MODEL, True, {"params": params, "vq_ema": vq_ema}, f, MASK)
    return jnp.mean((f_hat - target) ** 2) + aux["commitment"]

  g_params, g_ema, g_f = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(
    variables["params"], variables["vq_ema"], f
  )
  g_f = np.asarray(g_f)
  assert np.isfinite(g_f).all()
  assert (np.abs(g_f).sum((2, 3, 4)) > 0).tolist() == (MASK > 0).tolist()
  for path, leaf in jax.tree.leaves_with_path(g_params):
    assert np.abs(np.asarray(leaf)).sum() > 0, path
  for leaf in jax.tree.leaves(g_ema):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_dead_codes_are_reseeded_from_active_latents():
  model = qz.MultiScaleQuantizer(vocab_size=V, dim=C, ema_decay=0.0, restart_threshold=0.5)
  variables = _variables(3)
  f = _latents(4)
  # Inactive scales carry a value no active latent has: a re-seeded code must never take it.
  f[MASK == 0] = 100.0

  def apply(variables, f, mask, rng):
    (_, aux), state = model.apply(
      variables, f, mask, train=True, mutable=["vq_ema"], rngs={"vq": rng}
    )
    return aux, state["vq_ema"]

  aux, new = jax.jit(apply)(variables, f, MASK, jax.random.key(0))
  counts = np.asarray(new["cluster_size"])
  used = set(
    np.concatenate([np.asarray(i)[MASK[:, k] > 0].ravel() for k, i in enumerate(aux["idx"])])
  )
  dead = np.array([c not in used for c in range(V)])
  assert float(aux["restarted_codes"]) == dead.sum() > 0
  # With decay 0 a dead code's EMA count is 0 < threshold: it restarts as one observation.
  np.testing.assert_array_equal(counts[dead], 1.0)
  pool = np.concatenate(
    [_np_z(f[:, k], pn)[MASK[:, k] > 0].reshape(-1, C) for k, pn in enumerate(qz.PATCH_NUMS)]
  )
  embed = np.asarray(new["embed"])
  for code in np.flatnonzero(dead):
    assert np.abs(pool - embed[code]).max(axis=1).min() < 1e-4
  assert np.abs(embed).max() < 50.0
  # Without the rng-driven restart (threshold 0), the same call re-seeds nothing.
  _, aux0, _ = _forward(MODEL_D0, True)(variables, f, MASK)
  assert float(aux0["restarted_codes"]) == 0.0


# --------------------------------------------------------------------------------------------------
# Data-dependent codebook start.


def test_scale_latents_are_what_each_scale_quantises():
  variables = _variables(5)
  f = _latents(6)
  z = np.asarray(_method("scale_latents")(variables, f))
  expected = np.concatenate(
    [_np_z(f[:, k], pn).reshape(-1, C) for k, pn in enumerate(qz.PATCH_NUMS)]
  )
  assert z.shape == (2 * sum(pn * pn for pn in qz.PATCH_NUMS), C) and z.dtype == np.float32
  np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)


def test_kmeans_plus_plus_covers_every_cluster_once():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, C)).astype(np.float32) * 10.0
  # One dominant "background" point and five rarer ones: uniform sampling would give the
  # background most codes, D² sampling gives each distinct point exactly one.
  weights = np.array([500, 3, 3, 3, 3, 3])
  x = np.repeat(centres, weights, axis=0)
  rng.shuffle(x)
  pick = jax.jit(qz.kmeans_plus_plus, static_argnums=1)
  codes = np.asarray(pick(x, 6, jax.random.key(1)))
  assert sorted(map(tuple, codes)) == sorted(map(tuple, centres))
  # More codes than distinct points: every point is still picked, the rest repeat picks.
  codes = np.asarray(pick(x, 9, jax.random.key(2)))
  assert {tuple(c) for c in codes} == {tuple(c) for c in centres}
  np.testing.assert_array_equal(codes, np.asarray(pick(x, 9, jax.random.key(2))))


def test_kmeans_plus_plus_spreads_codes_over_gaussian_latents():
  x = np.random.default_rng(3).normal(size=(4096, C)).astype(np.float32)
  codes = np.asarray(jax.jit(qz.kmeans_plus_plus, static_argnums=1)(x, V, jax.random.key(0)))
  assert len({tuple(c) for c in codes}) == V
  # Every code is a latent, and every code is the nearest code of at least itself.
  assert set(map(tuple, codes)) <= set(map(tuple, x))
  assert len(np.unique(_np_nearest(x, codes))) == V


def test_kmeans_start_keeps_the_codebook_in_use_without_restarts():
  """The paper's setting: EMA codebook, restarts off, latents away from the origin. VAR's tiny
  uniform codes collapse onto a handful of live codes; the k-means++ start keeps most in use."""
  v = 256
  model = qz.MultiScaleQuantizer(vocab_size=v, dim=C, ema_decay=0.99)
  mask = np.ones((2, K), np.float32)

  def latents(seed):
    return (2.0 + 0.5 * np.random.default_rng(seed).normal(size=(2, K, SIDE, SIDE, C))).astype(
      np.float32
    )

  @jax.jit
  def step(variables, f):
    (_, aux), new = model.apply(variables, f, mask, train=True, mutable=["vq_ema"])
    return {"params": variables["params"], "vq_ema": new["vq_ema"]}, aux

  def codes_used(variables):
    _, aux = step(variables, latents(999))
    return len(np.unique(np.concatenate([np.asarray(i).ravel() for i in aux["idx"]])))

  init = jax.jit(model.init, static_argnames="train")(
    jax.random.key(0), jnp.zeros((2, K, SIDE, SIDE, C)), mask, train=False
  )
  z = jax.jit(functools.partial(model.apply, method="scale_latents"))(init, latents(0))
  embed = qz.kmeans_plus_plus(z, v, jax.random.key(1))
  seeded = {
    "params": init["params"],
    "vq_ema": {"embed": embed, "embed_avg": embed + 0.0, "cluster_size": jnp.ones(v)},
  }
  used = {}
  for name, variables in (("uniform", init), ("kmeans++", seeded)):
    for i in range(40):
      variables, _ = step(variables, latents(i + 1))
    used[name] = codes_used(variables)
  assert used["kmeans++"] > 0.8 * v and used["uniform"] < 0.1 * v, used
