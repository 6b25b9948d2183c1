"""Centred FFT conventions, multicoil operators and the six-level undersampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextaccel_jax.data import transforms as T


def _rand_complex(rng, shape):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _unit_rss_maps(rng, c, h, w):
  maps = _rand_complex(rng, (c, h, w))
  return (maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))).astype(np.complex64)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (16, 10)])
def test_fft2c_matches_fastmri_definition(shape):
  rng = np.random.default_rng(0)
  x = _rand_complex(rng, (2, *shape))
  # fastMRI: fftshift(fftn(ifftshift(x)), norm="ortho") over the two spatial axes.
  want = np.fft.fftshift(
    np.fft.fftn(np.fft.ifftshift(x, axes=(-2, -1)), axes=(-2, -1), norm="ortho"), axes=(-2, -1)
  )
  np.testing.assert_allclose(np.asarray(T.fft2c(jnp.asarray(x))), want, atol=1e-5)
  np.testing.assert_allclose(T.fft2c_np(x), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(T.ifft2c(T.fft2c(jnp.asarray(x)))), x, atol=1e-5)
  np.testing.assert_allclose(T.ifft2c_np(T.fft2c_np(x)), x, atol=1e-5)
  # Orthonormal: energy is preserved.
  assert np.sum(np.abs(want) ** 2) == pytest.approx(np.sum(np.abs(x) ** 2), rel=1e-5)


def test_dc_sits_at_centre():
  x = np.ones((6, 10), np.complex64)
  k = T.fft2c_np(x)
  assert np.argmax(np.abs(k)) == np.ravel_multi_index((3, 5), (6, 10))
  assert T.fft2c_np(x).dtype == np.complex64


def test_center_crop_offsets_and_errors():
  x = np.arange(7 * 9).reshape(7, 9)
  np.testing.assert_array_equal(T.center_crop(x, (3, 4)), x[2:5, 2:6])
  with pytest.raises(ValueError, match="cannot crop"):
    T.center_crop(x, (8, 4))


def test_channels_round_trip_and_rss():
  rng = np.random.default_rng(1)
  x = _rand_complex(rng, (3, 5, 4))
  ch = T.complex_to_channels(x)
  assert ch.shape == (3, 5, 4, 2) and ch.dtype == np.float32
  np.testing.assert_array_equal(T.channels_to_complex(ch), x)
  np.testing.assert_allclose(T.rss(x, 0), np.sqrt((np.abs(x) ** 2).sum(0)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(T.rss(jnp.asarray(x), 0)), T.rss(x, 0), rtol=1e-6)


def test_multicoil_adjoint_is_the_adjoint():
  rng = np.random.default_rng(2)
  x = jnp.asarray(_rand_complex(rng, (12, 10)))
  maps = jnp.asarray(_rand_complex(rng, (4, 12, 10)))
  mask = jnp.asarray(rng.random((12, 10)) < 0.4)
  y = jnp.asarray(_rand_complex(rng, (4, 12, 10))) * mask
  lhs = jnp.vdot(T.mc_forward(x, maps, mask), y)
  rhs = jnp.vdot(x, T.mc_adjoint(y, maps))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_undersample_levels_multicoil():
  rng = np.random.default_rng(3)
  h, w = 16, 16
  x = _rand_complex(rng, (h, w))
  maps = _unit_rss_maps(rng, 3, h, w)
  masks = np.zeros((5, h, w), bool)
  for k in range(5):
    masks[k, :, : 3 * (k + 1)] = True
  out = np.asarray(T.undersample_levels(x, maps, masks))
  assert out.shape == (6, h, w, 2) and out.dtype == np.float32
  np.testing.assert_allclose(out[-1], T.complex_to_channels(x), atol=1e-6)
  for k in range(5):
    want = np.sum(np.conj(maps) * T.ifft2c_np(masks[k] * T.fft2c_np(maps * x)), axis=0)
    np.testing.assert_allclose(T.channels_to_complex(out[k]), want, atol=1e-5)
  # A full mask with unit-RSS maps gives back the image: A^H A = I.
  full = np.asarray(T.undersample_levels(x, maps, np.ones((5, h, w), bool)))
  np.testing.assert_allclose(full[0], T.complex_to_channels(x), atol=1e-5)
  np.testing.assert_allclose(T.undersample_levels_np(x, maps, masks), out, atol=1e-5)


def test_undersample_levels_single_and_batched_under_jit():
  rng = np.random.default_rng(4)
  x = _rand_complex(rng, (2, 8, 8))
  maps = _unit_rss_maps(rng, 2, 8, 8)[None].repeat(2, 0)
  masks = rng.random((2, 5, 8, 8)) < 0.5
  single = np.asarray(jax.jit(T.undersample_levels_single)(x, masks))
  for b in range(2):
    for k in range(5):
      want = T.ifft2c_np(masks[b, k] * T.fft2c_np(x[b]))
      np.testing.assert_allclose(T.channels_to_complex(single[b, k]), want, atol=1e-5)
  np.testing.assert_allclose(T.undersample_levels_np(x, None, masks), single, atol=1e-5)
  multi = np.asarray(jax.jit(T.undersample_levels)(x, maps, masks))
  assert multi.shape == (2, 6, 8, 8, 2)
  for b in range(2):
    np.testing.assert_allclose(
      multi[b], T.undersample_levels_np(x[b], maps[b], masks[b]), atol=1e-5
    )
