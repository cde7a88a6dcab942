"""Wan2.1 T2V / I2V (``WanTransformer3DModel``) and VACE (``WanVACETransformer3DModel``).

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
"""

from __future__ import annotations

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


def _refuse_two_experts(pipe) -> None:
    if pipe is not None and getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("Wan2.2 two-expert pipelines (transformer_2) are not supported by the Wan2.1 presets")


def _wan_preset(pipe, transformer) -> str:
    _refuse_two_experts(pipe)
    in_channels = transformer.config.in_channels
    if in_channels == 36:  # image-to-video: noise + mask + image latents; 480P and 720P share one config
        return "wan2.1_i2v_720p_14B" if "720p" in _checkpoint_names(pipe, transformer) else "wan2.1_i2v_480p_14B"
    if in_channels != 16:
        raise ValueError(f"no Wan2.1 preset for a transformer with {in_channels} input channels; pass preset=...")
    return f"wan2.1_t2v_{_size_suffix(transformer, 'T2V')}"


def _vace_preset(pipe, transformer) -> str:
    _refuse_two_experts(pipe)
    return f"wan2.1_vace_{_size_suffix(transformer, 'VACE')}"


ADAPTER = Adapter(
    family="wan",
    transformer_classes=("WanTransformer3DModel",),
    block_lists=("blocks",),
    entry_module="patch_embedding",
    entry_to_tokens=_tokens,
    default_preset=_wan_preset,
)

VACE_ADAPTER = Adapter(
    family="wan_vace",
    transformer_classes=("WanVACETransformer3DModel",),
    block_lists=("blocks", "vace_blocks"),
    entry_module="patch_embedding",
    entry_to_tokens=_tokens,
    default_preset=_vace_preset,
)
