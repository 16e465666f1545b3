"""Fréchet distance against the scipy.linalg.sqrtm formula (pytorch-fid's), and the digits
feature space separates data from noise."""
import numpy as np
import pytest
import scipy.linalg

from mcm_jax import fid
from mcm_jax.data.images import load_digits


def _sqrtm_fd(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_distance_matches_sqrtm_formula():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 1
  (m1, s1), (m2, s2) = fid.statistics(a), fid.statistics(b)
  np.testing.assert_allclose(s1, np.cov(a.T, ddof=1))
  np.testing.assert_allclose(fid.frechet_distance(m1, s1, m2, s2), _sqrtm_fd(m1, s1, m2, s2),
                             rtol=1e-8)
  assert abs(fid.frechet_distance(m1, s1, m1, s1)) < 1e-8
  # Rank-deficient covariances (fewer samples than dims) stay finite and real.
  c, d = rng.normal(size=(8, 32)), rng.normal(size=(8, 32))
  (m3, s3), (m4, s4) = fid.statistics(c), fid.statistics(d)
  np.testing.assert_allclose(fid.frechet_distance(m3, s3, m4, s4), _sqrtm_fd(m3, s3, m4, s4),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="different sizes"):
    fid.frechet_distance(m1, s1, m3, s3)


def test_statistics_files_round_trip(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  fid.save_statistics(str(tmp_path / "ref.npz"), mu, sigma, 10)
  m, s = fid.load_statistics(str(tmp_path / "ref.npz"))
  np.testing.assert_array_equal(m, mu)
  np.testing.assert_array_equal(s, sigma)
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'.*mean"):
    fid.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    fid.load_statistics(str(tmp_path / "nope.npz"))


def test_digits_features_separate_data_from_noise():
  x, y = load_digits(16)
  f = fid.digits_feature_fn()
  feats, logits = fid.batched_features(f, x, 500)  # 1797 = 3 full batches + a padded one
  assert feats.shape == (1797, 128)
  assert np.mean(logits.argmax(-1) == y) > 0.95
  perm = np.random.default_rng(0).permutation(len(x))
  half_a, half_b = fid.statistics(feats[perm[:898]]), fid.statistics(feats[perm[898:]])
  data_fd = fid.frechet_distance(*half_a, *half_b)
  noise = np.random.default_rng(1).uniform(-1, 1, (898,) + x.shape[1:]).astype(np.float32)
  noise_fd = fid.frechet_distance(*fid.statistics(fid.batched_features(f, noise, 500)[0]),
                                  *half_b)
  blurred = (x[perm[:898]] + np.roll(x[perm[:898]], 2, axis=2)) / 2  # shifted double image
  blur_fd = fid.frechet_distance(*fid.statistics(fid.batched_features(f, blurred, 500)[0]),
                                 *half_b)
  assert data_fd * 3 < blur_fd < noise_fd, (data_fd, blur_fd, noise_fd)
