"""MLCD (MLCM eq. 7) on the SDXL discrete schedule: exact identities on a point-mass toy.

Models are denoisers ``f(z, t) -> x_hat`` built from epsilon predictions through the shared
``parameterization``, as the SDXL UNet is (``models.sdxl.make_denoiser``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcm_jax import mlcm, parameterization, schedules
from mcm_jax.samplers import discrete

X0 = jnp.array([0.7, -1.2, 0.3, 2.0])  # data = one point: DDIM with the exact eps is exact


def _mlcd_loss(student, teacher, z_tm, t_m, t_n, seg_start, target="eq7", huber_eps=1.0):
  """(per-example loss [B], z_{t_n}) of MLCM eq. 7 given ``z_{t_m}``, as ``mlcm.loss`` composes
  it: the teacher's DDIM step to t_n, then ``mlcd_terms`` and ``mlcd_distance``."""
  z_tn = mlcm.teacher_step(teacher, z_tm, t_m, t_n)
  terms = mlcm.mlcd_terms(student, z_tm, z_tn, t_m, t_n, seg_start)
  return mlcm.mlcd_distance(terms, z_tm, t_m, seg_start, target, huber_eps), z_tn


def from_eps(eps_fn):
  """An epsilon model ``eps_fn(z, t)`` on SDXL timesteps as a denoiser (x-prediction)."""
  return parameterization.make_denoiser(lambda p, z, t, c, r: eps_fn(z, t),
                                        schedules.sdxl_logsnr, "eps", time_input="t")


def exact_eps(z, t, scale=1.0):
  a, s = mlcm.alpha_sigma(t)
  return scale * (z - a[:, None] * X0) / s[:, None]


def exact(z, t, scale=1.0):
  """The exact denoiser of the point mass (scale 1: x_hat = X0), or that of a wrong eps."""
  return from_eps(lambda zz, tt: exact_eps(zz, tt, scale))(None, z, t)


def _times(k=20, num_segments=8, batch=4096, seed=0):
  return mlcm.sample_times(jax.random.PRNGKey(seed), batch, num_segments, k)


def test_sample_times_stay_in_their_segment():
  s, t_m, t_n, start = _times()
  ms = np.asarray(mlcm.milestones(8))
  assert np.all(np.asarray(start) == ms[np.asarray(s)])
  assert np.all((t_m > start) & (t_m <= np.minimum(ms[np.asarray(s) + 1], 999)))
  assert np.all((t_n >= start) & (t_n <= t_m) & (t_m - t_n <= 20))
  assert np.any(t_n == start) and np.any(t_m - t_n == 20)  # both cases occur
  assert set(np.asarray(s)) == set(range(8)) and t_m.max() == 999


def test_loss_is_zero_for_a_consistent_student_and_positive_otherwise():
  s, t_m, t_n, start = _times()
  noise = jax.random.normal(jax.random.PRNGKey(1), (len(s), 4))
  a, sg = mlcm.alpha_sigma(t_m)
  z_tm = a[:, None] * X0 + sg[:, None] * noise
  loss, z_tn = _mlcd_loss(exact, exact, z_tm, t_m, t_n, start)
  assert float(jnp.max(loss)) < 1e-12  # seen: 6e-14
  a_n, s_n = mlcm.alpha_sigma(t_n)
  np.testing.assert_allclose(z_tn, a_n[:, None] * X0 + s_n[:, None] * noise, atol=2e-5)
  wrong = lambda z, t: exact(z, t, 1.1)
  loss_wrong, _ = _mlcd_loss(wrong, exact, z_tm, t_m, t_n, start)
  inner = np.asarray(t_n > start)  # at the segment start the target is z_{t_n} itself
  assert np.all(np.asarray(loss_wrong)[inner] > 1e-8)  # seen: min 4e-7, mean 8e-5


def test_target_is_stop_gradient_and_the_boundary_is_z_tn():
  t_m, t_n, start = jnp.array([140, 300]), jnp.array([125, 280]), jnp.array([125, 250])
  z_tm = jnp.ones((2, 4))
  student = lambda theta: (lambda z, t: theta * exact(z, t))
  loss_fn = lambda theta: jnp.sum(_mlcd_loss(student(theta), exact, z_tm, t_m, t_n,
                                                  start)[0])
  g = jax.grad(loss_fn)(1.3)
  # Reference: the same loss with the target computed outside and held fixed.
  _, z_tn = _mlcd_loss(student(1.3), exact, z_tm, t_m, t_n, start)
  target = mlcm.ddim(student(1.3)(z_tn, t_n), z_tn, t_n, start)
  target = target.at[0].set(z_tn[0])  # example 0 sits on its segment start (125)
  ref = lambda theta: jnp.sum(jnp.mean((mlcm.ddim(student(theta)(z_tm, t_m), z_tm, t_m, start)
                                        - target) ** 2, axis=1))
  np.testing.assert_allclose(g, jax.grad(ref)(1.3), rtol=1e-5)


