"""Wan2.1 T2V / I2V (``WanTransformer3DModel``) and VACE (``WanVACETransformer3DModel``).

Stack = ``blocks``; its input is ``patch_embedding`` output flattened to tokens, its output reaches ``norm_out``
(as ``hidden_states.float()``). VACE also leaves out ``vace_blocks`` on a skipped step: the hints are added inside
the ``blocks`` loop, so with both lists empty no hint is added, and the cached residual (which contains last
computed step's hints) is added once — the research code's behaviour, not diffusers' double-counted hints.
"""

from . import Adapter


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def _inner_dim(transformer) -> int:
    c = transformer.config
    return c.num_attention_heads * c.attention_head_dim


def _wan_preset(pipe, transformer) -> str:
    if transformer.config.in_channels == 36:  # image-to-video: noise + mask + image latents
        return "wan2.1_i2v_480p_14B"
    return "wan2.1_t2v_1.3B" if _inner_dim(transformer) <= 1536 else "wan2.1_t2v_14B"


def _vace_preset(pipe, transformer) -> str:
    return "wan2.1_vace_1.3B" if _inner_dim(transformer) <= 1536 else "wan2.1_vace_14B"


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
