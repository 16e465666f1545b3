"""Aesthetic scorer (Flax CLIP vision + LAION head) == PyTorch on tiny random weights; reward
losses' gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcm_jax import rewards


@pytest.mark.slow  # PyTorch equivalence, seconds (with the tiny CLIP's setup)
def test_aesthetic_scorer_equals_pytorch(tiny_clip, tmp_path):
  torch = pytest.importorskip("torch")
  clip, head = tiny_clip.clip, tiny_clip.head
  score_fn, params = rewards.aesthetic_scorer(str(tiny_clip.dir / "clip"),
                                              str(tiny_clip.dir / "head.pth"))
  score = jax.jit(lambda x: score_fn(params, x))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  got = np.asarray(score(images))
  pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
      torch.from_numpy(rewards.CLIP_STD)
  with torch.no_grad():
    emb = clip(pixel_values=pixels.permute(0, 3, 1, 2)).image_embeds
    want = head(emb / emb.norm(dim=-1, keepdim=True))[:, 0].numpy()
  assert np.ptp(want) > 1e-4  # scores differ between images
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Larger images are resized (short side) and centre-cropped to the model's size.
  assert score(jnp.zeros((2, 48, 64, 3))).shape == (2,)
  with pytest.raises(ValueError, match="layers.0.weight"):
    np.savez(tmp_path / "bad.npz", w=np.zeros(2))
    rewards.load_head(str(tmp_path / "bad.npz"))


def test_reward_losses_and_their_gradients():
  score = lambda x: jnp.mean(x, axis=(1, 2, 3)) * 10.0
  pred, ref = jnp.full((2, 4, 4, 3), 0.5), jnp.full((2, 4, 4, 3), 0.2)
  np.testing.assert_allclose(rewards.reward_consistency(score, pred, ref), 9.0, rtol=1e-6)
  g_ref = jax.grad(lambda r: jnp.sum(rewards.reward_consistency(score, pred, r)))(ref)
  assert float(jnp.abs(g_ref).max()) == 0.0  # the reference is a stop-gradient target
  np.testing.assert_allclose(rewards.feedback(score, pred, 8.0), 3.0, rtol=1e-6)
  np.testing.assert_allclose(rewards.feedback(score, pred, 4.0), 0.0)


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_whole_clip_model_directory(tiny_clip_model):
  """Users have openai/clip-vit-large-patch14 as a whole CLIP model: its image features."""
  torch = pytest.importorskip("torch")
  clip, head = tiny_clip_model.clip, tiny_clip_model.head
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  score_fn, params = rewards.aesthetic_scorer(str(tiny_clip_model.dir / "clip"),
                                              str(tiny_clip_model.dir / "head.pth"))
  got = np.asarray(score_fn(params, images))
  pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
      torch.from_numpy(rewards.CLIP_STD)
  with torch.no_grad():
    emb = clip.get_image_features(pixel_values=pixels.permute(0, 3, 1, 2))
    want = head(emb / emb.norm(dim=-1, keepdim=True))[:, 0].numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
