"""Differentiable image losses and in-graph metrics on explicit arrays (decisions.md §3).

Every function here is pure, takes plain arrays and casts to float32 itself, so it can run inside a
jitted step whatever the compute dtype of the model (style.md §2 "Losses").

Shape legend: B batch, H×W image grid; a trailing 2 holds (real, imaginary).

`ssim` reproduces scikit-image's `structural_similarity` (and so
`nextaccel_jax.evaluation.metrics.ssim`) value for value. scikit-image filters the whole image with
'reflect' padding and then drops `(win - 1) // 2` pixels at every border; the positions it keeps are
exactly those whose window lies inside the image, so a 'valid' convolution gives the same map
without any padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Stability constants of Wang et al. 2004, scikit-image's defaults.
_K1 = 0.01
_K2 = 0.03
# scikit-image fixes the Gaussian truncation at 3.5 sigma whenever `gaussian_weights=True`.
_GAUSSIAN_TRUNCATE = 3.5
_UNIFORM_SIZE = 7


def _gaussian_taps(sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian weights with ndimage's radius rule `int(truncate * sigma + 0.5)`."""
  radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def _window_taps(gaussian: bool, sigma: float, win_size: int | None) -> np.ndarray:
  """The separable 1-D window that scikit-image applies along each image axis."""
  if gaussian:
    taps = _gaussian_taps(sigma)
    # scikit-image would filter with the Gaussian but crop and normalise with `win_size`; a
    # mismatch is almost certainly a mistake, so it is refused instead of reproduced.
    if win_size is not None and win_size != taps.size:
      raise ValueError(
        f"win_size={win_size} disagrees with the {taps.size}-tap Gaussian window of sigma={sigma}; "
        "leave win_size as None with gaussian=True"
      )
    return taps
  size = _UNIFORM_SIZE if win_size is None else int(win_size)
  if size < 1 or size % 2 == 0:
    raise ValueError(f"win_size must be a positive odd number, got {win_size}")
  return np.full(size, 1.0 / size)


