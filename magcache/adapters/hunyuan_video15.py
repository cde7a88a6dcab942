"""HunyuanVideo-1.5 (``HunyuanVideo15Transformer3DModel``).

Stack = ``transformer_blocks`` (dual-stream; text and image tokens attend jointly but stay separate streams).
``x_embedder`` returns the video tokens and ``norm_out`` receives them after the blocks, so the residual covers the
video tokens only.

CFG: the pipelines' guider runs one transformer call per guidance batch inside ``cache_context("pred_cond")`` and
``("pred_uncond")``; the runtime treats those names as the cond and uncond branches. The only published curves are
ComfyUI-MagCache's (720p text-to-video, 20 and 40 steps), applied with ComfyUI's rules.
"""

from . import Adapter

ADAPTER = Adapter(
    family="hunyuan_video15",
    transformer_classes=("HunyuanVideo15Transformer3DModel",),
    block_lists=("transformer_blocks",),
    entry_module="x_embedder",
    default_preset=lambda pipe, transformer: "hunyuan_video1.5",
)
