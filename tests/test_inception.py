"""The Flax FID Inception equals pytorch-fid's network on the same (random) weights."""
import jax
import numpy as np
import pytest

from mcm_jax.models import inception


def random_fid_state_dict(seed=0):
  """A torchvision-named Inception-v3 state dict with random weights and batch-norm statistics
  (what pytorch-fid's released file holds, but random)."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(seed)
  net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                        init_weights=True)
  sd = net.state_dict()
  g = torch.Generator().manual_seed(seed + 1)
  for k, v in sd.items():
    if k.endswith("conv.weight"):  # He scaling keeps activations O(1) through 90-odd layers
      sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    elif k.endswith("running_mean"):
      sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    elif k.endswith("running_var"):
      sd[k] = 0.5 + torch.rand(v.shape, generator=g)
    elif k.endswith("bn.weight"):
      sd[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
    elif k.endswith("bn.bias"):
      sd[k] = 0.1 * torch.randn(v.shape, generator=g)
  return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  torch = pytest.importorskip("torch")
  sd = random_fid_state_dict()
  path = tmp_path_factory.mktemp("fid") / "pt_inception_random.pth"
  torch.save(sd, path)
  return sd, str(path)


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_flax_inception_equals_pytorch_fid(weights, monkeypatch):
  torch = pytest.importorskip("torch")
  pt_inception = pytest.importorskip("pytorch_fid.inception")
  sd, path = weights
  # pytorch-fid's own FID network (its patched pools and blocks); the download is replaced by
  # the local random state dict, loaded strictly, so names and shapes must match torchvision's.
  monkeypatch.setattr(pt_inception, "load_state_dict_from_url", lambda *a, **k: sd)
  reference = pt_inception.InceptionV3([3]).eval()
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)  # pytorch-fid takes [0, 1]
  with torch.no_grad():
    want = reference(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()

  params = inception.load_params(path)
  got = np.asarray(jax.jit(inception.InceptionFID().apply)(params, images * 2 - 1))
  assert got.shape == (2, 2048)
  scale = np.abs(want).max()
  assert 1 < scale < 100  # He-scaled random weights keep features O(1)
  np.testing.assert_allclose(got, want, atol=5e-6 * scale, rtol=0)  # seen: 7e-6 abs at scale 13
  # The FID feature function: the same network on 8-bit-quantised images.
  from mcm_jax import fid  # pylint: disable=g-import-not-at-top
  feats, logits = fid.inception_feature_fn(path)(images * 2 - 1)
  quantized = np.round(images * 255) / 127.5 - 1
  np.testing.assert_allclose(feats, jax.jit(inception.InceptionFID().apply)(params, quantized),
                             atol=1e-5 * scale)
  assert logits is None


@pytest.mark.slow  # PyTorch equivalence at 299 px, seconds
def test_clean_fid_path_equals_clean_fid_resize_and_pytorch_fid_network(weights, monkeypatch):
  """t2i_eval's FID input: ``fid.clean_resize`` is clean-fid's own resizer (mode 'clean'), and
  ``clean_inception_feature_fn`` is pytorch-fid's network (no resize, no normalisation of its
  own) on TF's ``(x - 128) / 128`` of those pixels."""
  torch = pytest.importorskip("torch")
  pt_inception = pytest.importorskip("pytorch_fid.inception")
  cleanfid_resize = pytest.importorskip("cleanfid.resize")
  from mcm_jax import fid  # pylint: disable=g-import-not-at-top
  sd, path = weights
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)  # not square: axis order counts
  resize = cleanfid_resize.make_resizer("PIL", False, "bicubic", (299, 299))
  want_pixels = np.stack([resize(p) for p in pixels])
  got_pixels = np.stack([fid.clean_resize(p) for p in pixels])
  assert got_pixels.shape == (2, 299, 299, 3) and got_pixels.dtype == np.float32
  assert not np.array_equal(got_pixels, np.round(got_pixels))  # float, not re-quantised
  np.testing.assert_array_equal(got_pixels, want_pixels)
  np.testing.assert_array_equal(fid.to_inception_size(pixels / 127.5 - 1), want_pixels)

  monkeypatch.setattr(pt_inception, "load_state_dict_from_url", lambda *a, **k: sd)
  reference = pt_inception.InceptionV3([3], resize_input=False, normalize_input=False).eval()
  with torch.no_grad():
    x = torch.from_numpy((want_pixels - 128) / 128).permute(0, 3, 1, 2).float()
    want = reference(x)[0][:, :, 0, 0].numpy()
  got, logits = fid.clean_inception_feature_fn(path)(got_pixels)
  assert logits is None
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-6 * np.abs(want).max(), rtol=0)
  with pytest.raises(ValueError, match="299"):
    fid.clean_inception_feature_fn(path)(pixels.astype(np.float32))


def test_npz_weights_and_bad_state_dicts(weights, tmp_path):
  sd, path = weights
  npz = tmp_path / "w.npz"
  np.savez(npz, **{k: v.numpy() for k, v in sd.items()})
  a = inception.load_params(path)["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
  b = inception.load_params(str(npz))["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  with pytest.raises(FileNotFoundError, match="not found"):
    inception.load_params(str(tmp_path / "missing.pth"))
  broken = {k: v.numpy() for k, v in sd.items() if not k.startswith("Mixed_6b.")}
  with pytest.raises(ValueError, match="missing.*Mixed_6b"):
    inception.params_from_torch_state_dict(broken)
  bad_shape = {k: v.numpy() for k, v in sd.items()}
  bad_shape["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
    inception.params_from_torch_state_dict(bad_shape)


@pytest.mark.slow  # the tiny SDXL pipeline and the Inception at 299 px (seconds)
def test_t2i_eval_fid_of_a_set_with_itself_is_zero(weights, tiny_sdxl_dir, tiny_clip_model,
                                                   tmp_path):
  """``t2i_eval``'s FID: the reference folder holding the very images a step count generates
  (written as PNGs, read back) gives ~0; another step count's images give more."""
  from mcm_jax import pipeline, plotting, t2i_eval  # pylint: disable=g-import-not-at-top
  prompts = ["lower newer", "wider lowest", "newer", "lowest", "wider newer"]
  images = pipeline.generate_images(pipeline.load_pipeline(tiny_sdxl_dir), prompts, 2, 32,
                                    batch_size=2)
  (tmp_path / "ref").mkdir()
  for i, image in enumerate(images):
    plotting.save_image(str(tmp_path / "ref" / f"{i}.png"), image)
  (tmp_path / "ref" / "notes.txt").write_text("not an image")
  results = t2i_eval.evaluate(tiny_sdxl_dir, prompts, [2, 1], str(tmp_path / "out"),
                              str(tiny_clip_model.dir / "clip"), resolution=32, batch_size=2,
                              fid_reference=str(tmp_path / "ref"), inception_weights=weights[1])
  assert abs(results["2"]["fid"]) < 1e-3 * results["1"]["fid"]
  assert results["1"]["fid"] > 0
