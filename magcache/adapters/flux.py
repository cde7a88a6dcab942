"""FLUX.1-dev and FLUX.1-Kontext-dev (``FluxTransformer2DModel``).

Stack = ``transformer_blocks`` + ``single_transformer_blocks``; residual over the image tokens (``x_embedder``
output -> ``norm_out`` input; in 0.42.1 the single blocks return text and image separately). With Kontext the image
tokens include the reference-image tokens, as in the research code. The text stream is not computed on a skip.
"""

from . import Adapter


def _default_preset(pipe, transformer) -> str:
    return "flux_kontext" if pipe is not None and "Kontext" in type(pipe).__name__ else "flux"


ADAPTER = Adapter(
    family="flux",
    transformer_classes=("FluxTransformer2DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=_default_preset,
)
