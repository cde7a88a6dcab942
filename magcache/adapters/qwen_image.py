"""Qwen-Image and Qwen-Image-Edit (``QwenImageTransformer2DModel``).

Stack = ``transformer_blocks`` (dual-stream: the text stream runs beside the image stream and never joins it).
``img_in`` gives the image tokens and ``norm_out`` receives them after the blocks, so the residual covers the image
stream only, as in the research code. With Edit the pipeline concatenates the reference image's latent tokens to the
noisy ones before ``img_in``, so the residual covers both (the research code's behaviour, too).

True CFG (``true_cfg_scale > 1`` and a negative prompt): the pipelines run ``cache_context("cond")`` then
``("uncond")``; each branch keeps its own state and reads its half of the interleaved curve.
"""

from . import Adapter


def _default_preset(pipe, transformer) -> str:
    return "qwen_image_edit" if pipe is not None and "Edit" in type(pipe).__name__ else "qwen_image"


ADAPTER = Adapter(
    family="qwen_image",
    transformer_classes=("QwenImageTransformer2DModel",),
    block_lists=("transformer_blocks",),
    entry_module="img_in",
    default_preset=_default_preset,
)
