"""HunyuanVideo T2V (``HunyuanVideoTransformer3DModel``): double + single blocks; ``x_embedder`` gives the image
tokens and ``norm_out`` receives them after the blocks, so the residual covers image tokens only (as in the
research code). Guidance-distilled; optional true CFG runs as a second branch."""

from . import Adapter

ADAPTER = Adapter(
    family="hunyuan_video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=lambda pipe, transformer: "hunyuan_video",
)
