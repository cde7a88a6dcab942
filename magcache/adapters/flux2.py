"""FLUX.2 (``Flux2Transformer2DModel``: ``Flux2Pipeline``, ``Flux2KleinPipeline``).

Stack = ``transformer_blocks`` + ``single_transformer_blocks``; residual over the image tokens (``x_embedder``
output -> ``norm_out`` input: the single blocks' joint sequence has its text tokens cut off before ``norm_out``).
With reference images their tokens join the image tokens before ``x_embedder``, as with FLUX.1 Kontext.

No published curve exists: the ``flux2`` / ``flux2_klein`` presets carry rules and starting values only, and
MagCache leaves the model uncached until a calibration of it exists (``magcache.calibration``). Klein's true CFG
runs ``cache_context("cond")`` / ``("uncond")``: two branches. ``Flux2KleinKVPipeline`` is refused: its first step
caches the reference tokens' keys and values and cuts those tokens off before ``norm_out``, so the stack's input and
output cover different tokens.
"""

from . import Adapter


def _default_preset(pipe, transformer) -> str:
    name = type(pipe).__name__ if pipe is not None else ""
    if "KV" in name:
        raise ValueError(f"{name} is not supported: its reference-token KV cache changes the tokens between the "
                         "block stack's input and output")
    return "flux2_klein" if "Klein" in name else "flux2"


ADAPTER = Adapter(
    family="flux2",
    transformer_classes=("Flux2Transformer2DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    entry_module="x_embedder",
    default_preset=_default_preset,
)
