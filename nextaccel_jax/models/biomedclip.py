"""BiomedCLIP's image tower (timm `vit_base_patch16_224` + a 768→512 projection) in Flax.

Shape legend:
  B: batch size.
  H, W: magnitude-image size (any, e.g. 64, 128, 256); S: tower input side (224).
  P: patch side (16); L = (S / P)² patch tokens (196); N = L + 1 tokens with CLS (197).
  D: width (768); E: embedding size of the projection (512).

Topology (biomedclip_lpips_spec.md §1.3): patch conv, CLS prepended, learned position embedding
over all N tokens, `depth` pre-LN blocks (one fused qkv Dense with bias, softmax attention scaled
by head_dim^-0.5, exact-erf GELU MLP, LayerNorm eps 1e-6), a final LayerNorm, the CLS token as
the pooled feature, and BiomedCLIP's bias-free projection to E. `aux["block_i"]` is the residual
stream after 0-based block i (before the final norm); the projected discriminator reads blocks
2, 5, 8 and 11 (§3.1).

Parameter paths mirror the timm state-dict keys, an integer segment joined to the name before it
with `_`:

  timm `cls_token`, `pos_embed`          ↔ flax `cls_token`, `pos_embed` (same shapes)
  timm `patch_embed.proj.weight`         ↔ flax `patch_embed/proj/kernel` (kh, kw, I, O)
  timm `blocks.3.attn.qkv.weight`        ↔ flax `blocks_3/attn/qkv/kernel` (transposed)
  timm `blocks.3.norm1.weight`           ↔ flax `blocks_3/norm1/scale`
  open_clip `visual.head.proj.weight`    ↔ flax `head/proj/kernel` (transposed)

Weights: the released checkpoint is `open_clip_pytorch_model.bin` in the Hugging Face repository
`microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`. Fetch it on a machine
with network access, e.g.

  huggingface-cli download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \
      open_clip_pytorch_model.bin --local-dir weights/biomedclip

or through the "Files and versions" tab of the repository's web page.
`convert.checkpoints.load_state_dict(path)` reads it with torch (CPU build suffices, no
timm/open_clip; an `.npz` holding the same torch key names is read with numpy alone) and
`from_torch_state_dict` converts the vision tower. Without weights, `init_params` gives a
randomly initialised tower: that is structurally BiomedCLIP but not the paper's discriminator,
and is meant for smoke runs only.

Frozen use: the tower is a fixed feature extractor. `apply_frozen` runs it with
`jax.lax.stop_gradient` on the parameters, so gradients reach the input image (and, through
`preprocess_magnitude`, the magnitude image) but never the tower parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextaccel_jax.models.layers import maybe_remat, torch_key_path

# OpenAI CLIP normalisation, which BiomedCLIP's open_clip config uses (timm's own 0.5 is not).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURE_BLOCKS = (2, 5, 8, 11)
HF_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CHECKPOINT_NAME = "open_clip_pytorch_model.bin"

_LN_EPS = 1e-6


def _dense_init():
  return nn.initializers.truncated_normal(0.02)


class PatchEmbed(nn.Module):
  """Non-overlapping P×P patches → D-dim tokens, row-major over the (S/P)² grid."""

  width: int
  patch_size: int
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BSSC: jax.Array) -> jax.Array:
    p = self.patch_size
    y = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="proj",
    )(x_BSSC)
    b, h, w, d = y.shape
    return y.reshape(b, h * w, d)


class Attention(nn.Module):
  """Multi-head self-attention with timm's fused qkv layout (N, 3, heads, head_dim)."""

  num_heads: int
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    b, n, d = x_BND.shape
    hd = d // self.num_heads
    dense = functools.partial(
      nn.Dense,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_dense_init(),
    )
    qkv = dense(3 * d, name="qkv")(x_BND).reshape(b, n, 3, self.num_heads, hd)
    q_BNHK, k_BNHK, v_BNHK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits_BHNN = jnp.einsum("bqhk,bmhk->bhqm", q_BNHK * hd**-0.5, k_BNHK, precision=self.precision)
    # Softmax in fp32 so that a bf16 tower keeps the attention weights normalised.
    attn_BHNN = jax.nn.softmax(logits_BHNN.astype(jnp.float32), axis=-1).astype(self.dtype)
    out_BNHK = jnp.einsum("bhqm,bmhk->bqhk", attn_BHNN, v_BNHK, precision=self.precision)
    return dense(d, name="proj")(out_BNHK.reshape(b, n, d))


class Mlp(nn.Module):
  hidden: int
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    dense = functools.partial(
      nn.Dense,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_dense_init(),
    )
    h = dense(self.hidden, name="fc1")(x_BND)
    # timm uses the exact erf GELU; flax's default is the tanh approximation.
    h = nn.gelu(h, approximate=False)
    return dense(x_BND.shape[-1], name="fc2")(h)


