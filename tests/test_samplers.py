"""DDIM / aDDIM identities and their behaviour on Gaussian data with the exact denoiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LOGSNR, gaussian_denoiser, gaussian_posterior_var
from mcm_jax import schedules
from mcm_jax.samplers import addim, baselines, dpm_solver


def _coeffs(t, s):
  return (*schedules.alpha_sigma(LOGSNR(t)), *schedules.alpha_sigma(LOGSNR(s)))


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 6, 3)])
def test_inv_ddim_inverts_ddim(shape):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x, z_t = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
  t = jax.random.uniform(k3, shape[:1], minval=0.3, maxval=1.0)
  coeffs = _coeffs(t, t - 0.2)
  z_s = addim.ddim_step(x, z_t, *coeffs)
  np.testing.assert_allclose(addim.inv_ddim(z_s, z_t, *coeffs), x, atol=2e-4, rtol=1e-4)


def test_addim_equals_ddim_when_x_var_zero_and_differs_otherwise():
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x, z_t = jax.random.normal(k1, (3, 8, 8)), jax.random.normal(k2, (3, 8, 8))
  coeffs = _coeffs(jnp.array([0.9, 0.5, 0.2]), jnp.array([0.6, 0.3, 0.0]))
  np.testing.assert_allclose(addim.addim_step(x, z_t, *coeffs, 0.0),
                             addim.ddim_step(x, z_t, *coeffs), atol=1e-6)
  adjusted = addim.addim_step(x, z_t, *coeffs, jnp.array([0.1, 0.1, 0.1]))
  assert float(jnp.max(jnp.abs(adjusted - addim.ddim_step(x, z_t, *coeffs)))) > 1e-2


def test_addim_tends_to_ddim_as_s_to_t():
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  x, z_t = jax.random.normal(k1, (2, 16)), jax.random.normal(k2, (2, 16))
  gaps = []
  for ds in (0.1, 0.01, 0.001):
    coeffs = _coeffs(jnp.full((2,), 0.5), jnp.full((2,), 0.5 - ds))
    gaps.append(float(jnp.max(jnp.abs(addim.addim_step(x, z_t, *coeffs, 0.2)
                                      - addim.ddim_step(x, z_t, *coeffs)))))
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4


def test_addim_jit_vmap_grad():
  x, z = jnp.ones((2, 3)), jnp.full((2, 3), 0.5)
  coeffs = _coeffs(jnp.array([0.7, 0.4]), jnp.array([0.5, 0.2]))
  jitted = jax.jit(addim.addim_step)(x, z, *coeffs, 0.05)
  np.testing.assert_allclose(jitted, addim.addim_step(x, z, *coeffs, 0.05), rtol=1e-6)
  per_example = jax.vmap(lambda xx, zz, *c: addim.addim_step(xx[None], zz[None], *c, 0.05)[0])(
      x, z, *coeffs)
  np.testing.assert_allclose(per_example, jitted, rtol=1e-5)
  g = jax.grad(lambda xx: jnp.sum(addim.addim_step(xx, z, *coeffs, 0.05) ** 2))(x)
  assert np.all(np.isfinite(g))


def test_ddim_with_exact_denoiser_reaches_data_variance():
  scale = 0.5
  z = jax.random.normal(jax.random.PRNGKey(3), (4096, 8))
  f = gaussian_denoiser(scale)
  variances = {n: float(jnp.var(addim.sample(f, z, n, LOGSNR))) for n in (2, 16, 256)}
  assert abs(variances[256] / scale ** 2 - 1) < 0.03
  # DDIM's missing variance: too small with few steps, approaching s^2 as steps grow.
  assert variances[2] < variances[16] < variances[256]
  assert variances[2] < 0.8 * scale ** 2


def _second_moments(t, s, scale=0.5, d=4096):
  """E||z_s||^2 / d after one DDIM and one aDDIM step (exact posterior x_var), over the target."""
  t, s = jnp.full((16,), t), jnp.full((16,), s)
  a_t, s_t, a_s, s_s = _coeffs(t, s)
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  x = scale * jax.random.normal(k1, (16, d))
  z_t = addim.bcast(a_t, x) * x + addim.bcast(s_t, x) * jax.random.normal(k2, (16, d))
  x_hat = gaussian_denoiser(scale)(z_t, t)
  target = float(a_s[0] ** 2 * scale ** 2 + s_s[0] ** 2)  # E||z_s||^2 / d under the data
  ddim = float(jnp.mean(addim.ddim_step(x_hat, z_t, a_t, s_t, a_s, s_s) ** 2))
  x_var = gaussian_posterior_var(scale, a_t, s_t)
  adj = float(jnp.mean(addim.addim_step(x_hat, z_t, a_t, s_t, a_s, s_s, x_var) ** 2))
  return ddim / target, adj / target


@pytest.mark.parametrize("s", [0.5, 0.0])
def test_one_addim_step_from_noise_restores_second_moment(s):
  # From t = 1, x_hat ~ 0 is orthogonal to eps_hat, aDDIM's assumption: exact up to sampling.
  ddim, adj = _second_moments(1.0, s)
  assert abs(adj - 1) < 0.01
  assert ddim < 0.85  # DDIM collapses the variance (to ~0 for a single step to s = 0)


def test_one_addim_step_mid_trajectory_is_much_closer_than_ddim():
  # For isotropic Gaussian data x_hat is parallel to eps_hat, so aDDIM's orthogonality
  # assumption is off and it overshoots slightly (~2%); DDIM undershoots by ~24%.
  ddim, adj = _second_moments(0.9, 0.4)
  assert abs(adj - 1) < 0.1 * abs(ddim - 1)
  assert ddim < 0.8


def test_analytic_x_var_and_table():
  alpha, sigma = schedules.alpha_sigma(jnp.array([0.0]))
  np.testing.assert_allclose(addim.analytic_x_var(alpha, sigma), 0.1 / 3.0, rtol=1e-6)
  fn = addim.table_x_var(jnp.array([0.0, 1.0]), jnp.array([0.0, 2.0]))
  np.testing.assert_allclose(fn(jnp.array([0.25]), None, None), [0.5])


def test_estimate_x_var_table_matches_gaussian_posterior():
  scale = 0.5
  data = scale * jax.random.normal(jax.random.PRNGKey(5), (8192, 4))
  t_grid, table = addim.estimate_x_var_table(gaussian_denoiser(scale), data, LOGSNR,
                                             jax.random.PRNGKey(6), num_t=8, eta=0.75)
  expected = 0.75 * gaussian_posterior_var(scale, *schedules.alpha_sigma(LOGSNR(t_grid)))
  np.testing.assert_allclose(table, expected, rtol=0.05)


def test_sampler_jits_once_for_any_step_count():
  traces = []

  def f(z, t):
    traces.append(1)
    return 0.5 * z

  run = jax.jit(lambda z, n: addim.sample(f, z, n, LOGSNR, addim.analytic_x_var_fn))
  z = jnp.ones((2, 3))
  outs = [run(z, n) for n in (1, 4, 8)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[2])


def test_trajectory_shape_and_last_step_returns_x_hat():
  f = gaussian_denoiser(0.5)
  z = jax.random.normal(jax.random.PRNGKey(7), (5, 2))
  x, traj = addim.sample(f, z, 4, LOGSNR, return_trajectory=True)
  assert traj.shape == (5, 5, 2)
  np.testing.assert_allclose(traj[0], z)
  np.testing.assert_allclose(x, f(traj[3], jnp.full((5,), 0.25)), rtol=1e-5)
  np.testing.assert_allclose(x, addim.consistency_sample(f, z, 4, LOGSNR), rtol=1e-6)


def test_ancestral_sampling_reaches_data_variance_and_is_stochastic():
  scale = 0.5
  z = jax.random.normal(jax.random.PRNGKey(8), (4096, 8))
  f = gaussian_denoiser(scale)
  run = lambda n, seed: baselines.ancestral_sample(f, z, n, LOGSNR, jax.random.PRNGKey(seed))
  v = {n: float(jnp.var(run(n, 9))) for n in (4, 64, 1024)}
  assert v[4] < v[64] < v[1024] and abs(v[1024] / scale ** 2 - 1) < 0.05
  assert float(jnp.mean(jnp.abs(run(64, 9) - run(64, 10)))) > 0.05


def test_noise_ddim_is_ddim_of_a_noised_prediction():
  """One noise-DDIM step (MCM App. A.4): z_s ~ N(DDIM(x_hat), (alpha_s - alpha_t sigma_s /
  sigma_t)^2 x_var) per dimension -- the variance aDDIM restores deterministically. With the
  exact Gaussian posterior variance as x_var its second moment matches aDDIM's."""
  scale, d, n = 0.5, 8, 200_000
  t, s = 0.8, 0.4
  z_t = jax.random.normal(jax.random.PRNGKey(1), (1, d))
  z_t = jnp.broadcast_to(z_t, (n, d))
  a_t, s_t, a_s, s_s = _coeffs(jnp.full((n,), t), jnp.full((n,), s))
  x_var = gaussian_posterior_var(scale, a_t[0], s_t[0])
  f = gaussian_denoiser(scale)
  table = lambda tt, a, sg: gaussian_posterior_var(scale, a, sg)
  x_hat = f(z_t, jnp.full((n,), t))
  rng = jax.random.PRNGKey(2)
  xi = jax.random.normal(jax.random.fold_in(rng, 0), z_t.shape)
  one = addim.ddim_step(x_hat + jnp.sqrt(x_var) * xi, z_t, a_t, s_t, a_s, s_s)
  mean = addim.ddim_step(x_hat, z_t, a_t, s_t, a_s, s_s)
  coef = float(a_s[0] - a_t[0] * s_s[0] / s_t[0])
  np.testing.assert_allclose(jnp.mean(one, 0), mean[0], atol=5 * coef * np.sqrt(x_var / n))
  np.testing.assert_allclose(jnp.var(one, 0), coef ** 2 * x_var, rtol=0.02)
  # The sampler is that recipe: N = 2 is one noised DDIM step 1 -> 0.5, then x_hat at 0.5.
  z1 = jax.random.normal(jax.random.PRNGKey(3), (n, d))
  got = baselines.noise_ddim_sample(f, z1, 2, LOGSNR, rng, table)
  a1, s1, a5, s5 = _coeffs(jnp.ones((n,)), jnp.full((n,), 0.5))
  xi0 = jax.random.normal(jax.random.fold_in(rng, 0), z1.shape)
  z_half = addim.ddim_step(f(z1, jnp.ones((n,))) + jnp.sqrt(
      gaussian_posterior_var(scale, a1[0], s1[0])) * xi0, z1, a1, s1, a5, s5)
  np.testing.assert_allclose(got, f(z_half, jnp.full((n,), 0.5)), rtol=1e-5, atol=1e-5)
  # Second moment over the data: noise DDIM and aDDIM (same x_var) agree, DDIM falls short.
  x = scale * jax.random.normal(jax.random.PRNGKey(4), (n, d))
  z = addim.bcast(a_t, x) * x + addim.bcast(s_t, x) * jax.random.normal(jax.random.PRNGKey(5),
                                                                        (n, d))
  x_hat = f(z, jnp.full((n,), t))
  noisy = addim.ddim_step(x_hat + jnp.sqrt(x_var) * jax.random.normal(rng, z.shape), z, a_t,
                          s_t, a_s, s_s)
  adjusted = addim.addim_step(x_hat, z, a_t, s_t, a_s, s_s, x_var)
  target = float(a_s[0] ** 2 * scale ** 2 + s_s[0] ** 2)
  assert abs(float(jnp.mean(noisy ** 2)) / target - 1) < 0.01
  assert abs(float(jnp.mean(noisy ** 2)) / float(jnp.mean(adjusted ** 2)) - 1) < 0.03
  assert float(jnp.mean(addim.ddim_step(x_hat, z, a_t, s_t, a_s, s_s) ** 2)) / target < 0.95


