import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcm_jax import schedules


def test_cosine_endpoints_and_monotone():
  t = jnp.linspace(0.0, 1.0, 101)
  logsnr = schedules.cosine_logsnr(t, -15.0, 15.0)
  np.testing.assert_allclose([logsnr[0], logsnr[-1]], [15.0, -15.0], atol=1e-3)
  assert np.all(np.diff(np.asarray(logsnr)) < 0)
  assert abs(float(schedules.cosine_logsnr(0.5))) < 1e-5  # tan(pi/4) = 1 when symmetric


def test_alpha_sigma_variance_preserving():
  alpha, sigma = schedules.alpha_sigma(jnp.linspace(-20, 20, 41))
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, atol=1e-6)
  np.testing.assert_allclose(jnp.log(alpha ** 2 / sigma ** 2), jnp.linspace(-20, 20, 41),
                             atol=1e-3)


def _simple_diffusion(t, image_res, noise_res, lo=-15.0, hi=15.0):
  """Simple diffusion's published formula, in numpy: the clipped cosine, then the shift."""
  t_min, t_max = np.arctan(np.exp(-0.5 * hi)), np.arctan(np.exp(-0.5 * lo))
  return (-2.0 * np.log(np.tan(t_min + np.asarray(t, np.float64) * (t_max - t_min)))
          + 2.0 * np.log(noise_res / image_res))


def test_shifted_cosine_is_simple_diffusions_formula():
  t = np.array([0.0, 0.2, 0.5, 0.8, 1.0])
  np.testing.assert_allclose(schedules.shifted_cosine_logsnr(t, 64, 32),
                             _simple_diffusion(t, 64, 32), rtol=1e-5, atol=1e-4)
  ends = schedules.shifted_cosine_logsnr(jnp.array([0.0, 1.0]), 64, 32)
  np.testing.assert_allclose(ends, [15.0 + 2 * np.log(0.5), -15.0 + 2 * np.log(0.5)],
                             atol=1e-3)  # 13.61, -16.39: the range moves with the shift
  # ImageNet128's interpolated schedule at t = 1 is the 32/128 shifted one: -17.77.
  np.testing.assert_allclose(schedules.interpolated_cosine_logsnr(1.0, 128, 32, 128),
                             -15.0 + 2 * np.log(32 / 128), atol=1e-3)
  # The former behaviour, as an option: shifted, then kept inside [-15, 15].
  kept = schedules.shifted_cosine_logsnr(jnp.array([0.0, 1.0]), 64, 32, clip_after_shift=True)
  np.testing.assert_allclose(kept, [15.0, -15.0], atol=1e-3)


def test_interpolated_cosine_endpoints():
  t = jnp.array([0.0, 1.0])
  lo = schedules.shifted_cosine_logsnr(t, 64, 32)
  hi = schedules.shifted_cosine_logsnr(t, 64, 64)
  got = schedules.interpolated_cosine_logsnr(t, 64, 32, 64)
  np.testing.assert_allclose(got, [hi[0], lo[1]], atol=1e-5)
  mid = schedules.interpolated_cosine_logsnr(0.5, 64, 32, 64)
  np.testing.assert_allclose(mid, 0.5 * (schedules.shifted_cosine_logsnr(0.5, 64, 32)
                                         + schedules.shifted_cosine_logsnr(0.5, 64, 64)),
                             rtol=1e-6)


def test_sdxl_constants():
  alphas, sigmas = schedules.sdxl_alphas_sigmas()
  assert alphas.shape == sigmas.shape == (1000,)
  np.testing.assert_allclose(alphas[999], 0.068265, atol=2e-6)
  np.testing.assert_allclose(sigmas[999], 0.99767, atol=1e-5)
  np.testing.assert_allclose(alphas[0] ** 2, 1 - 0.00085, rtol=1e-6)
  np.testing.assert_allclose(alphas ** 2 + sigmas ** 2, 1.0, atol=1e-6)


def test_unknown_schedule_names_the_value():
  with pytest.raises(ValueError, match="schedule='linear'.*cosine"):
    schedules.get_logsnr_fn("linear")


def test_schedules_grad_finite():
  g = jax.grad(lambda t: schedules.interpolated_cosine_logsnr(t, 64, 32, 64))(0.3)
  assert np.isfinite(g) and g < 0
