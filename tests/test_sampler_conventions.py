"""The sampling conventions users meet with published LCM / TLCM / MLCM LoRAs, checked against
diffusers' own schedulers on the same epsilon function and noise: the timestep grids, LCM's
re-noising multistep sampler (LCMScheduler) and deterministic DDIM jumps between given
timesteps (EulerDiscreteScheduler with custom timesteps)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcm_jax import parameterization, schedules
from mcm_jax.samplers import addim, discrete

SDXL_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def eps_np(z, t):
  """A smooth, non-trivial epsilon model (elementwise, so any layout works)."""
  return np.tanh(0.7 * z + t / 1000.0) + 0.1 * np.sin(3.0 * z)


def denoiser():
  eps = lambda params, z, t, cond, rng: jnp.tanh(0.7 * z + t[:, None, None, None] / 1000.0) + (
      0.1 * jnp.sin(3.0 * z))
  f = parameterization.make_denoiser(eps, schedules.sdxl_logsnr, "eps", time_input="t")
  return lambda z, t: f(None, z, t)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
def test_grids_equal_diffusers(steps):
  diffusers = pytest.importorskip("diffusers")
  lcm = diffusers.LCMScheduler(**SDXL_SCHEDULE)
  lcm.set_timesteps(steps)
  np.testing.assert_array_equal(discrete.timestep_grid(steps, "lcm")[:-1], lcm.timesteps.numpy())
  euler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULE, timestep_spacing="trailing")
  euler.set_timesteps(steps)
  np.testing.assert_array_equal(discrete.timestep_grid(steps, "trailing")[:-1],
                                euler.timesteps.numpy())
  leading = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULE, timestep_spacing="leading",
                                             steps_offset=1)  # SDXL base's scheduler config
  leading.set_timesteps(steps)
  np.testing.assert_array_equal(discrete.timestep_grid(steps, "leading")[:-1],
                                leading.timesteps.numpy())
  assert discrete.timestep_grid(4).tolist() == [999, 750, 500, 250, 0]  # MLCM's segment milestones


@pytest.mark.slow
def test_lcm_sampler_equals_diffusers_lcm_scheduler():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.LCMScheduler(**SDXL_SCHEDULE)
  scheduler.set_timesteps(4)
  z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
  gen = torch.Generator().manual_seed(1)
  z, torch_steps = z0.clone(), []
  for t in scheduler.timesteps:
    eps = torch.from_numpy(eps_np(z.numpy(), float(t)).astype(np.float32))
    z, denoised = scheduler.step(eps, t, z, generator=gen, return_dict=False)
    torch_steps.append(denoised.numpy())
  # The same fresh noise diffusers drew (randn_tensor -> torch.randn with that generator).
  gen = torch.Generator().manual_seed(1)
  noise = np.stack([torch.randn(SHAPE, generator=gen).numpy() for _ in range(3)])
  f = discrete.lcm_boundary(denoiser())
  grid = discrete.timestep_grid(4, "lcm")
  for k in range(1, 5):  # step by step: the first k steps' denoised output
    out = addim.renoise_sample_on_grid(f, jnp.asarray(z0.numpy()), np.append(grid[:k], 0),
                                       schedules.sdxl_logsnr, jnp.asarray(noise))
    np.testing.assert_allclose(out, torch_steps[k - 1], rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(torch_steps[-1], z.numpy())  # the last step returns x_hat


@pytest.mark.slow
def test_ddim_jumps_equal_diffusers_euler_with_custom_timesteps():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  timesteps = [999, 749, 499, 124]
  scheduler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULE)
  scheduler.set_timesteps(timesteps=timesteps)
  noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
  latents = noise * scheduler.init_noise_sigma
  for t in scheduler.timesteps:
    model_in = scheduler.scale_model_input(latents, t)
    eps = torch.from_numpy(eps_np(model_in.numpy(), float(t)).astype(np.float32))
    latents = scheduler.step(eps, t, latents, return_dict=False)[0]
  # diffusers scales its first latents by init_noise_sigma (= sigma_max for 'linspace'), so the
  # first model input is noise * sigma_max / sqrt(sigma_max^2 + 1): start from that same z_999.
  z_999 = noise * scheduler.init_noise_sigma / (scheduler.sigmas[0] ** 2 + 1) ** 0.5
  ours = discrete.sample(denoiser(), jnp.asarray(z_999.numpy()), discrete.explicit_grid(timesteps))
  np.testing.assert_allclose(ours, latents.numpy(), rtol=1e-4, atol=2e-4)


def test_explicit_grids_are_checked_and_samplers_named():
  assert discrete.explicit_grid([999, 749, 499, 124]).tolist() == [999, 749, 499, 124, 0]
  for bad in ([999, 999, 10], [1000, 500], [500, 0], [], [10.5]):
    with pytest.raises(ValueError, match="strictly decreasing integers"):
      discrete.explicit_grid(bad)
  with pytest.raises(ValueError, match="allowed: .*'trailing'"):
    discrete.timestep_grid(4, "karras")
  noise = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  with pytest.raises(ValueError, match="sampler='heun' is not known"):
    discrete.sample(denoiser(), noise, 2, "heun")
  # LCM sampling is stochastic between steps, the same for the same rng, and one step is DDIM.
  f = denoiser()
  a, b = (discrete.sample(f, noise, 4, "lcm", jax.random.PRNGKey(k)) for k in (1, 2))
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(a, discrete.sample(f, noise, 4, "lcm", jax.random.PRNGKey(1)))
  np.testing.assert_allclose(discrete.sample(f, noise, 1, "lcm", jax.random.PRNGKey(1)),
                             discrete.sample(f, noise, 1), rtol=1e-5, atol=1e-6)
  assert discrete.sampling_grid(4, "999,749,499,124").tolist() == [999, 749, 499, 124, 0]
  assert discrete.sampling_grid(4, "trailing").tolist() == [999, 749, 499, 249, 0]
  with pytest.raises(ValueError, match="has 3 entries but steps=4"):
    discrete.sampling_grid(4, "999,500,100")
  with pytest.raises(ValueError, match="timesteps='999,x' is invalid"):
    discrete.sampling_grid(2, "999,x")


def test_printed_schedule_is_the_sigmas_diffusers_euler_steps_through():
  """``generate --print_schedule``: the sigmas it prints for a grid are those of diffusers'
  EulerDiscreteScheduler given the grid's timesteps (the sigmas ComfyUI's ManualSigmas takes)."""
  diffusers = pytest.importorskip("diffusers")
  from mcm_jax import generate  # pylint: disable=g-import-not-at-top
  for grid in (discrete.timestep_grid(4), discrete.timestep_grid(25, "leading"),
               discrete.timestep_grid(4, "lcm"), discrete.explicit_grid([999, 500, 1])):
    euler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULE)
    euler.set_timesteps(timesteps=grid[:-1].tolist())
    np.testing.assert_allclose(discrete.grid_sigmas(grid), euler.sigmas.numpy(), rtol=1e-5)
  text = generate.schedule_text(4, "uniform", "ddim")
  assert "999, 750, 500, 250\n" in text and "14.614641, 4.099164, 1.618279, 0.695799, 0.0" in text
  assert "sampler 'lcm'" in generate.schedule_text(2, "lcm", "lcm")


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_sampler_equals_diffusers_tcd_scheduler(gamma):
  """``--sampler=tcd``: TCDScheduler (eta = gamma) on the same epsilon function, start noise and
  fresh noise (its draws replayed from the same torch generator), 4 steps on its own grid."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.TCDScheduler(**SDXL_SCHEDULE)
  scheduler.set_timesteps(4)
  grid = discrete.timestep_grid(4, "lcm")
  np.testing.assert_array_equal(grid[:-1], scheduler.timesteps.numpy())  # TCD's grid is LCM's
  z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
  gen = torch.Generator().manual_seed(1)
  z = z0.clone()
  for t in scheduler.timesteps:
    eps = torch.from_numpy(eps_np(z.numpy(), float(t)).astype(np.float32))
    z = scheduler.step(eps, t, z, eta=gamma, generator=gen).prev_sample
  gen = torch.Generator().manual_seed(1)
  noise = np.stack([torch.randn(SHAPE, generator=gen).numpy() for _ in range(3)])
  got = discrete.tcd_sample_on_grid(denoiser(), jnp.asarray(z0.numpy()), grid, gamma,
                                jnp.asarray(noise))
  np.testing.assert_allclose(got, z.numpy(), rtol=1e-4, atol=2e-4)
  if gamma == 0.0:  # deterministic: DDIM jumps to the grid's timesteps, ending at timestep 0
    ddim = addim.sample_on_grid(denoiser(), jnp.asarray(z0.numpy()), grid, schedules.sdxl_logsnr)
    assert float(jnp.abs(ddim - got).max()) < 0.1  # x_hat vs z at abar_0: close, not equal


