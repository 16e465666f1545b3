"""The evaluation scorers against PyTorch references on tiny random weights of the same
architecture: ImageReward (BLIP ViT + BERT with cross-attention + MLP head) read from its
checkpoint layout, against transformers' PyTorch BLIP vision and text models."""
import json

import numpy as np
import pytest

from mcm_jax import rewards, scorers

pytestmark = pytest.mark.slow  # builds and compiles tiny models (seconds)

WORDS = ["a", "red", "fox", "in", "the", "snow", "cat", "photo", "of"]
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=2, image_size=32, patch_size=16, layer_norm_eps=1e-6,
              hidden_act="gelu")
MED = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
           max_position_embeddings=40, layer_norm_eps=1e-12, encoder_width=128,
           add_cross_attention=True, hidden_act="gelu")


def _randomise(module, torch):
  """Weights ~ N(0, 1 / fan_in) (biases and norms near their identity) so every layer acts."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
      else:
        p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name.lower() and "weight" in name
                                             else 0.0))


def _imagereward_state_dict(vision, text, head):
  """ImageReward.pt's layout (``blip.visual_encoder.*`` timm-style, ``blip.text_encoder.*``,
  ``mlp.layers.*``) from transformers' BLIP models: the inverse of transformers' BLIP conversion
  (``convert_blip_original_pytorch_to_hf.rename_key``)."""
  inverse = [("embeddings.class_embedding", "cls_token"),
             ("embeddings.position_embedding", "pos_embed"),
             ("embeddings.patch_embedding", "patch_embed.proj"), ("post_layernorm", "norm"),
             ("encoder.layers", "blocks"), ("self_attn.projection", "attn.proj"),
             ("self_attn", "attn"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2")]
  sd = {}
  for key, value in vision.state_dict().items():
    for old, new in inverse:
      key = key.replace(old, new)
    sd["blip.visual_encoder." + key] = value
  sd.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
  sd.update({"mlp.layers." + k: v for k, v in head.state_dict().items()})
  sd["blip.vision_proj.weight"] = vision.state_dict()["post_layernorm.weight"][:8, None]
  return sd


@pytest.fixture(name="imagereward", scope="module")
def _imagereward(tmp_path_factory):
  """(directory, PyTorch score function) of a tiny random ImageReward."""
  torch = pytest.importorskip("torch")
  from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top
  from transformers.models.blip import modeling_blip, modeling_blip_text  # pylint: disable=g-import-not-at-top
  from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("imagereward")
  (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                            + WORDS) + "\n")
  tokenizer = BertTokenizer(str(path / "vocab.txt"))
  tokenizer.save_pretrained(str(path))
  med = dict(MED, vocab_size=len(WORDS) + 7)  # BLIP's tokenizer adds [DEC] and [ENC]
  (path / "med_config.json").write_text(json.dumps(med))
  torch.manual_seed(0)
  vision = modeling_blip.BlipVisionModel(BlipVisionConfig(**VISION)).eval()
  text = modeling_blip_text.BlipTextModel(BlipTextConfig(
      vocab_size=med["vocab_size"], hidden_size=64, encoder_hidden_size=128,
      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu"),
      add_pooling_layer=False).eval()
  sizes = (64, 1024, 128, 64, 16, 1)
  head = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Dropout(0.2),
                             torch.nn.Linear(sizes[1], sizes[2]), torch.nn.Dropout(0.2),
                             torch.nn.Linear(sizes[2], sizes[3]), torch.nn.Dropout(0.1),
                             torch.nn.Linear(sizes[3], sizes[4]),
                             torch.nn.Linear(sizes[4], sizes[5])).eval()
  for module in (vision, text, head):
    _randomise(module, torch)
  torch.save(_imagereward_state_dict(vision, text, head), str(path / "ImageReward.pt"))

  def torch_score(images, prompts):
    """ImageReward.score_gard on CLIP-normalised pixels (images at the ViT's size)."""
    pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
        torch.from_numpy(rewards.CLIP_STD)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                       return_tensors="pt")
    with torch.no_grad():
      image = vision(pixel_values=pixels.permute(0, 3, 1, 2).float()).last_hidden_state
      h = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
               encoder_hidden_states=image).last_hidden_state[:, 0]
      return ((head(h)[:, 0] - 0.16717362830052426) / 1.0333394966054072).numpy()

  return path, torch_score


def test_imagereward_equals_pytorch(imagereward):
  import jax  # pylint: disable=g-import-not-at-top
  path, torch_score = imagereward
  model = scorers.load_imagereward(str(path))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  prompts = ["a red fox in the snow", "a photo of a cat", "snow"]
  got = np.asarray(jax.jit(model.score)(model.params, images, model.tokenize(prompts)))
  want = torch_score(images, prompts)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.ptp(want) > 1e-2  # the scores differ between (image, prompt) pairs
  swapped = np.asarray(model.score(model.params, images, model.tokenize(prompts[::-1])))
  assert np.abs(swapped - got).max() > 1e-3  # the prompt matters


def test_imagereward_bad_directories(imagereward, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  path, _ = imagereward
  with pytest.raises(FileNotFoundError, match="has no ImageReward.pt"):
    scorers.load_imagereward(str(tmp_path))
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  (broken / "ImageReward.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
    scorers.load_imagereward(str(broken))
  other = tmp_path / "other"
  shutil.copytree(path, other)
  (other / "med_config.json").write_text(json.dumps(dict(MED, vocab_size=16, hidden_size=32)))
  with pytest.raises(ValueError, match="do not fit the architecture"):
    scorers.load_imagereward(str(other))


def test_t2i_eval_reports_imagereward(imagereward, tiny_sdxl_dir, tiny_clip_model, tmp_path):
  """``t2i_eval`` with ``imagereward_dir``: the column equals the PyTorch scores of the images
  ``generate_images`` gives for the same settings."""
  from mcm_jax import pipeline, t2i_eval  # pylint: disable=g-import-not-at-top
  path, torch_score = imagereward
  prompts = ["a red fox in the snow", "a photo of a cat", "snow"]
  results = t2i_eval.evaluate(tiny_sdxl_dir, prompts, [2], str(tmp_path / "out"),
                              str(tiny_clip_model.dir / "clip"), resolution=32, batch_size=2,
                              imagereward_dir=str(path))
  images = pipeline.generate_images(pipeline.load_pipeline(tiny_sdxl_dir), prompts, 2, 32,
                                    batch_size=2)
  np.testing.assert_allclose(results["2"]["imagereward"],
                             float(np.mean(torch_score(images, prompts))), rtol=1e-4, atol=1e-4)
