"""HunyuanVideo T2V (``HunyuanVideoTransformer3DModel``).

Stack = double (``transformer_blocks``) + single (``single_transformer_blocks``) blocks. ``x_embedder`` gives the
image tokens and ``norm_out`` receives only the image tokens after the blocks (the single blocks split the text off
again), so the residual covers image tokens only, as in the research code; the text stream (token refiner output) is
not carried over a skipped step, it is simply not needed by the head.

Guidance-distilled: by default one call per step (one branch, the published curve). With true CFG
(``true_cfg_scale > 1`` and a negative prompt) the pipeline runs ``cache_context("cond")`` and ``("uncond")``; the
uncond branch gets its own state and residual and reuses the cond curve (no uncond calibration was published).
The 544p curve is the ``hunyuan_video_544p`` preset (the resolution is only known per call, so pass it).
"""

from . import Adapter

ADAPTER = Adapter(
    family="hunyuan_video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=lambda pipe, transformer: "hunyuan_video",
)
