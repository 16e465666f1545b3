"""MCM Algorithm 1: annealing, the time grid, the eq. 9 limit, guidance and the CD x_var."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LOGSNR, gaussian_denoise_fn
from mcm_jax import consistency, guidance, schedules, sharding
from mcm_jax.samplers import addim


def test_teacher_steps_schedule():
  got = [float(consistency.teacher_steps(i)) for i in (0, 50_000, 100_000, 200_000)]
  np.testing.assert_allclose(got, [64.0, np.sqrt(64 * 1280), 1280.0, 1280.0], rtol=1e-5)


@pytest.mark.parametrize("student_steps,n_teacher", [(1, 64), (4, 64), (8, 1280), (3, 10)])
def test_sample_times_lie_on_the_segment_grid(student_steps, n_teacher):
  t, s, t_step = consistency.sample_times(jax.random.PRNGKey(0), 32768, student_steps,
                                          jnp.float32(n_teacher))
  n_seg = max(round(n_teacher / student_steps), 1)
  total = n_seg * student_steps
  np.testing.assert_allclose(t - s, 1.0 / total, atol=1e-6)
  assert np.all(s >= t_step - 1e-6) and np.all(t <= t_step + 1.0 / student_steps + 1e-6)
  np.testing.assert_allclose(np.round(np.asarray(t) * total), np.asarray(t) * total, atol=1e-3)
  assert len(np.unique(np.round(np.asarray(t) * total))) == total  # every grid point is hit


@pytest.mark.parametrize("student_steps,n_teacher", [(1, 64), (2, 64), (3, 10), (8, 1280),
                                                     (5, 777)])
def test_segment_position_names_the_training_segment(student_steps, n_teacher):
  """Every t Alg. 1 draws lies in segment t_step (position in (0, 1], = (t - t_step) S), its
  upper end included; the sampler's times k/S have position 1 (they jump to (k-1)/S) and a
  time just above a boundary starts the next segment (position ~0)."""
  t, _, t_step = consistency.sample_times(jax.random.PRNGKey(1), 32768, student_steps,
                                          jnp.float32(n_teacher))
  u = np.asarray(consistency.segment_position(t, student_steps))
  assert np.all((u > 0) & (u <= 1 + 1e-5))
  np.testing.assert_allclose(u, (np.asarray(t) - np.asarray(t_step)) * student_steps, atol=1e-4)
  grid = jnp.arange(1, student_steps + 1, dtype=jnp.float32) / student_steps
  np.testing.assert_allclose(consistency.segment_position(grid, student_steps), 1.0, atol=1e-5)
  above = np.asarray(consistency.segment_position(grid[:-1] + 1e-3, student_steps))
  np.testing.assert_allclose(above, 1e-3 * student_steps, atol=1e-4)


def test_target_is_z_s_when_s_is_the_step_boundary():
  """When s = t_step, DDIM_{s->t_step} is the identity and x_target = invDDIM_{t->s}(z_s, z_t)."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  x_ref, z_s, z_t = (jax.random.normal(kk, (4, 3)) for kk in k)
  t, s = jnp.full((4,), 0.5), jnp.full((4,), 0.25)
  got = consistency.consistency_target(x_ref, z_s, z_t, t, s, s, LOGSNR)
  a_t, s_t = schedules.alpha_sigma(LOGSNR(t))
  a_s, s_s = schedules.alpha_sigma(LOGSNR(s))
  np.testing.assert_allclose(got, addim.inv_ddim(z_s, z_t, a_t, s_t, a_s, s_s), atol=1e-5)


def _toy_student(params, z, t, cond=None, rng=None):
  del cond, rng
  return jnp.tanh(params["w"] * z + params["b"] * t[:, None])


