"""PSNR, SSIM and NMSE of magnitude reconstructions (fastmri_spec.md §2.2, §2.3, §2.5).

Shape legend: S slices, H×W image grid. Inputs are real magnitude images, `[H, W]` for one slice
or `[S, H, W]` for a volume; numpy arrays, JAX arrays or anything `np.asarray` accepts.

Protocols (decisions.md §7 reports both):

- `paper` (§2.3, the author's MambaRecon `utils/psnr.py` and `val_2D.py`): per slice. Target and
  prediction are each divided by their own maximum. PSNR uses `data_range=1`; SSIM is
  scikit-image's `structural_similarity(..., data_range=1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)` (11×11 Gaussian window, 5-pixel border crop); NMSE is
  `‖gt − pred‖² / ‖gt‖²` on the normalised images. NaN results become 0 as in that code. An
  image with no positive value is left unscaled, where that code would divide by zero. Because
  the prediction is rescaled by its own maximum, a global intensity error goes unnoticed.
- `fastmri` (§2.2, fastMRI's `evaluate.py`): per volume. PSNR is
  `peak_signal_noise_ratio(gt, pred, data_range=gt.max())` over all voxels; SSIM is the mean over
  slices of `structural_similarity(gt[s], pred[s], data_range=gt.max())` with scikit-image's
  defaults (7×7 uniform window, sample covariance, 3-pixel border crop); NMSE is taken over the
  volume. A slice is treated as a one-slice volume. fastMRI first centre-crops both volumes to
  `(W, W)` with W the target width; that crop is left to the caller (the model grid is 256×256).

LPIPS (fastmri_spec.md §2.4) needs a JAX network, runs in float32 and lives in `lpips_metric`;
`evaluators.score_slices` adds it to the scores of `evaluate_slices`.

The numbers equal scikit-image's but come from scipy.ndimage directly, one pass of separable
filters per slice. Everything is evaluated in float64. scikit-image keeps float32 inputs in
float32, and the author's code casts to float32 before calling it, so values computed that way
differ from ours in about the seventh decimal.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PROTOCOLS = ("paper", "fastmri")
# Protocols whose unit is the volume: one value per volume rather than per slice.
VOLUME_PROTOCOLS = ("fastmri",)

# SSIM stability constants of Wang et al. 2004, also scikit-image's defaults.
_K1 = 0.01
_K2 = 0.03
_GAUSSIAN_SIGMA = 1.5
# scikit-image truncates its Gaussian window at 3.5 sigma, which gives 11 taps for sigma = 1.5.
_GAUSSIAN_TRUNCATE = 3.5
_UNIFORM_SIZE = 7


def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
  """Normalised 1-D Gaussian weights with ndimage's radius rule `int(truncate * sigma + 0.5)`."""
  radius = int(truncate * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


_GAUSSIAN_TAPS = _gaussian_taps(_GAUSSIAN_SIGMA, _GAUSSIAN_TRUNCATE)


def _window_size(protocol: str) -> int:
  return _GAUSSIAN_TAPS.size if protocol == "paper" else _UNIFORM_SIZE


def _check_protocol(protocol) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _as_magnitude(x, name: str) -> np.ndarray:
  """Validates one input image or volume and returns it as float64."""
  arr = np.asarray(x)
  if np.iscomplexobj(arr):
    raise ValueError(
      f"{name} is complex ({arr.dtype}); these metrics take real magnitude images, "
      f"pass np.abs({name}) instead"
    )
  if not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
  if arr.ndim not in (2, 3):
    raise ValueError(
      f"{name} must be [H, W] or [S, H, W], got rank {arr.ndim} with shape {arr.shape}"
    )
  arr = arr.astype(np.float64, copy=False)
  # A finite sum proves every entry finite without allocating a mask; only an overflowing or
  # poisoned sum needs the element-wise look.
  with np.errstate(over="ignore", invalid="ignore"):
    total = arr.sum()
  if not np.isfinite(total) and not np.isfinite(arr).all():
    raise ValueError(f"{name} contains non-finite values (NaN or inf)")
  return arr


def prepare(gt, pred, protocol: str, with_ssim: bool) -> tuple[np.ndarray, np.ndarray, bool]:
  """Validates a pair; returns both as float64 `[S, H, W]` and whether the input was a slice.

  `with_ssim` also checks that the images are at least the protocol's SSIM window.

  Raises:
    ValueError: For complex, non-finite, wrongly ranked or mismatched inputs, an unknown
      protocol, too small images (with `with_ssim`), or an all-zero target under `fastmri`.
  """
  _check_protocol(protocol)
  gt = _as_magnitude(gt, "gt")
  pred = _as_magnitude(pred, "pred")
  if gt.shape != pred.shape:
    raise ValueError(f"pred has shape {pred.shape} but gt has shape {gt.shape}; they must match")
  is_slice = gt.ndim == 2
  if is_slice:
    gt, pred = gt[None], pred[None]
  if gt.shape[0] == 0:
    raise ValueError("gt and pred have no slices")
  window = _window_size(protocol)
  if with_ssim and min(gt.shape[-2:]) < window:
    raise ValueError(
      f"gt has image size {gt.shape[-2:]}, smaller than the {window}×{window} SSIM window of "
      f"the {protocol!r} protocol"
    )
  if protocol == "fastmri" and gt.max() <= 0:
    raise ValueError(
      f"gt has maximum {gt.max()}; the fastmri protocol uses it as the data range, so it must be "
      "positive"
    )
  return gt, pred, is_slice


def _local_means(stack: np.ndarray, gaussian: bool) -> np.ndarray:
  """Window means over the last two axes, kept only where the window lies inside the image.

  The SSIM border crop equals the window radius, so the kept positions never see the padding
  mode. The second pass runs on a transposed copy because ndimage filters the contiguous axis
  about twice as fast; the result is therefore `[..., W', H']`, harmless since SSIM only averages
  it.
  """
  if gaussian:
    radius = _GAUSSIAN_TAPS.size // 2

    def filt(a):
      return ndimage.correlate1d(a, _GAUSSIAN_TAPS, axis=-1)
  else:
    radius = _UNIFORM_SIZE // 2

    def filt(a):
      return ndimage.uniform_filter1d(a, _UNIFORM_SIZE, axis=-1)

  rows = filt(stack)[..., radius : stack.shape[-1] - radius]
  cols = np.ascontiguousarray(np.swapaxes(rows, -1, -2))
  return filt(cols)[..., radius : cols.shape[-1] - radius]


def _ssim_slice(
  x: np.ndarray, y: np.ndarray, data_range: float, gaussian: bool, sample_cov: bool
) -> float:
  """Mean SSIM of one `[H, W]` pair, as scikit-image's `structural_similarity` computes it."""
  window_px = (_GAUSSIAN_TAPS.size if gaussian else _UNIFORM_SIZE) ** 2
  cov_norm = window_px / (window_px - 1) if sample_cov else 1.0
  c1 = (_K1 * data_range) ** 2
  c2 = (_K2 * data_range) ** 2
  # SSIM needs only var_x + var_y, so the two second moments are filtered as one sum.
  mu_x, mu_y, mu_sq_sum, mu_xy = _local_means(np.stack([x, y, x * x + y * y, x * y]), gaussian)
  mu_x_mu_y = mu_x * mu_y
  mean_sq_sum = mu_x * mu_x + mu_y * mu_y
  num = (2.0 * mu_x_mu_y + c1) * (2.0 * cov_norm * (mu_xy - mu_x_mu_y) + c2)
  den = (mean_sq_sum + c1) * (cov_norm * (mu_sq_sum - mean_sq_sum) + c2)
  return float(np.mean(num / den))


def _sum_sq(x: np.ndarray, out: np.ndarray) -> np.float64:
  """Sum of squares, using `out` (same shape as `x`, may be `x`) as scratch.

  numpy's pairwise sum rather than a BLAS dot: OpenBLAS runs dots of this size on several threads,
  and on a busy host waiting for its worker thread stalled single calls for milliseconds.
  """
  return np.multiply(x, x, out=out).sum()


def peak(x_HW: np.ndarray) -> float:
  """The divisor of the `paper` normalisation: the maximum, or 1 if no value is positive."""
  peak = x_HW.max()
  return peak if peak > 0 else 1.0


def _paper_scores(
  gt: np.ndarray, pred: np.ndarray, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
  """Per-slice metrics of the `paper` protocol for validated `[S, H, W]` float64 inputs."""
  scores = {name: np.empty(gt.shape[0]) for name in names}
  # Slice by slice into reused buffers, so the temporaries stay small and in cache.
  x, y = np.empty(gt.shape[1:]), np.empty(gt.shape[1:])
  with np.errstate(divide="ignore", invalid="ignore"):
    for s, (g, p) in enumerate(zip(gt, pred, strict=True)):
      g_peak, p_peak = peak(g), peak(p)
      if "psnr" in names or "nmse" in names:
        # The error of the normalised pair, measured in the target's units: it saves a pass
        # over both images and differs from dividing first only by rounding.
        np.multiply(p, g_peak / p_peak, out=y)
        np.subtract(g, y, out=y)
        err = _sum_sq(y, y)
        if "psnr" in names:
          mse = err / (g_peak**2 * g.size)
          scores["psnr"][s] = 10.0 * np.log10(1.0 / mse)
        if "nmse" in names:
          scores["nmse"][s] = err / _sum_sq(g, x)
      if "ssim" in names:
        np.divide(g, g_peak, out=x)
        np.divide(p, p_peak, out=y)
        scores["ssim"][s] = _ssim_slice(x, y, 1.0, gaussian=True, sample_cov=False)
  # The author's evaluation scores NaN as 0 (val_2D.py). With finite inputs only the NMSE of an
  # all-zero target against an all-zero prediction (0 / 0) can be NaN, and 0 is right for it.
  return {name: np.where(np.isnan(v), 0.0, v) for name, v in scores.items()}


def _fastmri_scores(gt: np.ndarray, pred: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
  """Volume metrics of the `fastmri` protocol for validated `[S, H, W]` float64 inputs."""
  data_range = gt.max()
  scores = {}
  if "psnr" in names or "nmse" in names:
    diff = gt - pred
    err = _sum_sq(diff, diff)
    with np.errstate(divide="ignore"):
      if "psnr" in names:
        scores["psnr"] = float(10.0 * np.log10(data_range**2 / (err / gt.size)))
      if "nmse" in names:
        scores["nmse"] = float(err / _sum_sq(gt, diff))
    # Released before SSIM: holding this volume-sized buffer made the SSIM loop measurably slower.
    del diff
  if "ssim" in names:
    per_slice = [
      _ssim_slice(x, y, data_range, gaussian=False, sample_cov=True)
      for x, y in zip(gt, pred, strict=True)
    ]
    scores["ssim"] = float(np.mean(per_slice))
  return scores


def _single_metric(gt, pred, protocol, name: str) -> float | np.ndarray:
  gt, pred, is_slice = prepare(gt, pred, protocol, with_ssim=name == "ssim")
  if protocol == "fastmri":
    return _fastmri_scores(gt, pred, (name,))[name]
  values = _paper_scores(gt, pred, (name,))[name]
  return float(values[0]) if is_slice else values


def psnr(gt, pred, protocol: str = "paper") -> float | np.ndarray:
  """Peak signal-to-noise ratio in dB.

  Args:
    gt: Target magnitudes, `[H, W]` or `[S, H, W]`.
    pred: Reconstructed magnitudes, same shape as `gt`.
    protocol: `"paper"` (per slice, each image over its own max, data range 1) or `"fastmri"`
      (over the whole volume with data range `gt.max()`).

  Returns:
    `paper`: a float for a slice, a float64 array `[S]` for a volume. `fastmri`: a float.
    Identical inputs give +inf, as in scikit-image.

  Raises:
    ValueError: For complex, non-finite, wrongly ranked or mismatched inputs, an unknown
      protocol, or an all-zero target under `fastmri`.
  """
  return _single_metric(gt, pred, protocol, "psnr")


def ssim(gt, pred, protocol: str = "paper") -> float | np.ndarray:
  """Structural similarity, equal to scikit-image's `structural_similarity` under each protocol.

  fastMRI's own `evaluate.ssim` returns a shape-(1,) array; under `fastmri` this returns a float.

  Args:
    gt: Target magnitudes, `[H, W]` or `[S, H, W]`; H and W must be at least the window size (11
      for `paper`, 7 for `fastmri`).
    pred: Reconstructed magnitudes, same shape as `gt`.
    protocol: `"paper"` (per slice, Gaussian window, sigma 1.5, population covariance, data
      range 1 after dividing each image by its own max) or `"fastmri"` (7×7 uniform window,
      sample covariance, data range `gt.max()` of the volume, averaged over slices).

  Returns:
    `paper`: a float for a slice, a float64 array `[S]` for a volume. `fastmri`: a float.

  Raises:
    ValueError: For complex, non-finite, wrongly ranked, mismatched or too small inputs, an
      unknown protocol, or an all-zero target under `fastmri`.
  """
  return _single_metric(gt, pred, protocol, "ssim")


def nmse(gt, pred, protocol: str = "paper") -> float | np.ndarray:
  """Normalised mean squared error `‖gt − pred‖² / ‖gt‖²`.

  Args:
    gt: Target magnitudes, `[H, W]` or `[S, H, W]`.
    pred: Reconstructed magnitudes, same shape as `gt`.
    protocol: `"paper"` (per slice, on the images divided by their own max; an all-zero target
      and prediction give 0, an all-zero target alone gives +inf) or `"fastmri"` (over the whole
      volume).

  Returns:
    `paper`: a float for a slice, a float64 array `[S]` for a volume. `fastmri`: a float.

  Raises:
    ValueError: For complex, non-finite, wrongly ranked or mismatched inputs, an unknown
      protocol, or an all-zero target under `fastmri`.
  """
  return _single_metric(gt, pred, protocol, "nmse")


def prepared_scores(gt: np.ndarray, pred: np.ndarray, protocol: str) -> dict:
  """`evaluate_slices` for a pair already validated by `prepare` (float64 `[S, H, W]`)."""
  names = ("psnr", "ssim", "nmse")
  if protocol == "fastmri":
    return _fastmri_scores(gt, pred, names)
  return _paper_scores(gt, pred, names)


def evaluate_slices(gt_SHW, pred_SHW, protocol: str = "paper") -> dict[str, np.ndarray | float]:
  """PSNR, SSIM and NMSE of a volume under one protocol, validating and normalising only once.

  `evaluation.evaluators.score_slices` adds LPIPS (a JAX network) to these numpy metrics.

  Args:
    gt_SHW: Target magnitudes `[S, H, W]`; a `[H, W]` slice counts as a one-slice volume.
    pred_SHW: Reconstructed magnitudes, same shape.
    protocol: One of `PROTOCOLS`.

  Returns:
    `{"psnr", "ssim", "nmse"}`: float64 arrays `[S]` under `paper` (also for a single slice, so
    rows go straight into a per-slice table), floats under `fastmri`.

  Raises:
    ValueError: As for `psnr`, `ssim` and `nmse`.
  """
  gt, pred, _ = prepare(gt_SHW, pred_SHW, protocol, with_ssim=True)
  return prepared_scores(gt, pred, protocol)


def summarize(values) -> tuple[float, float]:
  """Mean and population standard deviation (ddof 0) of a set of metric values.

  Args:
    values: A scalar, a sequence or an array of any shape; it is flattened.

  Returns:
    `(mean, std)` as floats.

  Raises:
    ValueError: If `values` is empty, not real-valued or holds NaN or inf (PSNR is +inf for a
      perfect reconstruction; such values need a decision by the caller, not a silent inf mean).
  """
  arr = np.asarray(values)
  if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"values must be real numbers, got dtype {arr.dtype}")
  arr = arr.astype(np.float64, copy=False).ravel()
  if arr.size == 0:
    raise ValueError("values is empty")
  if not np.isfinite(arr).all():
    raise ValueError("values contains non-finite entries (NaN or inf)")
  return float(arr.mean()), float(arr.std())
