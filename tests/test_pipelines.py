"""Our export inside diffusers pipelines built offline from tiny components (tiny UNet / SD3
transformer, tiny CLIP text encoders from transformers, a tokenizer from a vocabulary written here):
the pipelines run with it and decode with the scale the export measured."""

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from first_stage.export import ExportSource, export_autoencoder


def tokenizer(tmp_path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges), written to disk and loaded from it."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)


def text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=1, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


@pytest.fixture
def exported(tiny_vae, images, tmp_path):
    """The tiny VAE exported with its measured scale, then loaded as users load it."""
    export_autoencoder(tiny_vae, tmp_path / "vae", [images], ExportSource("test", "test"))
    return AutoencoderKL.from_pretrained(tmp_path / "vae")


def decode_as_expected(pipe, vae, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        image = vae.decode(latents).sample
    return pipe.image_processor.postprocess(image, output_type="np")


def test_stable_diffusion_pipeline_decodes_with_our_scaling_factor(exported, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    pipe = StableDiffusionPipeline(vae=exported, text_encoder=CLIPTextModel(text_config()),
                                   tokenizer=tokenizer(tmp_path), unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    call = dict(prompt="a cat", height=16, width=16, num_inference_steps=2)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and image.shape == (1, 16, 16, 3)
    scale = exported.config.scaling_factor
    np.testing.assert_allclose(image, decode_as_expected(pipe, exported, latents / scale), atol=1e-5)
    # ... and not with SD 1.x's constant: the check can fail
    assert np.abs(image - decode_as_expected(pipe, exported, latents / 0.18215)).max() > 1e-2


def test_sd3_pipeline_decodes_with_our_shift_and_scale(exported, tmp_path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64)
    encoder = CLIPTextModelWithProjection(text_config(projection_dim=32))
    encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=32))
    tok = tokenizer(tmp_path)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=exported,
                                    text_encoder=encoder, tokenizer=tok, text_encoder_2=encoder_2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    call = dict(prompt="a cat", height=16, width=16, num_inference_steps=2, max_sequence_length=8)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).images
    scale, shift = exported.config.scaling_factor, exported.config.shift_factor
    assert shift is not None and abs(shift) > 1e-3
    np.testing.assert_allclose(image, decode_as_expected(pipe, exported, latents / scale + shift), atol=1e-5)
    assert np.abs(image - decode_as_expected(pipe, exported, latents / scale)).max() > 1e-3
