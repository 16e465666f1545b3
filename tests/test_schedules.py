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


def test_shifted_cosine_is_a_shift():
  t = jnp.linspace(0.2, 0.8, 7)
  shift = 2 * np.log(32 / 64)
  # away from the clipped ends the shifted schedule is cosine + 2 log(noise_res / image_res)
  unclipped = -2.0 * jnp.log(jnp.tan(
      (jnp.arctan(jnp.exp(-0.5 * (-15 - shift))) - jnp.arctan(jnp.exp(-0.5 * (15 - shift))))
      * t + jnp.arctan(jnp.exp(-0.5 * (15 - shift))))) + shift
  np.testing.assert_allclose(schedules.shifted_cosine_logsnr(t, 64, 32), unclipped, rtol=1e-5)
  ends = schedules.shifted_cosine_logsnr(jnp.array([0.0, 1.0]), 64, 32)
  np.testing.assert_allclose(ends, [15.0, -15.0], atol=1e-3)


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