@pytest.mark.parametrize("timesteps", [[999, 750, 500, 250], list(range(981, 0, -40))])
def test_dpm_solver_2m_equals_diffusers_dpm_solver_multistep(timesteps):
  """``--sampler=dpmpp_2m``: diffusers' DPMSolverMultistepScheduler (its defaults: dpmsolver++,
  order 2, midpoint, final sigma 0, last step first order) on the same epsilon function, start
  noise and timesteps (4, and 25 as a teacher baseline would use)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.DPMSolverMultistepScheduler(**SDXL_SCHEDULE)
  scheduler.set_timesteps(timesteps=timesteps)
  z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
  z = z0.clone()
  for t in scheduler.timesteps:
    eps = torch.from_numpy(eps_np(z.numpy(), float(t)).astype(np.float32))
    z = scheduler.step(eps, t, z).prev_sample
  got = discrete.sample(denoiser(), jnp.asarray(z0.numpy()), discrete.explicit_grid(timesteps),
                        "dpmpp_2m")
  np.testing.assert_allclose(got, z.numpy(), rtol=1e-4, atol=2e-4)
  ddim = discrete.sample(denoiser(), jnp.asarray(z0.numpy()), discrete.explicit_grid(timesteps))
  assert float(jnp.abs(ddim - got).max()) > 1e-3  # second order differs from DDIM


@pytest.mark.parametrize("algorithm", list(discrete.DPM_SOLVER_2))
def test_dpm_solver_2_teacher_step_equals_diffusers_dpm_solver_singlestep(algorithm):
  """The DPM-Solver teacher steps of MLCM / LCM distillation (LCM §4.3): one singlestep
  second-order step from t_m to t_n per example is diffusers' DPMSolverSinglestepScheduler (order
  2, midpoint, the given ``algorithm_type``) stepping the grid ``t_m, (t_m + t_n) // 2, t_n``
  on the same epsilon function (the top of the schedule, a skip of 20, a long skip, the end)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pairs = [(999, 979), (500, 450), (61, 1), (12, 9)]
  z0 = torch.randn((len(pairs),) + SHAPE[1:], generator=torch.Generator().manual_seed(1))
  want = []
  for i, (t_m, t_n) in enumerate(pairs):
    scheduler = diffusers.DPMSolverSinglestepScheduler(
        **SDXL_SCHEDULE, solver_order=2, algorithm_type=discrete.DPM_SOLVER_2[algorithm],
        final_sigmas_type="sigma_min")
    scheduler.set_timesteps(timesteps=[t_m, (t_m + t_n) // 2, t_n, t_n - 1])
    assert scheduler.get_order_list(4)[:2] == [1, 2]  # a first-order step, then the second-order
    z = z0[i:i + 1].double()
    for t in scheduler.timesteps[:2]:
      eps = torch.from_numpy(eps_np(z.numpy(), float(t)))
      z = scheduler.step(eps, t, z).prev_sample
    want.append(z[0].numpy())
  t_m, t_n = (jnp.array(p, jnp.int32) for p in zip(*pairs))
  got = discrete.dpm_solver_2_step(denoiser(), jnp.asarray(z0.numpy()), t_m, t_n, algorithm)
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=2e-5)
  ddim = addim.ddim_step(denoiser()(jnp.asarray(z0.numpy()), t_m), jnp.asarray(z0.numpy()),
                         *discrete.alpha_sigma(t_m), *discrete.alpha_sigma(t_n))
  assert float(jnp.abs(ddim - got).max()) > 1e-3  # second order differs from DDIM


def test_dpm_solver_2m_image_free_trajectory_equals_diffusers_dpm_solver_multistep():
  """``mlcm.trajectory_step='dpmpp_2m'``: MLCM's image-free latents ('mdi': K - s equal steps from
  999 to t_m, per example) by DPM-Solver++(2M) are diffusers' DPMSolverMultistepScheduler
  (dpmsolver++, order 2, midpoint, no lower-order end steps) stepping each example's timesteps on
  the same epsilon function."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from mcm_jax import mlcm  # pylint: disable=g-import-not-at-top
  segments, t_m = np.array([0, 1, 3, 5]), np.array([3, 180, 400, 700])  # K = 8: 8 to 3 steps
  z0 = torch.randn((4,) + SHAPE[1:], generator=torch.Generator().manual_seed(2))
  got = mlcm.image_free_latents("mdi", denoiser(), jnp.asarray(z0.numpy()), jnp.asarray(segments),
                                jnp.asarray(t_m), 8, solver="dpmpp_2m")
  ddim = mlcm.image_free_latents("mdi", denoiser(), jnp.asarray(z0.numpy()), jnp.asarray(segments),
                                 jnp.asarray(t_m), 8)
  for i, (s, t) in enumerate(zip(segments, t_m)):
    steps = 8 - s
    grid = [int(np.round(999 - j * (999 - t) / steps)) for j in range(steps)] + [int(t)]
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SDXL_SCHEDULE, lower_order_final=False, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(timesteps=grid)
    z = z0[i:i + 1].double()
    for step_t in scheduler.timesteps[:-1]:  # the last entry is t_m itself
      z = scheduler.step(torch.from_numpy(eps_np(z.numpy(), float(step_t))), step_t, z).prev_sample
    np.testing.assert_allclose(got[i], z[0].numpy(), rtol=1e-4, atol=2e-4)
    assert float(jnp.abs(got[i] - ddim[i]).max()) > 1e-3  # second order differs from DDIM


@pytest.mark.parametrize("timesteps", [[999, 750, 500, 250], list(range(981, 0, -80))])
def test_dpm_solver_2s_sampler_equals_diffusers_dpm_solver_singlestep(timesteps):
  """``--sampler=dpmpp_2s``: diffusers' DPMSolverSinglestepScheduler (dpmsolver++, order 2,
  final sigma 0, hence a first-order last step) stepping the grid with the timesteps midway
  inserted (``with_midpoints``), on the same epsilon function and start noise."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  grid = discrete.explicit_grid(timesteps)
  refined = discrete.with_midpoints(grid)
  assert list(refined[:3]) == [grid[0], (grid[0] + grid[1]) // 2, grid[1]]
  scheduler = diffusers.DPMSolverSinglestepScheduler(**SDXL_SCHEDULE, solver_order=2)
  scheduler.set_timesteps(timesteps=[int(t) for t in refined[:-1]])
  z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
  z = z0.clone().double()
  for t in scheduler.timesteps:
    z = scheduler.step(torch.from_numpy(eps_np(z.numpy(), float(t))), t, z).prev_sample
  got = discrete.sample(denoiser(), jnp.asarray(z0.numpy()), grid, "dpmpp_2s")
  np.testing.assert_allclose(got, z.numpy(), rtol=1e-4, atol=2e-4)
  two_m = discrete.sample(denoiser(), jnp.asarray(z0.numpy()), grid, "dpmpp_2m")
  assert float(jnp.abs(two_m - got).max()) > 1e-3  # another solver


def test_image_pairs_are_diffusers_add_noise_and_lcf_pairs_one_exact_ddim_step():
  """From real latents (``mlcm.source='images'``): z_{t_m} is diffusers' ``DDPMScheduler.add_noise``
  on SDXL's schedule; LCF's ``teacher_step='data'`` pair (the same noise at t_n, LCM Alg. 4) is
  the DDIM step of a teacher that returns the clean latent exactly, and differs from a real
  teacher's step."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from mcm_jax import mlcm  # pylint: disable=g-import-not-at-top
  z0 = np.random.default_rng(3).normal(size=(64, 4, 4, 4)).astype(np.float32)
  hp = mlcm.Hparams(num_segments=4, skip=20, source="images", teacher_step="data")
  rng = jax.random.PRNGKey(4)
  pair = mlcm.image_pair(rng, jnp.asarray(z0), hp, teacher=None)
  noise = jax.random.normal(jax.random.split(rng)[1], z0.shape)  # image_pair's noise draw
  scheduler = diffusers.DDPMScheduler(**SDXL_SCHEDULE)
  add_noise = lambda t: scheduler.add_noise(torch.from_numpy(z0).double(),
                                            torch.from_numpy(np.asarray(noise)).double(),
                                            torch.from_numpy(np.asarray(t)).long()).numpy()
  np.testing.assert_allclose(pair["z_tm"], add_noise(pair["t_m"]), atol=1e-5)
  np.testing.assert_allclose(pair["z_tn"], add_noise(pair["t_n"]), atol=1e-5)
  assert np.all(pair["t_n"] < pair["t_m"]) and np.abs(pair["z_tm"] - pair["z_tn"]).max() > 0.01
  knows_data = mlcm.image_pair(rng, jnp.asarray(z0), hp._replace(teacher_step="ddim"),
                               teacher=lambda z, t: jnp.asarray(z0))
  np.testing.assert_allclose(knows_data["z_tn"], pair["z_tn"], atol=2e-5)
  teacher = lambda z, t: denoiser()(z, t)
  guided = mlcm.image_pair(rng, jnp.asarray(z0), hp._replace(teacher_step="ddim"), teacher)
  np.testing.assert_allclose(guided["z_tm"], pair["z_tm"])
  assert float(jnp.abs(guided["z_tn"] - pair["z_tn"]).max()) > 1e-2
