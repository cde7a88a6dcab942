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

TINY_KINDS = ("flux", "flux_kontext", "chroma", "hunyuan_video", "wan_t2v", "wan_i2v", "wan_vace", "framepack",
              "wan22_t2v", "wan22_i2v", "wan22_ti2v", "wan22_ti2v_i2v", "qwen_image", "qwen_image_edit",
              "hunyuan_video15", "flux2_klein", "z_image")


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


def _qwen_tokenizer():
    """Byte-level BPE without merges (one token per byte), the tokenizer class the Qwen-based pipelines use."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Qwen2Tokenizer(vocab={ch: i for i, ch in enumerate(bytes_to_unicode().values())}, merges=[])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


_QWEN_VOCAB = 300  # 256 bytes + the tokenizer's special tokens


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


_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_image_parts(layers: int, tokenizer) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    start, end, image, video = tokenizer.convert_tokens_to_ids(_VISION_TOKENS)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=_QWEN_VOCAB, vision_start_token_id=start, vision_end_token_id=end,
        image_token_id=image, video_token_id=video,
    )
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer)


def _qwen_vl_tokenizer():
    tokenizer = _qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": _VISION_TOKENS})
    return tokenizer


def build_qwen_image(layers: int = 4):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**_qwen_image_parts(layers, _qwen_vl_tokenizer()))


def build_qwen_image_edit(layers: int = 2):
    """Slow for a tiny model (about a minute for 12 steps on a busy CPU): the pipeline resizes the input image to
    a 1024x1024-pixel area before encoding it, whatever the output size."""
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor, which needs torchvision."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    tokenizer = _qwen_vl_tokenizer()
    return QwenImageEditPipeline(processor=ImageOnlyProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer),
                                 **_qwen_image_parts(layers, tokenizer))


def build_hunyuan_video15(layers: int = 3):
    from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False).eval()
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        rope_theta=1000000.0, vocab_size=_QWEN_VOCAB,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})).eval()
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    pipe = HunyuanVideo15Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder=qwen,
        tokenizer=_qwen_tokenizer(), text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    # the real lengths (1000 text + 256 glyph + 729 image tokens) would make every tiny step take seconds
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 64, 16, 16
    return pipe


def build_flux2_klein(layers: int = 2, single_layers: int = 2):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    ).eval()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(intermediate_size=16, hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=2, vocab_size=_QWEN_VOCAB,
                                                max_position_embeddings=512)).eval()
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder,
                              tokenizer=_qwen_tokenizer(), transformer=transformer, vae=vae)


def build_z_image(layers: int = 3):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=layers, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    ).eval()
    with torch.no_grad():  # created with torch.empty: fix them so runs are reproducible
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[32, 64],
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=_QWEN_VOCAB,
                                          max_position_embeddings=512)).eval()
    return ZImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                          text_encoder=text_encoder, tokenizer=_qwen_tokenizer())


def _wan_unipc(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


def build_wan22_t2v(layers: int = 4):
    """Two experts (``transformer`` high-noise, ``transformer_2`` low-noise) with Wan2.2 T2V-A14B's boundary and
    shift, so a run switches experts part-way (after 6 of 8 steps)."""
    from diffusers import WanPipeline

    return WanPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=_wan_vae(), scheduler=_wan_unipc(12.0),
        transformer=_wan_transformer(layers=layers), transformer_2=_wan_transformer(layers=layers), boundary_ratio=0.875,
    )


def build_wan22_i2v(layers: int = 4):
    """Wan2.2 I2V-A14B: two 36-channel experts, no CLIP image encoder, boundary 0.9, shift 5."""
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=_wan_vae(), scheduler=_wan_unipc(5.0),
        image_processor=None, image_encoder=None, transformer=_wan_transformer(in_channels=36, layers=layers),
        transformer_2=_wan_transformer(in_channels=36, layers=layers), boundary_ratio=0.900,
    )


def build_wan22_ti2v(image: bool = False, layers: int = 4):
    """Wan2.2 TI2V-5B's pipeline mode (``expand_timesteps``: per-token timesteps, the input image as the first
    latent frame) on the Wan2.1-sized tiny VAE."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    parts = dict(tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(32, umt5=True), vae=_wan_vae(),
                 scheduler=_wan_unipc(5.0), transformer=_wan_transformer(layers=layers), expand_timesteps=True)
    if image:
        return WanImageToVideoPipeline(image_processor=None, image_encoder=None, **parts)
    return WanPipeline(**parts)


BUILDERS: dict[str, Callable[[], object]] = {
    "flux": build_flux,
    "flux_kontext": lambda: build_flux(kontext=True),
    "chroma": build_chroma,
    "hunyuan_video": build_hunyuan_video,
    "wan_t2v": build_wan_t2v,
    "wan_i2v": build_wan_i2v,
    "wan_vace": build_wan_vace,
    "framepack": build_framepack,
    "wan22_t2v": build_wan22_t2v,
    "wan22_i2v": build_wan22_i2v,
    "wan22_ti2v": build_wan22_ti2v,
    "wan22_ti2v_i2v": lambda: build_wan22_ti2v(image=True),
    "qwen_image": build_qwen_image,
    "qwen_image_edit": build_qwen_image_edit,
    "hunyuan_video15": build_hunyuan_video15,
    "flux2_klein": build_flux2_klein,
    "z_image": build_z_image,
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
    elif kind == "flux2_klein":
        kw.update(height=32, width=32, text_encoder_out_layers=(1,), max_sequence_length=64)
    elif kind in ("qwen_image", "z_image"):
        kw.update(height=32, width=32, max_sequence_length=64)
    elif kind == "hunyuan_video15":
        kw.update(height=16, width=16, num_frames=9)
    elif kind == "qwen_image_edit":
        kw.update(image=image, height=32, width=32)
    elif kind == "flux_kontext":
        kw.update(image=image, height=32, width=32, _auto_resize=False, max_area=32 * 32)
    elif kind == "hunyuan_video":
        kw.update(height=16, width=16, num_frames=5, prompt_template={"template": "{}", "crop_start": 0})
    elif kind == "framepack":
        kw.update(image=image, height=32, width=32, num_frames=9, latent_window_size=3,
                  prompt_template={"template": "{}", "crop_start": 0})
    elif kind in ("wan_t2v", "wan22_t2v", "wan22_ti2v"):
        kw.update(height=16, width=16, num_frames=9)
    elif kind in ("wan_i2v", "wan22_i2v", "wan22_ti2v_i2v"):
        kw.update(image=image, height=16, width=16, num_frames=9)
    elif kind == "wan_vace":
        frames = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(9)]
        kw.update(video=frames, height=16, width=16, num_frames=9)
    else:
        raise KeyError(kind)
    return kw