@pytest.mark.parametrize("kind", mlcm.IMAGE_FREE)
def test_image_free_latents_follow_the_exact_trajectory(kind):
  s, t_m, _, _ = _times(batch=256)
  noise = jax.random.normal(jax.random.PRNGKey(2), (256, 4))
  z = jax.jit(lambda n, seg, t: mlcm.image_free_latents(kind, exact, n, seg, t, 8))(
      noise, s, t_m)
  # With the exact eps of a point mass DDIM is exact: eps_hat stays (z_999 - a x0) / s.
  a_top, s_top = mlcm.alpha_sigma(jnp.array([999]))
  eps_hat = (noise - a_top[0] * X0) / s_top[0]
  a, sg = mlcm.alpha_sigma(t_m)
  np.testing.assert_allclose(z, a[:, None] * X0 + sg[:, None] * eps_hat, atol=1e-4)


@pytest.mark.parametrize("kind", mlcm.IMAGE_FREE)
@pytest.mark.parametrize("step,trajectory", [(s, "ddim") for s in mlcm.TEACHER_STEPS] + [
    ("ddim", "dpmpp_2m"), ("dpmpp_2s", "dpmpp_2m")])
def test_training_pair_traces_the_model_once_and_equals_two_calls(kind, step, trajectory):
  """With the same model for the latents and a one-call teacher step, ``training_pair`` makes
  both in one loop (one traced call: one UNet to compile, not two) with the numbers of
  ``image_free_latents`` followed by ``teacher_step`` (the DPM-Solver steps: that sequence, three
  traced calls). The denoiser is a wrong one (scale 1.1) so that the trajectory depends on every
  step; t_m = 999 examples stay at the noise. The trajectory's steps are DDIM or 2M."""
  hp = mlcm.Hparams(num_segments=8, skip=20, source=kind, teacher_step=step,
                    trajectory_step=trajectory)
  traced = []
  wrong = lambda z, t: (traced.append(t.shape), exact(z, t, 1.1))[1]
  rng = jax.random.PRNGKey(5)
  pair = jax.jit(lambda r: mlcm.training_pair(r, (4096, 4), hp, wrong, wrong))(rng)
  assert len(traced) == (3 if step in discrete.DPM_SOLVER_2 else 1)
  s, t_m, t_n, _ = mlcm.sample_times(jax.random.split(rng)[0], 4096, 8, 20)
  noise = jax.random.normal(jax.random.split(rng)[1], (4096, 4))
  z_tm = mlcm.image_free_latents(kind, wrong, noise, s, t_m, 8, solver=trajectory)
  z_tn = mlcm.teacher_step(wrong, z_tm, t_m, t_n, step)
  assert np.any(np.asarray(t_m) == 999) and np.any(np.asarray(t_n) < np.asarray(t_m))
  np.testing.assert_array_equal(pair["t_n"], t_n)
  np.testing.assert_allclose(pair["z_tm"], z_tm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pair["z_tn"], z_tn, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(pair["z_tn"] - pair["z_tm"]).max()) > 1e-3


def test_few_step_sampling_lands_on_the_data_and_uses_the_milestones():
  noise = jax.random.normal(jax.random.PRNGKey(3), (5, 4))
  for steps in (1, 2, 4, 8):
    np.testing.assert_allclose(discrete.sample(exact, noise, steps),
                               jnp.broadcast_to(X0, (5, 4)), atol=1e-4)
  np.testing.assert_array_equal(discrete.sampling_timesteps(4), [999, 750, 500, 250, 0])
  seen = []
  record = lambda z, t: (jax.debug.callback(lambda v: seen.append(np.asarray(v)), t,
                                           ordered=True), exact(z, t))[1]
  discrete.sample(record, noise, 4)
  assert [int(t[0]) for t in seen] == [999, 750, 500, 250]


