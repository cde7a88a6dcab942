"""Benchmark workloads: a random-weight transformer and a bare denoising loop (no text encoders, no VAE).

The loop calls the transformer once per step and branch (Wan: cond + uncond
with ``cache_context``, as ``WanPipeline`` does) and takes an Euler step on a flow-matching sigma schedule. Weights
are random and scaled by 0.05 so activations stay finite; timings do not depend on the values.

Sizes:
* ``tiny``: the shapes of ``magcache/studio/tiny.py`` (a few thousand parameters): Python overhead dominates.
* ``mid``:  shaped like the real model (same block types, RoPE axes, text width) but narrow and short, with ~1024
            image tokens, so a CPU step takes ~0.1-0.5 s and block compute dominates.
* ``full``: the real configurations (FLUX.1-dev 12B at 1024², Wan2.1 1.3B at 480p, HunyuanVideo 13B) in bf16 on
            a GPU. Video sizes can be reduced with ``--frames``/``--height``/``--width``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MODELS = ("flux", "wan", "hunyuan")
SIZES = ("tiny", "mid", "full")

# preset used for the ratio curve and reference defaults of each model
PRESETS = {"flux": "flux", "wan": "wan2.1_t2v_1.3B", "hunyuan": "hunyuan_video"}


@dataclass
class Workload:
    model: str
    size: str
    transformer: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    num_steps: int
    branches: tuple[str, ...]  # transformer calls per step, in order (their cache_context names)
    inputs: dict[str, Any]  # fixed keyword inputs of every call (text embeddings, ids, ...)
    latents: torch.Tensor  # initial noise
    make_call: Callable[["Workload", torch.Tensor, float, str], dict[str, Any]]  # per-call kwargs
    guidance_scale: float = 1.0  # real CFG (two branches) mixes cond/uncond with this scale
    description: dict[str, Any] = field(default_factory=dict)
    preset_name: str | None = None  # the MagCache preset (default: PRESETS[model]); None where none exists
    output: Callable[["Workload", Any], torch.Tensor] | None = None  # the prediction in the model's output (default [0])

    @property
    def preset(self) -> str | None:
        return self.preset_name if self.preset_name is not None or self.model not in PRESETS else PRESETS[self.model]

    @property
    def calls_per_run(self) -> int:
        return self.num_steps * len(self.branches)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sigmas(self) -> list[float]:
        n = self.num_steps
        return [1.0 - i / n for i in range(n)] + [0.0]

    def call(self, x: torch.Tensor, sigma: float, branch: str) -> torch.Tensor:
        t = self.transformer
        context = t.cache_context(branch) if hasattr(t, "cache_context") else contextlib.nullcontext()
        with context:
            out = t(**self.make_call(self, x, sigma, branch), return_dict=False)
        return self.output(self, out) if self.output is not None else out[0]

    def loop(self, before_call: Callable[[int, str], None] | None = None) -> torch.Tensor:
        """One denoising run; ``before_call(step, branch)`` runs before each transformer call (probes)."""
        sig = self.sigmas()
        x = self.latents.clone()
        with torch.inference_mode():
            for i in range(self.num_steps):
                preds = {}
                for branch in self.branches:
                    if before_call is not None:
                        before_call(i, branch)
                    preds[branch] = self.call(x, sig[i], branch)
                if len(self.branches) == 2:
                    v = preds["uncond"] + self.guidance_scale * (preds["cond"] - preds["uncond"])
                else:
                    v = preds[self.branches[0]]
                x = x + (sig[i + 1] - sig[i]) * v
        return x


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.05)
    return model.eval().requires_grad_(False)


def _build(cls, device: torch.device, dtype: torch.dtype, **config) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return _randomize(model)


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1 (FluxTransformer2DModel)
# ---------------------------------------------------------------------------------------------------------------
FLUX_CONFIGS = {
    "tiny": dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                 guidance_embeds=True),
    # FLUX's head width, RoPE axes and input/text widths; 2 heads (256 wide), 2 + 6 blocks
    "mid": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=128,
                num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
    "full": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
}
# (image side in latent tokens, text tokens)
FLUX_SHAPES = {"tiny": (4, 16), "mid": (32, 64), "full": (64, 512)}


def _flux_call(w: Workload, x: torch.Tensor, sigma: float, branch: str) -> dict[str, Any]:
    return dict(hidden_states=x, timestep=torch.full((1,), sigma, device=w.device, dtype=w.dtype), **w.inputs)


def flux(size: str, device: torch.device, dtype: torch.dtype, steps: int | None = None, resolution: int | None = None) -> Workload:
    from diffusers import FluxTransformer2DModel

    cfg = FLUX_CONFIGS[size]
    side, text = FLUX_SHAPES[size]
    if resolution:
        side = resolution // 16
    model = _build(FluxTransformer2DModel, device, dtype, **cfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ii), ii, jj], -1).reshape(-1, 3).to(device, dtype)
    inputs = dict(
        encoder_hidden_states=rand(1, text, cfg["joint_attention_dim"]),
        pooled_projections=rand(1, cfg["pooled_projection_dim"]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32),
    )
    return Workload("flux", size, model, device, dtype, steps or 28, ("cond",), inputs,
                    rand(1, side * side, cfg["in_channels"]), _flux_call,
                    description=dict(image_tokens=side * side, text_tokens=text, resolution=side * 16,
                                     blocks=cfg["num_layers"] + cfg["num_single_layers"],
                                     inner_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"]))


# ---------------------------------------------------------------------------------------------------------------
# Wan2.1 T2V (WanTransformer3DModel), real CFG: cond + uncond per step
# ---------------------------------------------------------------------------------------------------------------
WAN_CONFIGS = {
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "mid": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=1024, num_layers=8, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024),
    # Wan2.1-T2V-1.3B
    "full": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
# (frames, height, width) in pixels; text tokens
WAN_SHAPES = {"tiny": ((9, 16, 16), 12), "mid": ((13, 256, 256), 64), "full": ((81, 480, 832), 512)}


def _wan_call(w: Workload, x: torch.Tensor, sigma: float, branch: str) -> dict[str, Any]:
    text = w.inputs["text_" + branch]
    return dict(hidden_states=x, timestep=torch.full((1,), sigma * 1000.0, device=w.device), encoder_hidden_states=text)


def wan(size: str, device: torch.device, dtype: torch.dtype, steps: int | None = None,
        frames: int | None = None, height: int | None = None, width: int | None = None) -> Workload:
    from diffusers import WanTransformer3DModel

    cfg = WAN_CONFIGS[size]
    (f, h, wd), text = WAN_SHAPES[size]
    f, h, wd = frames or f, height or h, width or wd
    model = _build(WanTransformer3DModel, device, dtype, **cfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    latent = (1, 16, (f - 1) // 4 + 1, h // 8, wd // 8)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    inputs = dict(text_cond=rand(1, text, cfg["text_dim"]), text_uncond=rand(1, text, cfg["text_dim"]))
    return Workload("wan", size, model, device, dtype, steps or 50, ("cond", "uncond"), inputs, rand(*latent),
                    _wan_call, guidance_scale=5.0,
                    description=dict(frames=f, height=h, width=wd, image_tokens=tokens, text_tokens=text,
                                     blocks=cfg["num_layers"], inner_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"]))


# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo T2V (HunyuanVideoTransformer3DModel), guidance-distilled: one call per step
# ---------------------------------------------------------------------------------------------------------------
HUNYUAN_CONFIGS = {
    "tiny": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                 num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                 text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
    "mid": dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=2,
                num_single_layers=4, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
    "full": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                 num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
                 text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
}
# (frames, height, width) in pixels, text tokens. Full: 544x960x61 (the 720p x 129-frame default is ~4x more
# tokens and tens of minutes per baseline run on one GPU; pass --frames/--height/--width for it).
HUNYUAN_SHAPES = {"tiny": ((5, 16, 16), 12), "mid": ((13, 256, 256), 64), "full": ((61, 544, 960), 256)}


def _hunyuan_call(w: Workload, x: torch.Tensor, sigma: float, branch: str) -> dict[str, Any]:
    return dict(hidden_states=x, timestep=torch.full((1,), sigma * 1000.0, device=w.device, dtype=w.dtype), **w.inputs)


def hunyuan(size: str, device: torch.device, dtype: torch.dtype, steps: int | None = None,
            frames: int | None = None, height: int | None = None, width: int | None = None) -> Workload:
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = HUNYUAN_CONFIGS[size]
    (f, h, wd), text = HUNYUAN_SHAPES[size]
    f, h, wd = frames or f, height or h, width or wd
    model = _build(HunyuanVideoTransformer3DModel, device, dtype, **cfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    latent = (1, cfg["in_channels"], (f - 1) // 4 + 1, h // 8, wd // 8)
    p = cfg["patch_size"]
    tokens = latent[2] * (latent[3] // p) * (latent[4] // p)
    inputs = dict(
        encoder_hidden_states=rand(1, text, cfg["text_embed_dim"]),
        encoder_attention_mask=torch.ones(1, text, device=device, dtype=torch.bool),
        pooled_projections=rand(1, cfg["pooled_projection_dim"]),
        guidance=torch.full((1,), 6000.0, device=device, dtype=dtype),
    )
    return Workload("hunyuan", size, model, device, dtype, steps or 50, ("cond",), inputs, rand(*latent),
                    _hunyuan_call,
                    description=dict(frames=f, height=h, width=wd, image_tokens=tokens, text_tokens=text,
                                     blocks=cfg["num_layers"] + cfg["num_single_layers"],
                                     inner_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"]))


def build(model: str, size: str, device: str | torch.device | None = None, steps: int | None = None,
          dtype: torch.dtype | None = None, **shape: Any) -> Workload:
    """The workload for ``model`` at ``size`` (bf16 on CUDA, float32 on CPU unless ``dtype`` says otherwise)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    shape = {k: v for k, v in shape.items() if v}
    if model == "flux":
        return flux(size, dev, dtype, steps, shape.get("resolution"))
    builder = wan if model == "wan" else hunyuan
    return builder(size, dev, dtype, steps, shape.get("frames"), shape.get("height"), shape.get("width"))