def _filter_valid(maps_NHW: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable window mean, kept only where the window lies inside the image.

  Args:
    maps_NHW: float32 images `[N, H, W]`.
    taps: 1-D window weights of odd length K.

  Returns:
    `[N, H - K + 1, W - K + 1]` float32.
  """
  k = jnp.asarray(taps, jnp.float32)
  lhs = maps_NHW[:, None]
  dims = ("NCHW", "OIHW", "NCHW")
  # HIGHEST keeps accelerators from running the filter in bf16 passes, which would cost SSIM its
  # third decimal.
  rows = jax.lax.conv_general_dilated(
    lhs,
    k.reshape(1, 1, 1, -1),
    (1, 1),
    "VALID",
    dimension_numbers=dims,
    precision=jax.lax.Precision.HIGHEST,
  )
  out = jax.lax.conv_general_dilated(
    rows,
    k.reshape(1, 1, -1, 1),
    (1, 1),
    "VALID",
    dimension_numbers=dims,
    precision=jax.lax.Precision.HIGHEST,
  )
  return out[:, 0]


def _per_sample(value, batch: int) -> jax.Array:
  """A scalar or `[B]` value as a float32 `[B, 1, 1]` array."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    value = jnp.broadcast_to(value, (batch,))
  if value.shape != (batch,):
    raise ValueError(f"data_range must be a scalar or have shape ({batch},), got {value.shape}")
  return value[:, None, None]


def _ssim_map(
  x_BHW: jax.Array,
  y_BHW: jax.Array,
  data_range,
  *,
  gaussian: bool = True,
  sigma: float = 1.5,
  win_size: int | None = None,
  k1: float = _K1,
  k2: float = _K2,
  use_sample_covariance: bool | None = None,
) -> jax.Array:
  """The SSIM map at every position whose window fits inside the image, `[B, H', W']` float32."""
  x = jnp.asarray(x_BHW, jnp.float32)
  y = jnp.asarray(y_BHW, jnp.float32)
  if x.shape != y.shape or x.ndim != 3:
    raise ValueError(f"expected two [B, H, W] arrays of equal shape, got {x.shape} and {y.shape}")
  taps = _window_taps(gaussian, sigma, win_size)
  if min(x.shape[1:]) < taps.size:
    raise ValueError(f"images {x.shape[1:]} are smaller than the {taps.size}² SSIM window")
  if use_sample_covariance is None:
    use_sample_covariance = not gaussian
  n_px = taps.size**2
  cov_norm = n_px / (n_px - 1) if use_sample_covariance else 1.0

  # Second moments minus squared means cancel badly in float32 at MRI's tiny intensities. Both
  # are invariant to a constant shift, so they are computed on images centred on their own
  # means; the means themselves are shifted back afterwards.
  x_mean = x.mean(axis=(1, 2), keepdims=True)
  y_mean = y.mean(axis=(1, 2), keepdims=True)
  xc, yc = x - x_mean, y - y_mean
  b = x.shape[0]
  stacked = jnp.concatenate([xc, yc, xc * xc, yc * yc, xc * yc], axis=0)
  mu_xc, mu_yc, e_xx, e_yy, e_xy = jnp.split(_filter_valid(stacked, taps), 5, axis=0)
  var_x = cov_norm * (e_xx - mu_xc * mu_xc)
  var_y = cov_norm * (e_yy - mu_yc * mu_yc)
  cov_xy = cov_norm * (e_xy - mu_xc * mu_yc)
  mu_x = mu_xc + x_mean
  mu_y = mu_yc + y_mean

  dr = _per_sample(data_range, b)
  c1 = (k1 * dr) ** 2
  c2 = (k2 * dr) ** 2
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return num / den


def ssim(
  x_BHW: jax.Array,
  y_BHW: jax.Array,
  data_range,
  *,
  gaussian: bool = True,
  sigma: float = 1.5,
  win_size: int | None = None,
  k1: float = _K1,
  k2: float = _K2,
  use_sample_covariance: bool | None = None,
  crop_border: bool = True,
) -> jax.Array:
  """Mean structural similarity per image, equal to scikit-image's `structural_similarity`.

  Args:
    x_BHW: Real images `[B, H, W]`, any float dtype.
    y_BHW: Real images of the same shape.
    data_range: Scalar or per-image `[B]` value range; it sets the constants
      `c1 = (k1 · data_range)²` and `c2 = (k2 · data_range)²` and must be positive.
    gaussian: True: Gaussian window of `sigma`, truncated at 3.5 sigma (11×11 for sigma 1.5), the
      `paper` protocol. False: `win_size`×`win_size` uniform window (7×7 by default), the
      `fastmri` protocol.
    sigma: Standard deviation of the Gaussian window.
    win_size: Size of the uniform window; with `gaussian=True` it must be None or the Gaussian's
      own size.
    k1: Luminance constant.
    k2: Contrast constant.
    use_sample_covariance: Normalise (co)variances by `n / (n − 1)` for an `n`-pixel window. None
      picks what the matching protocol uses: population covariance for the Gaussian window,
      sample covariance for the uniform one. (scikit-image's own default is True for both.)
    crop_border: True averages the map only where the window lies inside the image, as
      scikit-image does. False also counts the border, with scikit-image's 'reflect' padding.

  Returns:
    float32 `[B]`.
  """
  if crop_border:
    return _ssim_map(
      x_BHW,
      y_BHW,
      data_range,
      gaussian=gaussian,
      sigma=sigma,
      win_size=win_size,
      k1=k1,
      k2=k2,
      use_sample_covariance=use_sample_covariance,
    ).mean(axis=(1, 2))
  # The uncropped map needs the border positions too: padding symmetrically by the radius is
  # ndimage's 'reflect' mode, after which the 'valid' map covers every pixel.
  radius = _window_taps(gaussian, sigma, win_size).size // 2
  pad = ((0, 0), (radius, radius), (radius, radius))
  x_pad = jnp.pad(jnp.asarray(x_BHW, jnp.float32), pad, mode="symmetric")
  y_pad = jnp.pad(jnp.asarray(y_BHW, jnp.float32), pad, mode="symmetric")
  return _ssim_map(
    x_pad,
    y_pad,
    data_range,
    gaussian=gaussian,
    sigma=sigma,
    win_size=win_size,
    k1=k1,
    k2=k2,
    use_sample_covariance=use_sample_covariance,
  ).mean(axis=(1, 2))


def ssim_loss(pred_BHW: jax.Array, target_BHW: jax.Array) -> jax.Array:
  """`1 − mean SSIM` with the `paper` protocol's window (Gaussian, sigma 1.5, population cov).

  The data range of each pair is the target's own maximum (treated as a constant; an image with
  no positive value uses 1). Unlike the `paper` evaluation, the prediction is *not* divided by
  its own maximum: that normalisation makes SSIM blind to a global intensity error, which a
  training loss must penalise.

  Args:
    pred_BHW: Predicted magnitudes `[B, H, W]`.
    target_BHW: Target magnitudes `[B, H, W]`.

  Returns:
    float32 scalar; 0 for identical images.
  """
  target = jnp.asarray(target_BHW, jnp.float32)
  peak = jax.lax.stop_gradient(target.max(axis=(1, 2)))
  data_range = jnp.where(peak > 0, peak, 1.0)
  return 1.0 - ssim(pred_BHW, target, data_range, gaussian=True, sigma=1.5).mean()


def magnitude(x_BHW2: jax.Array) -> jax.Array:
  """`|re + i·im|` of a two-channel complex image, with a zero (not NaN) gradient at 0.

  Args:
    x_BHW2: `[..., 2]` real and imaginary parts.

  Returns:
    float32 `[...]`.
  """
  x = jnp.asarray(x_BHW2, jnp.float32)
  sq = jnp.sum(x * x, axis=-1)
  nonzero = sq > 0
  # sqrt's derivative is infinite at 0 and `where` still differentiates the unused branch, so the
  # square root only ever sees positive numbers.
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def psnr(pred: jax.Array, target: jax.Array, data_range) -> jax.Array:
  """Peak signal-to-noise ratio in dB per sample, `10 · log10(data_range² / MSE)`.

  Args:
    pred: `[B, ...]` predictions.
    target: `[B, ...]` targets of the same shape.
    data_range: Scalar or `[B]` peak value.

  Returns:
    float32 `[B]`; +inf where the prediction is exact.
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if pred.shape != target.shape:
    raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
  axes = tuple(range(1, pred.ndim))
  mse = jnp.mean((pred - target) ** 2, axis=axes)
  dr = jnp.broadcast_to(jnp.asarray(data_range, jnp.float32), mse.shape)
  return 10.0 * jnp.log10(dr * dr / mse)


def l1_magnitude(pred_BHW2: jax.Array, target_BHW2: jax.Array) -> jax.Array:
  """Mean absolute error of the magnitudes (the authors' MambaRecon loss), in float32.

  SSIM's gradient is weak on the global intensity a freshly initialised autoencoder gets wrong
  first; this term pulls it into range quickly and is off (weight 0) in the paper preset.
  """
  pred = magnitude(pred_BHW2.astype(jnp.float32))
  target = magnitude(target_BHW2.astype(jnp.float32))
  return jnp.mean(jnp.abs(pred - target))


def _gan_logits(logits: jax.Array, reduce: str) -> jax.Array:
  """float32 logits, averaged to one per image first when `reduce == "image"`."""
  x = jnp.asarray(logits, jnp.float32)
  if reduce == "image":
    return x.reshape(x.shape[0], -1).mean(axis=1)
  if reduce != "tokens":
    raise ValueError(f"reduce must be 'tokens' or 'image', got {reduce!r}")
  return x


def lsgan_d_loss(real_logits: jax.Array, fake_logits: jax.Array, reduce: str = "tokens"):
  """Least-squares discriminator loss `½·mean((D(real) − 1)²) + ½·mean(D(fake)²)`.

  Args:
    real_logits, fake_logits: `[B, ...]` discriminator outputs (e.g. `[B, K·L]` token logits of
      the projected discriminator), from separate calls on the real and fake batch.
    reduce: "tokens" averages over batch × tokens (the patch-GAN reading, the default);
      "image" first averages each image's logits into one prediction
      (biomedclip_lpips_spec.md §3.3).

  Returns:
    A float32 scalar.
  """
  real = _gan_logits(real_logits, reduce)
  fake = _gan_logits(fake_logits, reduce)
  return 0.5 * jnp.mean(jnp.square(real - 1.0)) + 0.5 * jnp.mean(jnp.square(fake))


def lsgan_g_loss(fake_logits: jax.Array, reduce: str = "tokens"):
  """Least-squares generator loss `mean((D(fake) − 1)²)`, float32 scalar; the caller weights it
  (0.1 in the paper's stage-1 loss). `reduce` as in `lsgan_d_loss`."""
  return jnp.mean(jnp.square(_gan_logits(fake_logits, reduce) - 1.0))


# --------------------------------------------------------------------------------------------------
# Distillation (decisions.md §5)

KL_DIRECTIONS = ("reverse", "forward")


def token_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Exact `KL(p ‖ q)` per position over the whole vocabulary (last axis), float32.

  Computed from log-softmaxes so that near-zero probabilities do not underflow into `0 · log 0`.
  """
  log_p = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distillation_kl(
  student_logits_BLV: jax.Array,
  teacher_logits_BLV: jax.Array,
  layout,
  direction: str = "reverse",
) -> tuple[jax.Array, dict]:
  """Mean over scales of the token-mean KL between student and teacher.

  Args:
    student_logits_BLV, teacher_logits_BLV: logits over the same positions.
    layout: `(begin, end)` of each scale in the sequence (`transformer.sequence_layout`).
    direction: "reverse" is `KL(p_student ‖ p_teacher)` (mode seeking, the paper's objective);
      "forward" is `KL(p_teacher ‖ p_student)` (the ablation).

  Returns:
    `(loss, aux)`; aux holds the per-position `kl_BL` and `kl_scales` (one scalar per scale).
    Every scale weighs the same whatever its token count, so the coarse scales, which set the
    image's structure, are not drowned by the 256 tokens of the finest one.
  """
  if direction not in KL_DIRECTIONS:
    raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
  if direction == "reverse":
    kl_BL = token_kl(student_logits_BLV, teacher_logits_BLV)
  else:
    kl_BL = token_kl(teacher_logits_BLV, student_logits_BLV)
  kl_scales = [jnp.mean(kl_BL[:, b:e]) for b, e in layout]
  return jnp.mean(jnp.stack(kl_scales)), {"kl_BL": kl_BL, "kl_scales": kl_scales}