def test_heun_is_second_order_and_ddim_first_order():
  z = jax.random.normal(jax.random.PRNGKey(8), (4096, 8))
  f = gaussian_denoiser(0.5)
  exact = addim.sample(f, z, 4096, LOGSNR)
  err = lambda x: float(jnp.mean(jnp.abs(x - exact)))
  heun = [err(baselines.heun_sample(f, z, n, LOGSNR)) for n in (16, 32)]
  ddim = [err(addim.sample(f, z, n, LOGSNR)) for n in (16, 32)]
  assert heun[0] / heun[1] > 3.0      # measured ~8x per doubling
  assert 1.5 < ddim[0] / ddim[1] < 2.5  # measured ~2x per doubling
  assert heun[1] < ddim[1]


def test_grid_sampler_is_the_uniform_sampler_and_samples_the_sdxl_schedule():
  """``sample_on_grid`` (what MLCM / SDXL sampling runs) equals ``sample`` on the uniform grid,
  and with the exact Gaussian denoiser on SDXL's discrete schedule (time = timestep) many DDIM
  steps from the exact z_999 marginal reach the data variance, two steps do not."""
  f, z = gaussian_denoiser(0.5), jax.random.normal(jax.random.PRNGKey(6), (512, 8))
  for x_var_fn in (None, addim.analytic_x_var_fn):
    np.testing.assert_allclose(addim.sample_on_grid(f, z, np.linspace(1, 0, 9), LOGSNR, x_var_fn),
                               addim.sample(f, z, 8, LOGSNR, x_var_fn), rtol=1e-5, atol=1e-6)
  scale, logsnr = 0.5, schedules.sdxl_logsnr
  a, s = schedules.alpha_sigma(logsnr(999))
  z = jnp.sqrt(a ** 2 * scale ** 2 + s ** 2) * jax.random.normal(jax.random.PRNGKey(7), (4096, 8))
  g = gaussian_denoiser(scale, logsnr)
  grids = {n: np.round(np.linspace(999, 0, n + 1)) for n in (2, 333)}
  variance = {n: float(jnp.var(addim.sample_on_grid(g, z, grid, logsnr)))
              for n, grid in grids.items()}
  # The last step returns E[x | z_t] at t = grid[-2] (timestep 3): Var = scale^2 - posterior var.
  a, s = schedules.alpha_sigma(logsnr(grids[333][-2]))
  expected = scale ** 2 - gaussian_posterior_var(scale, a, s)
  assert abs(variance[333] / expected - 1) < 0.02, (variance, expected)
  assert variance[2] < 0.8 * scale ** 2, variance


