"""One random-weight transformer per architecture of the catalog (and the newer ones diffusers has classes for),
as :class:`bench.workloads.Workload` objects, for per-call costs (a computed call and a skipped call).

Each entry gives the diffusers class, the released model's configuration (``full``) or a few-thousand-parameter one
(``tiny``, the ``--smoke`` run of ``bench/gpu_stack.py``), and the keyword inputs the model's pipeline passes at one
step, with the shapes of that pipeline at the stated resolution. Video shapes are reduced to 33 frames so every
architecture fits one device call; the shapes each result was measured at are recorded with it.

Configurations: FLUX.1, HunyuanVideo and Wan2.1 as in ``bench/workloads.py``; the others from the released
models' configurations as diffusers' conversion scripts and class defaults give them. For Qwen-Image, FLUX.2-dev,
Z-Image and HunyuanVideo 1.5 the full configuration *is* the diffusers class default (written out here); it was not
checked against the hub's ``config.json`` (no hub access where this was written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import workloads
from .workloads import Workload, _build

# name -> (family, MagCache preset or None, note); order = the order the GPU script measures them in
ARCHITECTURES: dict[str, tuple[str, str | None, str]] = {
    "flux": ("FLUX.1-dev", "flux", "1024², 28 steps"),
    "flux_kontext": ("FLUX.1-Kontext-dev", "flux_kontext", "1024² + a 1024² reference image (8192 image tokens)"),
    "chroma": ("Chroma1-HD", "chroma", "1024², real CFG"),
    "hunyuan_video": ("HunyuanVideo", "hunyuan_video", "544×960×33"),
    "wan_t2v_1_3b": ("Wan2.1-T2V-1.3B", "wan2.1_t2v_1.3B", "480×832×33, real CFG"),
    "wan_t2v_14b": ("Wan2.1-T2V-14B (also each expert of Wan2.2-A14B)", "wan2.1_t2v_14B", "480×832×33, real CFG"),
    "wan_i2v_14b": ("Wan2.1-I2V-14B-480P", "wan2.1_i2v_480p_14B", "480×832×33, real CFG"),
    "wan_vace_1_3b": ("Wan2.1-VACE-1.3B", "wan2.1_vace_1.3B", "480×832×33, real CFG"),
    "wan_vace_14b": ("Wan2.1-VACE-14B", "wan2.1_vace_14B", "480×832×33, real CFG"),
    "framepack": ("FramePackI2V_HY", "framepack", "640×640, one 33-frame section"),
    "qwen_image": ("Qwen-Image", "qwen_image", "1024², real CFG"),
    "hunyuan_video_1_5": ("HunyuanVideo 1.5 (480p)", "hunyuan_video1.5", "480×848×33, real CFG"),
    "wan2_2_ti2v_5b": ("Wan2.2-TI2V-5B", "wan2.2_ti2v_5B", "704×1280×33, real CFG"),
    "flux2": ("FLUX.2-dev", None, "1024²"),
    "z_image": ("Z-Image(-Turbo)", None, "1024²"),
}


@dataclass
class Spec:
    cls: str  # diffusers class name
    configs: dict[str, dict[str, Any]]  # size -> constructor arguments
    inputs: Callable[[str, dict, torch.device, torch.dtype, Callable], tuple[torch.Tensor, dict, Callable]]
    steps: int
    branches: tuple[str, ...] = ("cond",)
    output: Callable[[Workload, Any], torch.Tensor] | None = None  # default: the first output (per sample: the first)


def _flux_ids(side: int, device, dtype, first: float = 0.0) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.full_like(ii, int(first)), ii, jj], -1).reshape(-1, 3).to(device, dtype)


def _timestep(sigma: float, w: Workload, scale: float = 1.0) -> torch.Tensor:
    return torch.full((1,), sigma * scale, device=w.device, dtype=w.dtype)


# --- FLUX.1 Kontext: the reference image's tokens follow the noise tokens; the output keeps the noise tokens -----
def _kontext_inputs(size, cfg, device, dtype, rand):
    side, text = workloads.FLUX_SHAPES[size]
    inputs = dict(encoder_hidden_states=rand(1, text, cfg["joint_attention_dim"]),
                  pooled_projections=rand(1, cfg["pooled_projection_dim"]),
                  img_ids=torch.cat([_flux_ids(side, device, dtype), _flux_ids(side, device, dtype, first=1)]),
                  txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                  guidance=torch.full((1,), 2.5, device=device, dtype=torch.float32),
                  reference=rand(1, side * side, cfg["in_channels"]))

    def call(w, x, sigma, branch):
        kw = {k: v for k, v in w.inputs.items() if k != "reference"}
        return dict(hidden_states=torch.cat([x, w.inputs["reference"]], 1), timestep=_timestep(sigma, w), **kw)

    return rand(1, side * side, cfg["in_channels"]), inputs, call


# --- Chroma: FLUX's stack without pooled text or guidance; real CFG ------------------------------------------------
def _chroma_inputs(size, cfg, device, dtype, rand):
    side, text = workloads.FLUX_SHAPES[size]
    inputs = dict(text_cond=rand(1, text, cfg["joint_attention_dim"]), text_uncond=rand(1, text, cfg["joint_attention_dim"]),
                  img_ids=_flux_ids(side, device, dtype), txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))

    def call(w, x, sigma, branch):
        return dict(hidden_states=x, timestep=_timestep(sigma, w), encoder_hidden_states=w.inputs["text_" + branch],
                    img_ids=w.inputs["img_ids"], txt_ids=w.inputs["txt_ids"])

    return rand(1, side * side, cfg["in_channels"]), inputs, call


# --- Wan family: T2V, I2V (image latents + CLIP image tokens), VACE (control video), Wan2.2 TI2V -------------------
VIDEO_FRAMES = {"tiny": 5, "full": 33}
WAN_SIZE = {"tiny": (16, 16), "full": (480, 832)}


def _wan_like(latent_channels: int, spatial: int, extra_channels: int = 0, image_tokens: int = 0, vace: bool = False,
              height_width: dict | None = None):
    def make(size, cfg, device, dtype, rand):
        h, wd = (height_width or WAN_SIZE)[size]
        f = VIDEO_FRAMES[size]
        latent = (1, latent_channels, (f - 1) // 4 + 1, h // spatial, wd // spatial)
        text = 512 if size == "full" else 12
        inputs = dict(text_cond=rand(1, text, cfg["text_dim"]), text_uncond=rand(1, text, cfg["text_dim"]))
        if extra_channels:  # I2V: mask + image latents concatenated to the noise along channels
            inputs["condition"] = rand(latent[0], extra_channels, *latent[2:])
        if image_tokens:
            inputs["image_tokens"] = rand(1, image_tokens, cfg["image_dim"])
        if vace:
            inputs["control"] = rand(latent[0], cfg["vace_in_channels"], *latent[2:])
            inputs["control_scale"] = torch.ones(len(cfg["vace_layers"]), device=device, dtype=dtype)

        def call(w, x, sigma, branch):
            kw = dict(hidden_states=x, timestep=torch.full((1,), sigma * 1000.0, device=w.device),
                      encoder_hidden_states=w.inputs["text_" + branch])
            if "condition" in w.inputs:
                kw["hidden_states"] = torch.cat([x, w.inputs["condition"]], 1)
            if "image_tokens" in w.inputs:
                kw["encoder_hidden_states_image"] = w.inputs["image_tokens"]
            if "control" in w.inputs:
                kw.update(control_hidden_states=w.inputs["control"], control_hidden_states_scale=w.inputs["control_scale"])
            return kw

        return rand(*latent), inputs, call

    return make


_WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
_WAN_14B = dict(workloads.WAN_CONFIGS["full"], num_attention_heads=40, ffn_dim=13824, num_layers=40)


# --- FramePack: one section (9 latent frames) with its clean / 2x / 4x history latents and SigLIP image tokens -----
def _framepack_inputs(size, cfg, device, dtype, rand):
    side = 640 // 8 if size == "full" else 4
    window, history = (9, (16, 2, 1)) if size == "full" else (2, (4, 2, 1))
    text = 256 if size == "full" else 12
    siglip = 729 if size == "full" else 9
    indices = torch.arange(0, 1 + sum(history) + window, device=device)
    prefix, idx_4x, idx_2x, idx_1x, idx_latents = indices.split([1, *history, window])
    lat = lambda frames: rand(1, cfg["in_channels"], frames, side, side)  # noqa: E731
    inputs = dict(encoder_hidden_states=rand(1, text, cfg["text_embed_dim"]),
                  encoder_attention_mask=torch.ones(1, text, device=device, dtype=torch.bool),
                  pooled_projections=rand(1, cfg["pooled_projection_dim"]),
                  image_embeds=rand(1, siglip, cfg["image_proj_dim"]), indices_latents=idx_latents,
                  guidance=torch.full((1,), 10000.0, device=device, dtype=dtype),
                  latents_clean=lat(1 + history[2]), indices_latents_clean=torch.cat([prefix, idx_1x]),
                  latents_history_2x=lat(history[1]), indices_latents_history_2x=idx_2x,
                  latents_history_4x=lat(history[0]), indices_latents_history_4x=idx_4x)

    def call(w, x, sigma, branch):
        return dict(hidden_states=x, timestep=_timestep(sigma, w, 1000.0), **w.inputs)

    return lat(window), inputs, call


# --- Qwen-Image: packed 2x2 latents, Qwen2.5-VL text states with a mask, real CFG ---------------------------------
def _qwen_inputs(size, cfg, device, dtype, rand):
    side, text = (64, 128) if size == "full" else (4, 12)
    inputs = {}
    for branch in ("cond", "uncond"):
        inputs["text_" + branch] = rand(1, text, cfg["joint_attention_dim"])
    inputs["mask"] = torch.ones(1, text, device=device, dtype=torch.long)

    def call(w, x, sigma, branch):
        return dict(hidden_states=x, timestep=_timestep(sigma, w), encoder_hidden_states=w.inputs["text_" + branch],
                    encoder_hidden_states_mask=w.inputs["mask"], img_shapes=[[(1, side, side)]])

    return rand(1, side * side, cfg["in_channels"]), inputs, call


# --- HunyuanVideo 1.5: latents + condition latents + mask along channels, two text encoders, SigLIP tokens ----------
def _hunyuan15_inputs(size, cfg, device, dtype, rand):
    h, wd = (480, 848) if size == "full" else (32, 32)
    f = VIDEO_FRAMES[size]
    channels = cfg["out_channels"]
    latent = (1, channels, (f - 1) // 4 + 1, h // 16, wd // 16)
    text, text2, siglip = (256, 256, 729) if size == "full" else (12, 8, 9)
    inputs = dict(condition=torch.zeros(1, cfg["in_channels"] - channels, *latent[2:], device=device, dtype=dtype),
                  image_embeds=torch.zeros(1, siglip, cfg["image_embed_dim"], device=device, dtype=dtype),
                  mask=torch.ones(1, text, device=device, dtype=torch.long),
                  mask_2=torch.ones(1, text2, device=device, dtype=torch.long))
    for branch in ("cond", "uncond"):
        inputs["text_" + branch] = rand(1, text, cfg["text_embed_dim"])
        inputs["text2_" + branch] = rand(1, text2, cfg["text_embed_2_dim"])

    def call(w, x, sigma, branch):
        i = w.inputs
        return dict(hidden_states=torch.cat([x, i["condition"]], 1), timestep=_timestep(sigma, w, 1000.0),
                    encoder_hidden_states=i["text_" + branch], encoder_attention_mask=i["mask"],
                    encoder_hidden_states_2=i["text2_" + branch], encoder_attention_mask_2=i["mask_2"],
                    image_embeds=i["image_embeds"])

    return rand(*latent), inputs, call


# --- FLUX.2: 4-axis position ids (t, h, w, layer), Mistral text states ---------------------------------------------
def _flux2_inputs(size, cfg, device, dtype, rand):
    side, text = (64, 512) if size == "full" else (4, 12)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    inputs = dict(encoder_hidden_states=rand(1, text, cfg["joint_attention_dim"]),
                  img_ids=img_ids[None].to(device), txt_ids=txt_ids[None].to(device),
                  guidance=torch.full((1,), 4.0, device=device, dtype=torch.float32))

    def call(w, x, sigma, branch):
        return dict(hidden_states=x, timestep=_timestep(sigma, w), **w.inputs)

    return rand(1, side * side, cfg["in_channels"]), inputs, call


# --- Z-Image: lists of per-sample latents (C, 1, H, W) and caption states; returns a list ------------------------------
def _z_image_inputs(size, cfg, device, dtype, rand):
    side, text = (128, 128) if size == "full" else (8, 12)
    inputs = dict(caption=rand(text, cfg["cap_feat_dim"]))

    def call(w, x, sigma, branch):
        return dict(x=[x], t=_timestep(1.0 - sigma, w), cap_feats=[w.inputs["caption"]])

    return rand(cfg["in_channels"], 1, side, side), inputs, call


SPECS: dict[str, Spec] = {
    "flux_kontext": Spec("FluxTransformer2DModel", {k: workloads.FLUX_CONFIGS[k] for k in ("tiny", "full")},
                         _kontext_inputs, 28, output=lambda w, out: out[0][:, : w.latents.shape[1]]),
    "chroma": Spec("ChromaTransformer2DModel", {
        "tiny": dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
                     approximator_hidden_dim=32, approximator_layers=1, approximator_num_channels=16),
        "full": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                     approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)},
        _chroma_inputs, 26, ("cond", "uncond")),
    "wan_t2v_14b": Spec("WanTransformer3DModel", {"tiny": _WAN_TINY, "full": _WAN_14B}, _wan_like(16, 8), 50,
                        ("cond", "uncond")),
    "wan_i2v_14b": Spec("WanTransformer3DModel", {
        "tiny": dict(_WAN_TINY, in_channels=36, image_dim=4, added_kv_proj_dim=24),
        "full": dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)},
        _wan_like(16, 8, extra_channels=20, image_tokens=257), 40, ("cond", "uncond")),
    "wan_vace_1_3b": Spec("WanVACETransformer3DModel", {
        "tiny": dict(_WAN_TINY, vace_layers=[0, 2], vace_in_channels=48),
        "full": dict(workloads.WAN_CONFIGS["full"], vace_layers=list(range(0, 30, 2)), vace_in_channels=96)},
        _wan_like(16, 8, vace=True), 50, ("cond", "uncond")),
    "wan_vace_14b": Spec("WanVACETransformer3DModel", {
        "tiny": dict(_WAN_TINY, vace_layers=[0, 2], vace_in_channels=48),
        "full": dict(_WAN_14B, vace_layers=list(range(0, 40, 5)), vace_in_channels=96)},
        _wan_like(16, 8, vace=True), 50, ("cond", "uncond")),
    "framepack": Spec("HunyuanVideoFramepackTransformer3DModel", {
        "tiny": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                     num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                     text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
                     has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
        "full": dict(workloads.HUNYUAN_CONFIGS["full"], image_condition_type=None, has_image_proj=True,
                     image_proj_dim=1152, has_clean_x_embedder=True)},
        _framepack_inputs, 25),
    "qwen_image": Spec("QwenImageTransformer2DModel", {
        "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        "full": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))},
        _qwen_inputs, 50, ("cond", "uncond")),
    "hunyuan_video_1_5": Spec("HunyuanVideo15Transformer3DModel", {
        "tiny": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                     num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                     rope_axes_dim=(4, 6, 6)),
        "full": dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                     num_refiner_layers=2, text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
                     rope_axes_dim=(16, 56, 56))},
        _hunyuan15_inputs, 50, ("cond", "uncond")),
    "wan2_2_ti2v_5b": Spec("WanTransformer3DModel", {
        "tiny": dict(_WAN_TINY, in_channels=48, out_channels=48),
        "full": dict(workloads.WAN_CONFIGS["full"], num_attention_heads=24, ffn_dim=14336, in_channels=48,
                     out_channels=48)},
        _wan_like(48, 16, height_width={"tiny": (32, 32), "full": (704, 1280)}), 50, ("cond", "uncond")),
    "flux2": Spec("Flux2Transformer2DModel", {
        "tiny": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                     axes_dims_rope=(4, 4, 4, 4)),
        "full": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                     num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                     mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)},
        _flux2_inputs, 50),
    "z_image": Spec("ZImageTransformer2DModel", {
        "tiny": dict(in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                     cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32]),
        "full": dict(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                     cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])},
        _z_image_inputs, 8),
}


def _first_output(w: Workload, out: Any) -> torch.Tensor:
    first = out[0]
    return first[0] if isinstance(first, (list, tuple)) else first  # Z-Image returns one tensor per sample


# the architectures whose workloads bench/workloads.py builds: class name and configurations
_WORKLOADS = {"flux": ("FluxTransformer2DModel", workloads.FLUX_CONFIGS),
              "wan_t2v_1_3b": ("WanTransformer3DModel", workloads.WAN_CONFIGS),
              "hunyuan_video": ("HunyuanVideoTransformer3DModel", workloads.HUNYUAN_CONFIGS)}


def parameter_count(name: str, size: str) -> int:
    """Parameters of architecture ``name`` at ``size``, counted on the meta device (nothing is allocated)."""
    import diffusers

    cls, configs = _WORKLOADS[name] if name in _WORKLOADS else (SPECS[name].cls, SPECS[name].configs)
    with torch.device("meta"):
        module = getattr(diffusers, cls)(**configs[size])
    return sum(p.numel() for p in module.parameters())


def build(name: str, size: str, device: str | torch.device, dtype: torch.dtype) -> Workload:
    """The workload of architecture ``name`` at ``size`` ("tiny" or "full")."""
    import diffusers

    device = torch.device(device)
    torch.manual_seed(0)
    if name == "flux":
        return workloads.flux(size, device, dtype)
    if name in ("wan_t2v_1_3b", "hunyuan_video"):
        builder = workloads.wan if name == "wan_t2v_1_3b" else workloads.hunyuan
        return builder(size, device, dtype, frames=VIDEO_FRAMES[size])
    spec = SPECS[name]
    cls = getattr(diffusers, spec.cls, None)
    if cls is None:
        raise LookupError(f"diffusers {diffusers.__version__} has no {spec.cls}")
    cfg = spec.configs[size]
    model = _build(cls, device, dtype, **cfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    latents, inputs, call = spec.inputs(size, cfg, device, dtype, rand)
    family, preset, shape = ARCHITECTURES[name]
    return Workload(name, size, model, device, dtype, spec.steps, spec.branches, inputs, latents, call,
                    guidance_scale=4.0 if len(spec.branches) == 2 else 1.0, preset_name=preset,
                    output=spec.output or _first_output, description=dict(family=family, shape=shape, latents=list(latents.shape)))
