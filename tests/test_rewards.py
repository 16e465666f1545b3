"""Aesthetic scorer (Flax CLIP vision + LAION head) == PyTorch on tiny random weights; reward
losses' gradients."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mcm_jax import rewards

sys.path.insert(0, os.path.dirname(__file__))
from sdxl_fixtures import tiny_clip_and_head, tiny_head  # pylint: disable=g-bad-import-order,wrong-import-position


def test_aesthetic_scorer_equals_pytorch(tmp_path):
  clip, head = tiny_clip_and_head(tmp_path)
  score_fn, params = rewards.aesthetic_scorer(str(tmp_path / "clip"), str(tmp_path / "head.pth"))
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


def test_whole_clip_model_directory(tmp_path):
  """Users have openai/clip-vit-large-patch14 as a whole CLIP model: its image features."""
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(1)
  small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
  clip = CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=50),
                              vision_config=dict(small, image_size=32, patch_size=8),
                              projection_dim=16)).eval()
  clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
  head = tiny_head(tmp_path)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  score_fn, params = rewards.aesthetic_scorer(str(tmp_path / "clip"), str(tmp_path / "head.pth"))
  got = np.asarray(score_fn(params, images))
  pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
      torch.from_numpy(rewards.CLIP_STD)
  with torch.no_grad():
    emb = clip.get_image_features(pixel_values=pixels.permute(0, 3, 1, 2))
    want = head(emb / emb.norm(dim=-1, keepdim=True))[:, 0].numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
