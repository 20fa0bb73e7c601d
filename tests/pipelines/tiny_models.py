"""Tiny randomly initialised video transformers of the four supported families, with matching inputs
(latent grid 4 x 8 x 8 = 256 video tokens), built from configs: nothing is downloaded."""

from __future__ import annotations

import torch

GRID = (4, 8, 8)


def wan(layers: int = 3):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    t, h, w = GRID
    inputs = dict(hidden_states=torch.randn(1, 4, t, 2 * h, 2 * w), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 5, 16))
    return model, inputs


def cogvideox(layers: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=16,
        num_layers=layers, sample_width=16, sample_height=16, sample_frames=13, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=6, use_rotary_positional_embeddings=True,
    )
    t, h, w = GRID
    inputs = dict(hidden_states=torch.randn(1, t, 4, 2 * h, 2 * w), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 6, 16))
    return model, inputs


def hunyuan(layers: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers, num_single_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    t, h, w = GRID
    mask = torch.ones(1, 7, dtype=torch.bool)
    mask[:, 5:] = False  # padded text tokens
    inputs = dict(
        hidden_states=torch.randn(1, 4, t, h, w), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 7, 16),
        encoder_attention_mask=mask, pooled_projections=torch.randn(1, 8), guidance=torch.tensor([3500.0]),
    )
    return model, inputs


def ltx(layers: int = 2):
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=layers, caption_channels=16,
    )
    t, h, w = GRID
    inputs = dict(
        hidden_states=torch.randn(1, t * h * w, 4), encoder_hidden_states=torch.randn(1, 5, 16), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 5), num_frames=t, height=h, width=w,
    )
    return model, inputs


FAMILIES = {"wan": wan, "cogvideox": cogvideox, "hunyuanvideo": hunyuan, "ltx": ltx}


def save_wan_pipeline(folder) -> None:
    """A complete tiny WanPipeline (word-level tokenizer, UMT5 text encoder, VAE, scheduler) saved to
    ``folder``, loadable offline with ``DiffusionPipeline.from_pretrained``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "in", "the", "snow"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    transformer, _ = wan(2)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)
    pipe.save_pretrained(folder)


def pipeline(family: str):
    """``(pipe, call kwargs, transformer passes per step)`` for a tiny pipeline of ``family`` driven by
    prompt embeddings (no text encoder) that returns latents (no VAE), on the grid ``GRID``."""
    from diffusers import (
        CogVideoXDDIMScheduler, CogVideoXPipeline, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, LTXPipeline, WanPipeline,
    )

    torch.manual_seed(0)
    transformer, _ = FAMILIES[family]()
    common = dict(num_inference_steps=4, output_type="latent")
    if family == "wan":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)
        kw = dict(prompt_embeds=torch.randn(1, 5, 16), negative_prompt_embeds=torch.randn(1, 5, 16), height=128, width=128, num_frames=13,
                  guidance_scale=5.0)
        return pipe, kw | common, 2  # cond and uncond as two forwards
    if family == "cogvideox":
        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=CogVideoXDDIMScheduler())
        kw = dict(prompt_embeds=torch.randn(1, 6, 16), negative_prompt_embeds=torch.randn(1, 6, 16), height=128, width=128, num_frames=13)
        return pipe, kw | common, 1  # CFG batched into one forward
    if family == "hunyuanvideo":
        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)
        mask = torch.ones(1, 7)
        mask[:, 5:] = 0
        kw = dict(prompt_embeds=torch.randn(1, 7, 16), pooled_prompt_embeds=torch.randn(1, 8), prompt_attention_mask=mask,
                  height=64, width=64, num_frames=13)
        return pipe, kw | common, 1  # embedded guidance: one forward
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    kw = dict(prompt_embeds=torch.randn(1, 5, 16), prompt_attention_mask=torch.ones(1, 5), negative_prompt_embeds=torch.randn(1, 5, 16),
              negative_prompt_attention_mask=torch.ones(1, 5), height=256, width=256, num_frames=25)
    return pipe, kw | common, 1  # CFG batched


# Context parallelism (Ulysses over two gloo processes): the families and the configs compared with one
# process. Text lengths are even, so the plans can split them in two.
CONTEXT_PARALLEL_FAMILIES = ("wan", "ltx", "hunyuanvideo", "cogvideox")


def _context_parallel_cases() -> dict:
    from vzoo.pipelines import DenseConfig, PSAConfig, VMoBAConfig

    return {
        "dense": DenseConfig(),
        "vmoba": VMoBAConfig(temporal_block=(2,), spatial_block=(4, 4), cube_block=(2, 4, 4), topk=(1, 2, 3),
                             dense_warmup=0.0, dense_fallback=False),
        "psa": PSAConfig(block_q=16, block_k=16, dense_warmup=0.0, dense_fallback=False),
        # the dense fallback decided per call: on the density of all heads, as one process does
        "vmoba-fallback": VMoBAConfig(temporal_block=(2,), spatial_block=(4, 4), cube_block=(2, 4, 4), topk=(1, 2, 3),
                                      dense_warmup=0.0),
        "psa-fallback": PSAConfig(block_q=16, block_k=16, dense_warmup=0.0),
    }


CONTEXT_PARALLEL_CASES = _context_parallel_cases()


def context_parallel_model(family: str):
    """The tiny ``family`` model and inputs, seeded, with 6 text tokens (HunyuanVideo: the last one
    padding). LTX's text mask is ``None``: diffusers 0.42 does not split an attention mask by heads
    under Ulysses (its cross-attention fails with the mask, dense or not)."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    text = torch.randn(1, 6, inputs["encoder_hidden_states"].shape[-1])
    inputs["encoder_hidden_states"] = text
    if family == "ltx":
        inputs["encoder_attention_mask"] = None  # given (the plan looks it up), but no mask
    if family == "hunyuanvideo":
        inputs["encoder_attention_mask"] = torch.tensor([[True] * 5 + [False]])  # a padded text token
    if family == "cogvideox":  # rotary tables of the video tokens, passed by the pipeline (split by the plan)
        inputs["image_rotary_emb"] = (torch.randn(256, 16), torch.randn(256, 16))
    return model, inputs