def _layer_norm(name: str, param_dtype) -> nn.LayerNorm:
  # fp32 island: statistics and output in fp32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=jnp.float32, param_dtype=param_dtype, name=name)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_dim: int
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm("norm1", self.param_dtype)(x_BND).astype(self.dtype)
    x_BND = x_BND + Attention(self.num_heads, name="attn", **kw)(h)
    h = _layer_norm("norm2", self.param_dtype)(x_BND).astype(self.dtype)
    return x_BND + Mlp(self.mlp_dim, name="mlp", **kw)(h)


class ProjHead(nn.Module):
  """open_clip's `visual.head`: dropout(0) + a bias-free Linear(D→E)."""

  features: int
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BD: jax.Array) -> jax.Array:
    return nn.Dense(
      self.features,
      use_bias=False,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_dense_init(),
      name="proj",
    )(x_BD)


class BiomedCLIPVision(nn.Module):
  """BiomedCLIP ViT-B/16 image tower. Defaults are the released model's sizes.

  Attributes:
    image_size: input side S (224).
    patch_size: P (16).
    width: D (768).
    depth: number of blocks (12).
    num_heads: attention heads (12).
    mlp_dim: MLP hidden size (3072).
    proj_dim: E of the CLIP projection (512); None returns the pooled CLS feature instead.
    feature_blocks: 0-based blocks whose outputs go to `aux` (2, 5, 8, 11).
    remat: recompute each block in the backward pass (saves activation memory when the
      generator's adversarial loss is differentiated through the tower).
    precision: matmul/conv precision (e.g. "highest" for fp32 parity on GPUs, whose default
      fp32 matmul is TF32).
    dtype: compute dtype; LayerNorm and softmax always run in fp32.
    param_dtype: parameter storage dtype.
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  proj_dim: int | None = 512
  feature_blocks: Sequence[int] = FEATURE_BLOCKS
  remat: bool | str = False
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @nn.compact
  def __call__(self, images_BSSC: jax.Array):
    """Embeds normalised images (see `preprocess_magnitude`).

    Args:
      images_BSSC: `[B, S, S, 3]`, CLIP-normalised.

    Returns:
      `(embedding_BE, aux)`: the projected CLS feature (`[B, D]` pooled feature when
      `proj_dim` is None); aux has `embed` (tokens after the position embedding, `[B, N, D]`),
      `block_i` for i in `feature_blocks` (`[B, N, D]`) and `pooled` (`[B, D]`).
    """
    bad = [i for i in self.feature_blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"feature_blocks {bad} outside 0..{self.depth - 1}")
    if images_BSSC.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"expected {self.image_size}² images, got {images_BSSC.shape}")
    kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
    x = images_BSSC.astype(self.dtype)
    tokens_BLD = PatchEmbed(self.width, self.patch_size, name="patch_embed", **kw)(x)
    b = tokens_BLD.shape[0]
    cls = self.param(
      "cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), self.param_dtype
    )
    pos = self.param(
      "pos_embed", nn.initializers.normal(0.02), (1, self.num_tokens, self.width), self.param_dtype
    )
    cls_B1D = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
    x_BND = jnp.concatenate([cls_B1D, tokens_BLD], axis=1) + pos.astype(self.dtype)
    aux = {"embed": x_BND}

    block_cls = maybe_remat(Block, self.remat)
    for i in range(self.depth):
      x_BND = block_cls(self.num_heads, self.mlp_dim, name=f"blocks_{i}", **kw)(x_BND)
      if i in self.feature_blocks:
        aux[f"block_{i}"] = x_BND

    pooled_BD = _layer_norm("norm", self.param_dtype)(x_BND)[:, 0]
    aux["pooled"] = pooled_BD
    if self.proj_dim is None:
      return pooled_BD, aux
    emb_BE = ProjHead(self.proj_dim, name="head", **kw)(pooled_BD.astype(self.dtype))
    return emb_BE, aux


def init_params(rng: jax.Array, **model_fields) -> dict[str, Any]:
  """Random tower parameters (`BiomedCLIPVision(**model_fields)`), for runs without weights."""
  model = BiomedCLIPVision(**model_fields)
  x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  # Jitted: eager init runs every initializer op by op, which is slow on CPU at ViT-B size.
  return jax.jit(model.init)(rng, x)["params"]


def apply_frozen(model: BiomedCLIPVision, params: Any, images_BSSC: jax.Array):
  """`model.apply` with the parameters behind `stop_gradient`.

  Gradients flow to `images_BSSC` only; differentiating with respect to `params` gives zeros, so
  the tower stays fixed even if its parameters end up inside a differentiated pytree.
  """
  return model.apply({"params": jax.lax.stop_gradient(params)}, images_BSSC)


# ------------------------------------------------------------------------------------------------
# Preprocessing (spec §3.5)


@functools.lru_cache(maxsize=32)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` averaging matrix of torch's `interpolate(mode="area")` along one axis.

  Row i averages inputs `[floor(i·n_in/n_out), ceil((i+1)·n_in/n_out))` (adaptive average
  pooling), which also covers upsampling (each window then holds one or two inputs).
  """
  a = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)
    a[i, lo:hi] = 1.0 / (hi - lo)
  a.setflags(write=False)
  return a