def test_dpm_solver_2m_is_second_order_and_ddim_first_order():
  """DPM-Solver++(2M) on the pixel schedule (``--config.sample.sampler=dpmpp_2m``) against the
  exact probability-flow ODE of Gaussian data x ~ N(0, c^2): z_t = z_1 sqrt(alpha_t^2 c^2 +
  sigma_t^2) / sqrt(alpha_1^2 c^2 + sigma_1^2), and each N-step sampler returns x_hat(z_{1/N}).
  From 64 steps on the error falls ~3x per doubling of the steps (4x in the limit), DDIM's ~2x."""
  scale = 0.5
  z = jax.random.normal(jax.random.PRNGKey(8), (4096, 8))
  f = gaussian_denoiser(scale)
  spread = lambda t: jnp.sqrt(jnp.sum(jnp.square(jnp.stack(
      schedules.alpha_sigma(LOGSNR(jnp.full((1,), t)))) * jnp.array([[scale], [1.0]]))))

  def err(x, n):
    z_last = z * spread(1.0 / n) / spread(1.0)
    return float(jnp.mean(jnp.abs(x - f(z_last, jnp.full((4096,), 1.0 / n)))))

  steps = (8, 64, 128, 256)
  dpm = [err(dpm_solver.dpmpp_2m_sample(f, z, n, LOGSNR), n) for n in steps]
  ddim = [err(addim.sample(f, z, n, LOGSNR), n) for n in steps]
  assert dpm[1] / dpm[2] > 2.7 and dpm[2] / dpm[3] > 3.0, dpm  # measured 3.0, 3.3
  assert 1.8 < ddim[2] / ddim[3] < 2.2, ddim
  assert all(d < 0.25 * e for d, e in zip(dpm, ddim)), (dpm, ddim)


@pytest.mark.parametrize("sampler", ["ddim", "lcm", "tcd", "dpmpp_2m", "dpmpp_2s"])
def test_grid_samplers_trace_the_model_a_fixed_number_of_times(sampler):
  """Every SDXL grid sampler steps in one ``lax.scan``: the model is traced as often for a
  25-step grid as for a 2-step one (once; DPM-Solver++(2S): its step's two calls and the last
  step's), so a many-step sampler compiles one model call, not one per step."""
  from mcm_jax.samplers import discrete  # pylint: disable=g-import-not-at-top
  traced = {}
  for steps in (2, 25):
    calls = []

    def f(z, t, calls=calls):
      calls.append(t)
      return gaussian_denoiser(0.5, schedules.sdxl_logsnr)(z, t)

    out = jax.jit(lambda z, key: discrete.sample(f, z, steps, sampler, key))(
        jnp.ones((2, 3)), jax.random.PRNGKey(0))
    assert np.all(np.isfinite(out))
    traced[steps] = len(calls)
  assert traced[25] == traced[2] <= 3, traced
