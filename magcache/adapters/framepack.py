"""FramePack and FramePack-F1 (``HunyuanVideoFramepackTransformer3DModel``).

The blocks see ``[4x | 2x | clean history | noisy]`` tokens; the model keeps only the trailing noisy tokens for the
head. Since only those reach the output, the residual over them equals the reference's full-sequence residual
restricted to what is used. Every section calls ``scheduler.set_timesteps`` again, which starts a new run: state and
cache restart per section, as in the research demo. F1 has the same weights layout, so pass ``preset="framepack_f1"``.
"""

from . import Adapter

ADAPTER = Adapter(
    family="framepack",
    transformer_classes=("HunyuanVideoFramepackTransformer3DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=lambda pipe, transformer: "framepack",
)