def preprocess_magnitude(
  mag_BHW: jax.Array,
  scale_B: jax.Array | None = None,
  image_size: int = 224,
  clip: bool = True,
) -> jax.Array:
  """Magnitude MR images → CLIP-normalised tower input.

  Steps: divide by `scale_B` (the per-image normaliser; pass the target's for both real and
  reconstructed images, or D can tell them apart by scale), clip to [0, 1], area-resize to
  `image_size`² (torch `F.interpolate(mode="area")`), repeat to 3 channels and apply the CLIP
  mean/std. Differentiable (the clip has zero gradient outside [0, 1]) and jit-friendly: the
  resize is two constant matrix products.

  Args:
    mag_BHW: magnitudes `[B, H, W]`, any H, W.
    scale_B: per-image normaliser `[B]`; None when `mag_BHW` is already in [0, 1].
    image_size: output side S.
    clip: clip the scaled image to [0, 1].

  Returns:
    `[B, S, S, 3]` float32.
  """
  x01_BSS = resize_area(unit_magnitude(mag_BHW, scale_B, clip), image_size)
  return clip_normalize(x01_BSS)


def unit_magnitude(mag_BHW: jax.Array, scale_B: jax.Array | None = None, clip: bool = True):
  """Magnitudes scaled by `scale_B` (per image) and clipped to [0, 1], float32."""
  x = mag_BHW.astype(jnp.float32)
  if scale_B is not None:
    x = x / jnp.asarray(scale_B, jnp.float32)[:, None, None]
  return jnp.clip(x, 0.0, 1.0) if clip else x


def clip_normalize(x01_BSS: jax.Array) -> jax.Array:
  """Grey [0, 1] images → 3 identical channels with the CLIP mean/std, `[B, S, S, 3]`."""
  mean = jnp.asarray(CLIP_MEAN, jnp.float32)
  std = jnp.asarray(CLIP_STD, jnp.float32)
  return (x01_BSS.astype(jnp.float32)[..., None] - mean) / std