@pytest.mark.slow  # a 1000-step training
def test_mlcd_distills_a_sharp_two_step_sampler():
  """Convergence on a toy: data = two points +-m in 2-D with its exact (guidance-free) eps as the
  teacher. Two DDIM steps of the teacher land between the modes (blurry); a student (teacher +
  a zero-initialised MLP correction) trained by MLCD with K = 2 segments, k = 20, learns a
  2-step sampler that lands on them."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  m = jnp.array([1.0, 1.0])

  def teacher(z, t):  # the exact posterior mean E[x | z_t]
    a, s = mlcm.alpha_sigma(t)
    return jnp.tanh(a * (z @ m) / s ** 2)[:, None] * m

  class Correction(nn.Module):
    @nn.compact
    def __call__(self, z, t):
      freqs = t[:, None] / 1000 * jnp.arange(1, 9)
      h = jnp.concatenate([z, jnp.sin(freqs), jnp.cos(freqs)], -1)
      for _ in range(3):
        h = nn.gelu(nn.Dense(128)(h))
      return nn.Dense(2, kernel_init=nn.initializers.zeros)(h)

  net = Correction()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))

  def student(p):  # the teacher's eps plus the correction c: x = x_teacher - (sigma / alpha) c
    def f(z, t):
      a, s = mlcm.alpha_sigma(t)
      return teacher(z, t) - (s / a)[:, None] * net.apply(p, z, t)
    return f

  tx = optax.adam(1e-3)

  def loss_fn(p, rng):
    r1, r2, r3 = jax.random.split(rng, 3)
    s, t_m, t_n, start = mlcm.sample_times(r1, 512, 2, 20)
    x0 = jnp.where(jax.random.bernoulli(r2, 0.5, (512, 1)), m, -m)
    a, sg = mlcm.alpha_sigma(t_m)
    z = a[:, None] * x0 + sg[:, None] * jax.random.normal(r3, (512, 2))
    return jnp.mean(_mlcd_loss(student(p), teacher, z, t_m, t_n, start)[0])

  @jax.jit
  def train(p, opt_state):
    def body(carry, r):
      p, o = carry
      grads = jax.grad(loss_fn)(p, r)
      updates, o = tx.update(grads, o, p)
      return (optax.apply_updates(p, updates), o), None
    return jax.lax.scan(body, (p, opt_state), jax.random.split(jax.random.PRNGKey(1), 1000))[0]

  def distance_to_modes(p):
    x = discrete.sample(student(p), jax.random.normal(jax.random.PRNGKey(9), (4096, 2)), 2)
    return float(jnp.mean(jnp.minimum(jnp.linalg.norm(x - m, axis=1),
                                      jnp.linalg.norm(x + m, axis=1))))

  before = distance_to_modes(params)  # = the teacher's 2-step DDIM (correction starts at 0)
  trained, _ = train(params, tx.init(params))
  after = distance_to_modes(trained)
  assert before > 0.5 and after < 0.3 * before, (before, after)  # seen: 0.66 -> ~0.08-0.14


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_mcm_target_and_addim_teacher_options():
  s, t_m, t_n, start = _times(batch=1024)
  noise = jax.random.normal(jax.random.PRNGKey(4), (1024, 4))
  a, sg = mlcm.alpha_sigma(t_m)
  z_tm = a[:, None] * X0 + sg[:, None] * noise
  z_tn = mlcm.teacher_step(exact, z_tm, t_m, t_n)
  terms = mlcm.mlcd_terms(exact, z_tm, z_tn, t_m, t_n, start)
  # The invDDIM target of a consistent student is its own x_hat (= x0 here): zero loss.
  np.testing.assert_allclose(mlcm.mlcd_distance(terms, z_tm, t_m, start, "mcm", 1e-4), 0.0,
                             atol=1e-4)
  np.testing.assert_allclose(terms["x_hat"], jnp.broadcast_to(X0, (1024, 4)), atol=1e-3)
  wrong = mlcm.mlcd_terms(lambda z, t: exact(z, t, 1.1), z_tm, z_tn, t_m, t_n, start)
  # DDIM is affine in x, so eq. 7 = (alpha_s - alpha_t sigma_s / sigma_t)^2 * mean (x_hat -
  # x_target)^2; with huber eps -> 0 the mcm form is (SNR + 1) * rms(x_hat - x_target).
  eq7 = mlcm.mlcd_distance(wrong, z_tm, t_m, start, "eq7")
  rms = mlcm.mlcd_distance(wrong, z_tm, t_m, start, "mcm", 1e-12) / (a ** 2 / sg ** 2 + 1)
  a_s, s_s = mlcm.alpha_sigma(start, start == 0)
  coef = (a_s - a * s_s / sg) ** 2
  np.testing.assert_allclose(eq7, coef * rms ** 2, rtol=5e-3, atol=1e-10)
  # aDDIM teacher step: equals DDIM for a point mass only when x_var = 0, so it moves z_tn.
  z_tn_addim = mlcm.teacher_step(exact, z_tm, t_m, t_n, "addim")
  assert float(jnp.abs(z_tn_addim - z_tn).max()) > 1e-4
  assert float(jnp.abs(z_tn_addim - z_tn).max()) < 0.5
  with pytest.raises(ValueError, match="allowed"):
    mlcm.teacher_step(exact, z_tm, t_m, t_n, "heun")
