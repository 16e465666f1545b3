"""Tiny random SDXL-architecture components written in diffusers' directory layout (PyTorch
safetensors + tokenizer files), for the tests: nothing is downloaded.

torch, diffusers and transformers are imported inside the functions, so importing this module is
cheap; the session fixtures in conftest.py (``tiny_sdxl_dir``, ``tiny_clip``, ``tiny_clip_model``)
call these once per session."""
import json
import os

import numpy as np

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
         "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
         "<|startoftext|>", "<|endoftext|>"]  # end-of-text last: CLIP pools at argmax(id)
MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>", ""]


def write_tokenizer(directory):
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  vocab, merges = os.path.join(directory, "v.json"), os.path.join(directory, "m.txt")
  json.dump({t: i for i, t in enumerate(VOCAB)}, open(vocab, "w"))
  open(merges, "w").write("\n".join(MERGES))
  tok = CLIPTokenizer(vocab, merges, model_max_length=77)
  tok.save_pretrained(directory)
  return tok


TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
    norm_num_groups=32, sample_size=16, scaling_factor=0.13025, layers_per_block=1)


def tiny_torch_unet(seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**sdxl.TINY_UNET_CONFIG).eval()
  with torch.no_grad():  # make every weight non-trivial
    for p in unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return unet


def sdxl_structure_config():
  """SDXL base's UNet structure -- three levels, transformer depths 1 / 2 / 10, layers_per_block
  2, text_time added conditioning, SDXL's module names -- at reduced widths (32 / 64 / 128
  channels, 32-wide heads, 32-wide text): names, scans, LoRA key maps (560 modules) and export
  at the real structure in seconds."""
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  return dict(sdxl.SDXL_BASE_UNET_CONFIG, sample_size=16, block_out_channels=(32, 64, 128),
              attention_head_dim=(1, 2, 4), cross_attention_dim=32, addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=8 * 6 + 32)


def structure_torch_unet(seed=0):
  """A PyTorch UNet of ``sdxl_structure_config`` with weights ~ N(0, 1/fan_in) (so every layer,
  the GELUs included, works at the scale of a trained network)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**sdxl_structure_config()).eval()
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
      else:
        p.copy_(0.05 * torch.randn_like(p) + (1.0 if "norm" in name and "weight" in name else 0))
  return unet


def diffusers_sdxl_pipeline(sdxl_dir, unet=None, scheduler=None):
  """diffusers' PyTorch ``StableDiffusionXLPipeline`` of the directory: its VAE, text encoders
  and tokenizers, ``unet`` (default the directory's) and ``scheduler`` (default SDXL base's:
  EulerDiscreteScheduler, scaled-linear betas, 'leading' spacing, steps_offset 1)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  part = lambda cls, name: cls.from_pretrained(os.path.join(sdxl_dir, name)).eval()
  scheduler = scheduler or diffusers.EulerDiscreteScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      timestep_spacing="leading", steps_offset=1)
  return diffusers.StableDiffusionXLPipeline(
      vae=part(diffusers.AutoencoderKL, "vae"),
      text_encoder=part(transformers.CLIPTextModel, "text_encoder"),
      text_encoder_2=part(transformers.CLIPTextModelWithProjection, "text_encoder_2"),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(sdxl_dir, "tokenizer")),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(
          os.path.join(sdxl_dir, "tokenizer_2")),
      unet=unet or part(diffusers.UNet2DConditionModel, "unet"), scheduler=scheduler,
      add_watermarker=False)


def tiny_torch_controlnet(unet, seed=0, **config):
  """diffusers' PyTorch ``ControlNetModel`` made from ``unet`` (``from_unet``) with a 2-level
  conditioning embedding (16 / 32 channels: the tiny VAE's factor 2) and every weight, the zero
  convolutions included, ~ N(0, 1 / fan_in); ``config`` overrides fields of its config."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import ControlNetModel  # pylint: disable=g-import-not-at-top
  model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
  if config:
    state = model.state_dict()
    model = ControlNetModel.from_config(dict(model.config, **config))
    model.load_state_dict(state)
  torch.manual_seed(seed)
  _randomise(model, torch)
  return model.eval()


def tiny_torch_vae(seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return AutoencoderKL(**TINY_VAE_CONFIG).eval()


def write_tiny_sdxl(path, seed=0):
  """A whole tiny SDXL directory: unet/, vae/, text_encoder(_2)/, tokenizer(_2)/ (safetensors).
  Text widths 16 + 16 = the tiny UNet's cross-attention width 32; pooled projection 32."""
  tiny_torch_unet(seed).save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
  tiny_torch_vae(seed).save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
  write_text_components(path, seed, hidden=(16, 16))
  return path


def tiny_text_encoders(seed=0, hidden=(32, 48), projection=32):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  kw = dict(vocab_size=len(VOCAB), intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=len(VOCAB) - 2,
            eos_token_id=len(VOCAB) - 1, pad_token_id=len(VOCAB) - 1, hidden_act="gelu")
  one = CLIPTextModel(CLIPTextConfig(hidden_size=hidden[0], projection_dim=projection, **kw))
  two = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=hidden[1],
                                                   projection_dim=projection, **kw))
  return one.eval(), two.eval()


def write_text_components(path, seed=0, hidden=(32, 48)):
  one, two = tiny_text_encoders(seed, hidden)
  one.save_pretrained(os.path.join(path, "text_encoder"), safe_serialization=True)
  two.save_pretrained(os.path.join(path, "text_encoder_2"), safe_serialization=True)
  for name in ("tokenizer", "tokenizer_2"):
    write_tokenizer(os.path.join(path, name))
  return one, two


