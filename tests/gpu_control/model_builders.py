"""Tiny real model builders shared by the engine's tests (configurations in code, no Hub)."""

from __future__ import annotations

from typing import Any

import pytest
import torch


def sd_pipeline() -> Any:
    """A StableDiffusionPipeline of tiny real components (UNet, VAE, CLIP text encoder, a 9-token vocab)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    vocab = ["<|startoftext|>", "<|endoftext|>", "a", "b", "c", "a</w>", "b</w>", "c</w>", "ab</w>"]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    tokenizer = transformers.CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=[("a", "b</w>")], model_max_length=8
    )
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=100, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=transformers.CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
