"""Chroma (``ChromaTransformer2DModel``): FLUX-shaped; the single blocks work on the joint text+image sequence,
which the model splits back before ``norm_out``, so entry/exit are the same as FLUX. Real two-pass CFG
(cond, then uncond) without ``cache_context``: branches are told apart by call order within a step."""

from . import Adapter

ADAPTER = Adapter(
    family="chroma",
    transformer_classes=("ChromaTransformer2DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=lambda pipe, transformer: "chroma",
)
