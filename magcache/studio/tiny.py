"""Tiny random-weight diffusers pipelines of every supported class, built in code, offline, in milliseconds.

They run the real diffusers code paths (pipeline ``__call__``, schedulers, transformers, VAEs) with models a few
thousand parameters big, so tests and the app's offline mode (``MAGCACHE_TINY=1``) exercise every adapter on a CPU
without any download. Outputs are noise-like: these pipelines check plumbing, never image quality.
Configurations follow diffusers' own tests of these pipelines, with larger block stacks so that skipping blocks
is visible in timings.
"""

from __future__ import annotations

import string
from typing import Callable

import torch

TINY_KINDS = ("flux", "flux_kontext", "chroma", "hunyuan_video", "wan_t2v", "wan_i2v", "wan_vace", "framepack")


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    vocab += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    base = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {c: i for i, c in enumerate(base)} | {c + "</w>": len(base) + i for i, c in enumerate(base)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _llama_tokenizer():
    from transformers import LlamaTokenizer

    chars = ["\u2581"] + list(string.ascii_letters + string.digits + ".,!?'-<>|_\n:")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(chars)}
    return LlamaTokenizer(vocab=vocab, merges=[], model_max_length=256, padding_side="right", pad_token="<unk>")


def _t5_encoder(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=1000, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, dropout_rate=0.0)
    model = UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))
    return model.eval()


def _clip_text(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu", projection_dim=hidden)
    return CLIPTextModel(cfg).eval()


def _flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035).eval()


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()


def build_flux(kontext: bool = False, layers: int = 2, single_layers: int = 4):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(), text_encoder=_clip_text(32),
        tokenizer=_clip_tokenizer(), text_encoder_2=_t5_encoder(32), tokenizer_2=_t5_tokenizer(),
        transformer=transformer, image_encoder=None, feature_extractor=None,
    )


def build_chroma(layers: int = 2, single_layers: int = 4):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
        approximator_layers=1, approximator_num_channels=16,
    ).eval()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(), text_encoder=_t5_encoder(32),
                          tokenizer=_t5_tokenizer(), transformer=transformer)


def build_hunyuan_video(layers: int = 2, single_layers: int = 2):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    llama = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                   vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=_llama_tokenizer(), transformer=transformer, vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=_clip_text(8),
        tokenizer_2=_clip_tokenizer(),
    )


def build_framepack(layers: int = 2, single_layers: int = 2):
    from diffusers import (FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline,
                           HunyuanVideoFramepackTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    transformer = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
        has_image_proj=True, image_proj_dim=32, has_clean_x_embedder=True,
    ).eval()
    llama = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                   vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                  num_hidden_layers=2, image_size=30, patch_size=2)).eval()
    return HunyuanVideoFramepackPipeline(
        text_encoder=llama, tokenizer=_llama_tokenizer(), transformer=transformer, vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=_clip_text(8),
        tokenizer_2=_clip_tokenizer(), image_encoder=siglip,
        feature_extractor=SiglipImageProcessor(size={"height": 30, "width": 30}),
    )


def _wan_transformer(in_channels: int = 16, image_dim: int | None = None, layers: int = 4):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
    ).eval()


def build_wan_t2v(layers: int = 4):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    return WanPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=_wan_transformer(layers=layers),
    )


def build_wan_i2v(layers: int = 4):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1)).eval()
    return WanImageToVideoPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=image_encoder,
        transformer=_wan_transformer(in_channels=36, image_dim=4, layers=layers),
    )


def build_wan_vace(layers: int = 4):
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel

    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=96,
    ).eval()
    return WanVACEPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer,
    )


BUILDERS: dict[str, Callable[[], object]] = {
    "flux": build_flux,
    "flux_kontext": lambda: build_flux(kontext=True),
    "chroma": build_chroma,
    "hunyuan_video": build_hunyuan_video,
    "wan_t2v": build_wan_t2v,
    "wan_i2v": build_wan_i2v,
    "wan_vace": build_wan_vace,
    "framepack": build_framepack,
}


def build_tiny_pipeline(kind: str, seed: int = 0):
    """A tiny pipeline of ``kind`` (one of ``TINY_KINDS``) with weights drawn from ``seed``."""
    if kind not in BUILDERS:
        raise KeyError(f"no tiny pipeline {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe = BUILDERS[kind]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(kind: str, num_inference_steps: int = 8, seed: int = 0) -> dict:
    """Arguments for a quick, valid call of the tiny pipeline ``kind`` (inputs images/videos included)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw: dict = dict(prompt="a red circle on a blue background", num_inference_steps=num_inference_steps,
                    generator=torch.Generator().manual_seed(seed))
    if kind in ("flux", "chroma"):
        kw.update(height=32, width=32)
    elif kind == "flux_kontext":
        kw.update(image=image, height=32, width=32, _auto_resize=False, max_area=32 * 32)
    elif kind == "hunyuan_video":
        kw.update(height=16, width=16, num_frames=5, prompt_template={"template": "{}", "crop_start": 0})
    elif kind == "framepack":
        kw.update(image=image, height=32, width=32, num_frames=9, latent_window_size=3,
                  prompt_template={"template": "{}", "crop_start": 0})
    elif kind == "wan_t2v":
        kw.update(height=16, width=16, num_frames=9)
    elif kind == "wan_i2v":
        kw.update(image=image, height=16, width=16, num_frames=9)
    elif kind == "wan_vace":
        frames = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(9)]
        kw.update(video=frames, height=16, width=16, num_frames=9)
    else:
        raise KeyError(kind)
    return kw