def torch_text_embeddings(one, two, tokenizer, prompts):
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.from_numpy(np.asarray(tokenizer(prompts, padding="max_length", truncation=True,
                                              max_length=77, return_tensors="np").input_ids))
  with torch.no_grad():
    h1 = one(ids, output_hidden_states=True).hidden_states[-2]
    out2 = two(ids, output_hidden_states=True)
  return (torch.cat([h1, out2.hidden_states[-2]], -1).numpy(), out2.text_embeds.numpy())


def tiny_clip_and_head(tmp_path, seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8, projection_dim=16, hidden_act="gelu")).eval()
  clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
  return clip, tiny_head(tmp_path)


def tiny_clip_model_and_head(tmp_path, seed=0):
  """A whole tiny CLIP model (text + vision towers, as openai/clip-vit-large-patch14 ships) with
  this module's tokenizer, saved to ``tmp_path / "clip"``, and a head in ``tmp_path / "head.pth"``:
  (clip, tokenizer, head)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
  n = len(VOCAB)
  clip = CLIPModel(CLIPConfig(
      text_config=dict(small, vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2,
                       eos_token_id=n - 1, pad_token_id=n - 1),
      vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)).eval()
  clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
  tok = write_tokenizer(str(tmp_path / "clip"))
  return clip, tok, tiny_head(tmp_path)


def tiny_head(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  # The released predictor's layout: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear,
  # Linear (indices 0, 2, 4, 6, 7), here 16 -> 32 -> 8 -> 4 -> 2 -> 1.
  head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2),
                             torch.nn.Linear(32, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 4),
                             torch.nn.Dropout(0.1), torch.nn.Linear(4, 2),
                             torch.nn.Linear(2, 1)).eval()
  torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "head.pth")
  return head


IMAGEREWARD_WORDS = ["a", "red", "fox", "in", "the", "snow", "cat", "photo", "of", "lower",
                     "newer", "wider", "lowest"]
IMAGEREWARD_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=2, image_size=32, patch_size=16,
                          layer_norm_eps=1e-6, hidden_act="gelu")
IMAGEREWARD_MED = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, max_position_embeddings=40, layer_norm_eps=1e-12,
                       encoder_width=128, add_cross_attention=True, hidden_act="gelu")


def _randomise(module, torch):
  """Weights ~ N(0, 1 / fan_in) (biases and norms near their identity) so every layer acts."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
      else:
        p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name.lower() and "weight" in name
                                             else 0.0))


def imagereward_state_dict(vision, text, head):
  """ImageReward.pt's layout (``blip.visual_encoder.*`` timm-style, ``blip.text_encoder.*``,
  ``mlp.layers.*``) from the state dicts of transformers' BLIP vision and text models and the
  MLP head: the inverse of transformers' BLIP conversion
  (``convert_blip_original_pytorch_to_hf.rename_key``)."""
  inverse = [("embeddings.class_embedding", "cls_token"),
             ("embeddings.position_embedding", "pos_embed"),
             ("embeddings.patch_embedding", "patch_embed.proj"), ("post_layernorm", "norm"),
             ("encoder.layers", "blocks"), ("self_attn.projection", "attn.proj"),
             ("self_attn", "attn"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2")]
  sd = {}
  for key, value in vision.items():
    for old, new in inverse:
      key = key.replace(old, new)
    sd["blip.visual_encoder." + key] = value
  sd.update({"blip.text_encoder." + k: v for k, v in text.items()})
  sd.update({"mlp.layers." + k: v for k, v in head.items()})
  sd["blip.vision_proj.weight"] = vision["post_layernorm.weight"][:8, None]  # unused by scoring
  return sd


def write_tiny_imagereward(path, seed=0):
  """A tiny random ImageReward directory at ``path`` (``ImageReward.pt`` in the published layout,
  ``med_config.json``, a BERT ``vocab.txt``); returns ``score(images [-1, 1] NHWC at 32 px,
  prompts) -> [B]`` computed by transformers' PyTorch BLIP models (ImageReward.score_gard)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top
  from transformers.models.blip import modeling_blip, modeling_blip_text  # pylint: disable=g-import-not-at-top
  from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig  # pylint: disable=g-import-not-at-top
  (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                            + IMAGEREWARD_WORDS) + "\n")
  tokenizer = BertTokenizer(str(path / "vocab.txt"))
  tokenizer.save_pretrained(str(path))
  # 5 special tokens, the words, and the [DEC] / [ENC] tokens BLIP's tokenizer adds.
  med = dict(IMAGEREWARD_MED, vocab_size=len(IMAGEREWARD_WORDS) + 7)
  (path / "med_config.json").write_text(json.dumps(med))
  torch.manual_seed(seed)
  vision = modeling_blip.BlipVisionModel(BlipVisionConfig(**IMAGEREWARD_VISION)).eval()
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
  torch.save(imagereward_state_dict(vision.state_dict(), text.state_dict(), head.state_dict()),
             str(path / "ImageReward.pt"))

  def torch_score(images, prompts):
    """ImageReward.score_gard on CLIP-normalised pixels (images at the ViT's size)."""
    from mcm_jax.rewards import CLIP_MEAN, CLIP_STD  # pylint: disable=g-import-not-at-top
    pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(CLIP_MEAN)) / \
        torch.from_numpy(CLIP_STD)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                       return_tensors="pt")
    with torch.no_grad():
      image = vision(pixel_values=pixels.permute(0, 3, 1, 2).float()).last_hidden_state
      h = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
               encoder_hidden_states=image).last_hidden_state[:, 0]
      return ((head(h)[:, 0] - 0.16717362830052426) / 1.0333394966054072).numpy()

  return torch_score