def resize_area(x_BHW: jax.Array, size: int) -> jax.Array:
  """Area resize of `[B, H, W]` to `[B, size, size]`, equal to torch's `mode="area"`."""
  _, h, w = x_BHW.shape
  if (h, w) == (size, size):
    return x_BHW
  a_h = jnp.asarray(area_matrix(h, size), jnp.float32)
  a_w = jnp.asarray(area_matrix(w, size), jnp.float32)
  # HIGHEST: accelerators would otherwise average in bf16 passes.
  return jnp.einsum("ih,bhw,jw->bij", a_h, x_BHW, a_w, precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------
# PyTorch checkpoint conversion (spec §1.4, §1.5)

# (trunk prefix, projection key) of the three accepted namings: stand-alone timm, open_clip's
# vision tower (`model.visual.state_dict()`) and the full open_clip CLIP model.
_NAMINGS = {
  "timm": ("", "head.proj.weight"),
  "open_clip_visual": ("trunk.", "head.proj.weight"),
  "open_clip": ("visual.trunk.", "visual.head.proj.weight"),
}
# Keys that belong to other parts of a checkpoint and are expected to stay unused.
_FOREIGN_PREFIXES = ("text.", "logit_scale", "head.weight", "head.bias")


def _flax_dest(rel_key: str, flat_target: Mapping[tuple[str, ...], Any]):
  """Flax path and array transform for a trunk-relative torch key, or None if it has none."""
  path_t, leaf = torch_key_path(rel_key)
  if not path_t:
    dest = (leaf,)
    return (dest, lambda a: a) if dest in flat_target else None
  if leaf == "bias":
    dest = path_t + ("bias",)
    return (dest, lambda a: a) if dest in flat_target else None
  if leaf != "weight":
    return None
  if path_t + ("scale",) in flat_target:
    return path_t + ("scale",), lambda a: a
  if path_t + ("kernel",) in flat_target:

    def to_kernel(a):
      return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T

    return path_t + ("kernel",), to_kernel
  return None


def _numpy_init(path: tuple[str, ...], ref: Any, rng: np.random.Generator) -> np.ndarray:
  """Host-side stand-in for the module's initialisers (no compilation for a few leaves)."""
  leaf = path[-1]
  if leaf == "scale":
    arr = np.ones(ref.shape)
  elif leaf == "bias":
    arr = np.zeros(ref.shape)
  elif leaf == "cls_token":
    arr = 1e-6 * rng.standard_normal(ref.shape)
  else:
    arr = 0.02 * np.clip(rng.standard_normal(ref.shape), -2.0, 2.0)
  return arr.astype(ref.dtype)


def _detect_naming(keys) -> str:
  for naming in ("open_clip", "open_clip_visual", "timm"):
    if f"{_NAMINGS[naming][0]}cls_token" in keys:
      return naming
  raise ValueError(
    "no BiomedCLIP/timm ViT found: expected a key `cls_token`, `trunk.cls_token` or "
    "`visual.trunk.cls_token`"
  )


def _clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Unwraps `{"state_dict": ...}` and strips a DataParallel `module.` prefix, as open_clip."""
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  out = {}
  for k, v in state_dict.items():
    out[k[len("module.") :] if k.startswith("module.") else k] = v
  return out


def from_torch_state_dict(state_dict: Mapping[str, Any], seed: int = 0, **fields):
  """Converts a timm or open_clip BiomedCLIP state dict into `BiomedCLIPVision` parameters.

  Accepted namings (detected from the `cls_token` key): timm (`cls_token`, `blocks.N.…`; a
  1000-class `head.*` is ignored), open_clip's vision tower (`trunk.…`, `head.proj.weight`) and the
  full open_clip model (`visual.trunk.…`, `visual.head.proj.weight`; `text.*` and `logit_scale`
  are ignored). Linear weights are transposed, the patch conv goes (O, I, kh, kw) → (kh, kw, I, O),
  LayerNorm weight → scale, and every array is copied (torch `.numpy()` aliases its storage).

  Args:
    state_dict: torch key → numpy array (or anything `np.asarray` accepts).
    seed: numpy seed for the leaves the checkpoint does not fill (e.g. the projection when
      converting a stand-alone timm model): 0.02-scale normals, LayerNorm ones, zero biases.
    **fields: `BiomedCLIPVision` fields (the released model's sizes by default).

  Returns:
    `(params, report)`: the parameter tree (numpy arrays) and a dict with `naming`,
    `unused_torch_keys` (every key nothing consumed), `unexpected_unused` (the unused keys inside
    the vision tower's namespace: empty for a complete, matching checkpoint) and `unfilled_leaves`
    (Flax leaves left at their random init, "/"-joined).

  Raises:
    ValueError: no ViT in the state dict, or an array's shape differs from the model's (the
      message names the torch key).
  """
  sd = _clean_state_dict(state_dict)
  naming = _detect_naming(sd.keys())
  prefix, proj_key = _NAMINGS[naming]
  model = BiomedCLIPVision(**fields)
  x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  target = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  flat_target = traverse_util.flatten_dict(target)

  filled: dict[tuple[str, ...], np.ndarray] = {}
  used: set[str] = set()
  for key, value in sd.items():
    if key == proj_key:
      rel = "head.proj.weight"
    elif key.startswith(prefix):
      rel = key[len(prefix) :]
    else:
      continue
    found = _flax_dest(rel, flat_target)
    if found is None:
      continue
    dest, transform = found
    ref = flat_target[dest]
    arr = transform(np.array(np.asarray(value), dtype=np.float32, copy=True))
    if tuple(arr.shape) != tuple(ref.shape):
      raise ValueError(
        f"{key}: shape {tuple(np.shape(value))} converts to {tuple(arr.shape)}, but flax "
        f"{'/'.join(dest)} is {tuple(ref.shape)}; pass BiomedCLIPVision fields that match "
        "the checkpoint"
      )
    filled[dest] = np.array(arr, dtype=ref.dtype, copy=True)
    used.add(key)

  unfilled = [p for p in flat_target if p not in filled]
  np_rng = np.random.default_rng(seed)
  for p in unfilled:
    filled[p] = _numpy_init(p, flat_target[p], np_rng)

  unused = sorted(k for k in sd if k not in used)

  def foreign(k: str) -> bool:
    if naming == "timm":
      return k.startswith(_FOREIGN_PREFIXES)
    # Everything outside the vision tower's namespace (text tower, logit_scale, ...).
    return not k.startswith("visual." if naming == "open_clip" else ("trunk.", "head."))

  report = {
    "naming": naming,
    "unused_torch_keys": unused,
    "unexpected_unused": [k for k in unused if not foreign(k)],
    "unfilled_leaves": sorted("/".join(p) for p in unfilled),
  }
  return traverse_util.unflatten_dict(filled), report