def _ct_loss_and_diffusion_loss(student_steps, teacher_steps=16):
  """CT's per-example Alg. 1 loss and w(t) * pseudo_huber(f(z_t, t) - x) on the same draws."""
  params = {"w": jnp.float32(0.7), "b": jnp.float32(-0.3)}
  x = jax.random.normal(jax.random.PRNGKey(2), (512, 3))
  eps = jax.random.normal(jax.random.PRNGKey(3), (512, 3))
  t, s, t_step = consistency.sample_times(jax.random.PRNGKey(4), 512, student_steps,
                                          jnp.float32(teacher_steps))
  a_t, s_t = schedules.alpha_sigma(LOGSNR(t))
  z_t = addim.bcast(a_t, x) * x + addim.bcast(s_t, x) * eps
  student = lambda z, tt: _toy_student(params, z, tt)
  got = consistency.consistency_loss_per_example(student, z_t, x, jnp.zeros(512), t, s, t_step,
                                                 LOGSNR, 1e-4)
  want = schedules.snr_plus_one(LOGSNR(t)) * consistency.pseudo_huber(student(z_t, t) - x, 1e-4)
  return np.asarray(got), np.asarray(want), np.asarray(s), np.asarray(t_step)


def test_ct_with_student_steps_equal_teacher_steps_is_the_diffusion_loss():
  """Paper eq. 9: with T = student steps, CT's loss is w(t) * pseudo_huber(x - f(z_t, t))."""
  got, want, s, t_step = _ct_loss_and_diffusion_loss(student_steps=16)
  np.testing.assert_allclose(s, t_step, atol=1e-7)
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)


def test_ct_loss_with_fewer_student_steps_is_not_the_diffusion_loss():
  # Guards the test above: with a real consistency gap the target is not x.
  got, want, s, t_step = _ct_loss_and_diffusion_loss(student_steps=2)
  far = s > t_step + 1e-6
  assert far.sum() > 100
  assert np.mean(np.abs(got - want)[far] / want[far]) > 0.05


def test_exact_gaussian_denoiser_is_consistent_with_itself_at_many_steps():
  """For N(0, s^2) data the exact denoiser + DDIM teacher: the CD loss with a student equal to
  the teacher shrinks as the teacher step 1/T -> 0 (the student is then the ODE map per step)."""
  scale = 0.5
  exact = gaussian_denoise_fn(scale)
  batch = {"x": scale * jax.random.normal(jax.random.PRNGKey(5), (2048, 2))}
  losses = []
  for n in (64, 1024):
    # Student steps = teacher steps: every step is a single teacher step (eq. 8 / 9).
    loss = functools.partial(consistency.consistency_loss, denoise_fn=exact, logsnr_fn=LOGSNR,
                             student_steps=1, teacher_fn=exact, teacher_sampler="ddim",
                             teacher_steps_start=n, teacher_steps_end=n, huber_eps=1e-4)
    losses.append(float(loss({}, batch, jax.random.PRNGKey(6), 0)[0]))
  assert losses[1] < 0.3 * losses[0]


