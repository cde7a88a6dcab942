"""FramePack and FramePack-F1 (``HunyuanVideoFramepackTransformer3DModel``).

The blocks see ``[4x | 2x | clean history | noisy]`` tokens; the model keeps only the trailing noisy tokens for the
head. Since only those reach the output, the residual over them (``x_embedder`` output -> ``norm_out`` input) equals
the reference's full-sequence residual restricted to what is used, at 32 400 instead of 41 480 tokens per 720p
section. Every section calls ``scheduler.set_timesteps`` again, which starts a new run: state and cache restart per
section and step 0 of each section is computed, as in the research demo; the ``|1 - ratio| <= 0.06`` guard is part of
the ``MC_FRAMEPACK`` rules. With real CFG (``true_cfg_scale > 1`` and a negative prompt) the pipeline makes two calls
per step without ``cache_context``; the runtime tells them apart by call order (cond, then uncond), each with its own
state and residual.

F1 has the same weights layout; its preset is picked when the checkpoint name says F1, else pass
``preset="framepack_f1"``.
"""

import re

from . import Adapter

_F1_NAME = re.compile(r"(^|[^a-z0-9])f1([^a-z0-9]|$)")  # lllyasviel/FramePack_F1_I2V_HY_20250503


def _default_preset(pipe, transformer) -> str:
    name = str(getattr(transformer.config, "_name_or_path", "") or "").lower()
    return "framepack_f1" if _F1_NAME.search(name) else "framepack"


ADAPTER = Adapter(
    family="framepack",
    transformer_classes=("HunyuanVideoFramepackTransformer3DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=_default_preset,
)
