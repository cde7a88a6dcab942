"""Wan2.1 T2V / I2V, Wan2.2 T2V-A14B / I2V-A14B / TI2V-5B (``WanTransformer3DModel``) and VACE
(``WanVACETransformer3DModel``).

Stack = ``blocks``; its input is ``patch_embedding`` output flattened to tokens, its output reaches ``norm_out``
(as ``hidden_states.float()``; the runtime stores the residual in the stack's dtype and hands ``norm_out``
``(input + residual)`` cast back to float32). Text (and I2V image) tokens only enter through cross-attention, so the
residual covers exactly the video tokens.

VACE also leaves out ``vace_blocks`` on a skipped step: the hints are added inside the ``blocks`` loop, so with both
lists empty no hint is computed or added, and the cached residual (which contains the last computed step's hints) is
added once — the research code's behaviour, not diffusers' built-in hook, which adds this step's hints on top of a
residual that already holds them.

CFG: diffusers' Wan pipelines run cond and uncond as two calls inside ``cache_context("cond"/"uncond")``; the
runtime keys each branch's state on that name and uses its half of the interleaved curve, with the research code's
per-call retention (``MC_WAN`` rules in ``magcache/presets.py``).

Wan2.2 A14B: ``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2`` and ``boundary_ratio`` call
``transformer`` (high-noise expert) while the timestep is at or above ``boundary_ratio * num_train_timesteps`` and
``transformer_2`` after. Both experts are hooked with one shared state, and the split is read from the pipeline's
own timesteps with the pipeline's own test. Wan2.2 TI2V-5B (``expand_timesteps``) is one model; with an input image
(``WanImageToVideoPipeline``) it uses the research code's image-conditioned curve.
"""

from __future__ import annotations

from ..policy import high_noise_steps
from . import Adapter

_WAN_1_3B_DIM, _WAN_14B_DIM = 1536, 5120


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def _inner_dim(transformer) -> int:
    c = transformer.config
    return c.num_attention_heads * c.attention_head_dim


def _checkpoint_names(pipe, transformer) -> str:
    """Where the weights came from (``from_pretrained`` records it), lower-cased; '' for models built in code."""
    names = [getattr(getattr(m, "config", None), "_name_or_path", "") for m in (pipe, transformer) if m is not None]
    return " ".join(str(n) for n in names if n).lower()


def _size_suffix(transformer, family: str) -> str:
    """'1.3B' or '14B' from the width; other widths (Wan2.2 TI2V-5B: 3072) have no Wan2.1 curve."""
    dim = _inner_dim(transformer)
    if dim <= _WAN_1_3B_DIM:  # includes the tiny test models
        return "1.3B"
    if dim == _WAN_14B_DIM:
        return "14B"
    raise ValueError(f"no Wan2.1 {family} preset for a transformer of width {dim}; pass preset=... or curves=...")


def _pipe_config(pipe, name: str):
    return getattr(getattr(pipe, "config", None), name, None)


def _two_experts(pipe) -> bool:
    return getattr(pipe, "transformer_2", None) is not None and _pipe_config(pipe, "boundary_ratio") is not None


def _refuse_two_experts(pipe) -> None:
    if pipe is not None and getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("two-expert VACE pipelines (transformer_2) have no MagCache preset; pass curves=...")


def _wan_preset(pipe, transformer) -> str:
    in_channels = transformer.config.in_channels
    if _two_experts(pipe):  # Wan2.2 A14B
        if in_channels not in (16, 36):
            raise ValueError(f"no Wan2.2 A14B preset for a transformer with {in_channels} input channels")
        return "wan2.2_i2v_14B" if in_channels == 36 else "wan2.2_t2v_14B"
    if getattr(pipe, "transformer_2", None) is None and _pipe_config(pipe, "boundary_ratio") is not None:
        raise ValueError("this Wan2.2 A14B pipeline has one expert loaded; MagCache's Wan2.2 presets span both experts")
    if _pipe_config(pipe, "expand_timesteps") or in_channels == 48:  # TI2V-5B
        with_image = pipe is not None and "ImageToVideo" in type(pipe).__name__
        return "wan2.2_ti2v_5B_i2v" if with_image else "wan2.2_ti2v_5B"
    if in_channels == 36:  # image-to-video: noise + mask + image latents; 480P and 720P share one config
        return "wan2.1_i2v_720p_14B" if "720p" in _checkpoint_names(pipe, transformer) else "wan2.1_i2v_480p_14B"
    if in_channels != 16:
        raise ValueError(f"no Wan2.1 preset for a transformer with {in_channels} input channels; pass preset=...")
    return f"wan2.1_t2v_{_size_suffix(transformer, 'T2V')}"


def _vace_preset(pipe, transformer) -> str:
    _refuse_two_experts(pipe)
    return f"wan2.1_vace_{_size_suffix(transformer, 'VACE')}"


def _expert_split(pipe, timesteps) -> int | None:
    """Steps the pipeline runs on ``transformer`` (the high-noise expert) for these scheduler timesteps."""
    if not _two_experts(pipe):
        return None
    return high_noise_steps((float(t) for t in timesteps), pipe.config.boundary_ratio,
                            pipe.scheduler.config.num_train_timesteps)


ADAPTER = Adapter(
    family="wan",
    transformer_classes=("WanTransformer3DModel",),
    block_lists=("blocks",),
    entry_module="patch_embedding",
    entry_to_tokens=_tokens,
    default_preset=_wan_preset,
    second_expert="transformer_2",
    expert_split=_expert_split,
)

VACE_ADAPTER = Adapter(
    family="wan_vace",
    transformer_classes=("WanVACETransformer3DModel",),
    block_lists=("blocks", "vace_blocks"),
    entry_module="patch_embedding",
    entry_to_tokens=_tokens,
    default_preset=_vace_preset,
)