def test_cd_loss_jit_grad_and_metrics():
  params = {"w": jnp.float32(0.7), "b": jnp.float32(-0.3)}
  batch = {"x": jax.random.normal(jax.random.PRNGKey(7), (64, 2))}
  loss = functools.partial(consistency.consistency_loss, denoise_fn=_toy_student,
                           logsnr_fn=LOGSNR, student_steps=4, teacher_fn=_toy_student)
  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, batch, jax.random.PRNGKey(8), 50_000, {"w": 0.5, "b": 0.1})
  assert np.isfinite(value) and all(np.isfinite(g) for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_allclose(metrics["teacher_steps"], np.sqrt(64 * 1280), rtol=1e-5)


def test_guidance_on_labels_and_on_conditioning_pytrees():
  def teacher(z, t, cond):
    return z + cond[:, None].astype(jnp.float32)

  z, t, cond = jnp.ones((3, 2)), jnp.full((3,), 0.5), jnp.array([1, 2, 3])
  x_w, x_c = guidance.guided(teacher, z, t, cond, jnp.zeros_like(cond), 3.0)
  np.testing.assert_allclose(x_c, z + cond[:, None])
  np.testing.assert_allclose(x_w, z + 3.0 * cond[:, None])   # x_u + w (x_c - x_u)
  x_w1, _ = guidance.guided(teacher, z, t, cond, jnp.zeros_like(cond), 1.0)
  np.testing.assert_allclose(x_w1, x_c)
  # A dict conditioning (SDXL's) with a [1, ...] unconditional entry broadcast to the batch.
  f = lambda zz, tt, c: zz * 0 + c["c"][:, :1] + tt[:, None]
  cond, uncond = {"c": jnp.ones((3, 2))}, {"c": jnp.zeros((1, 2))}
  out, _ = guidance.guided(f, jnp.zeros((3, 4)), jnp.array([5.0, 6.0, 7.0]), cond, uncond, 8.0)
  np.testing.assert_allclose(out, 8.0 + jnp.array([5.0, 6.0, 7.0])[:, None] * jnp.ones((3, 4)))


def test_cd_x_var_is_taken_from_the_conditional_teacher_output():
  """With guidance, x_var uses ||x_cond - x||^2; a teacher whose conditional output is exact
  gives x_var = 0, i.e. the same loss as the DDIM teacher."""
  x = jax.random.normal(jax.random.PRNGKey(9), (64, 2))
  cond = jnp.zeros((64,), jnp.int32)

  def teacher(params, z, t, c, rng):  # exact on the conditional branch, off on the null one
    return jnp.where((c == 0)[:, None], x if z.shape[0] == 64 else guidance.interleave(x, x),
                     0.0)

  batch = {"x": x, "label": cond}
  kw = dict(denoise_fn=_toy_student, logsnr_fn=LOGSNR, student_steps=2, teacher_fn=teacher,
            guidance_scale=2.0, null_cond=5)
  params = {"w": jnp.float32(0.7), "b": jnp.float32(-0.3)}
  args = (params, batch, jax.random.PRNGKey(10), 0, None)
  addim_loss = consistency.consistency_loss(*args, teacher_sampler="addim", **kw)[0]
  ddim_loss = consistency.consistency_loss(*args, teacher_sampler="ddim", **kw)[0]
  np.testing.assert_allclose(addim_loss, ddim_loss, rtol=1e-6)


def test_guided_doubled_batch_pairs_each_example_with_its_unconditional_copy():
  """The doubled batch is [c_0, u_0, c_1, u_1, ...] (so a batch-sharded device keeps its own
  examples), and f_c / f_u are read back from the matching rows."""
  seen = {}

  def f(z, t, cond):
    seen["z"], seen["t"], seen["cond"] = z, t, cond
    return z * 10.0 + cond[:, None]

  z, t, cond = jnp.arange(6.0).reshape(3, 2), jnp.array([0.1, 0.2, 0.3]), jnp.array([1, 2, 3])
  x_w, x_c = guidance.guided(f, z, t, cond, jnp.full_like(cond, 7), 2.0)
  np.testing.assert_array_equal(seen["cond"], [1, 7, 2, 7, 3, 7])
  np.testing.assert_allclose(seen["t"], [0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
  np.testing.assert_array_equal(seen["z"], jnp.repeat(z, 2, axis=0))
  np.testing.assert_allclose(x_c, z * 10.0 + cond[:, None])
  np.testing.assert_allclose(x_w, z * 10.0 + 7 + 2.0 * (cond[:, None] - 7))  # f_u + w (f_c - f_u)


def test_guided_doubling_moves_no_data_between_devices():
  """On a batch-sharded mesh (8 CPU devices, data 2 x fsdp 4) the guided call compiles with no
  collective: every device doubles, runs and un-doubles its own examples (with
  ``jnp.concatenate`` GSPMD all-gathers the batch)."""
  mesh = sharding.make_mesh(data=2, fsdp=4)
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding.batch_sharding(mesh))
  f = lambda z, t, c: jnp.tanh(z * t[:, None] + c["emb"].sum(-1, keepdims=True))

  def step(z, t, emb):
    cond, uncond = {"emb": emb}, {"emb": jnp.zeros((1, 3))}  # SDXL-style pytree, [1, ...] null
    return guidance.guided(f, z, t, cond, uncond, 2.0)

  hlo = jax.jit(step).lower(spec(16, 4), spec(16), spec(16, 3)).compile().as_text()
  found = re.findall(r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter", hlo)
  assert not found, sorted(set(found))
