"""Z-Image (``ZImageTransformer2DModel``: ``ZImagePipeline``).

Stack = ``layers`` (the main single-stream layers; the small ``noise_refiner`` / ``context_refiner`` run on every
step). Their input is the unified sequence (image tokens, then caption tokens, padded per sample), which the model
builds in its ``forward`` rather than in a module, so the stack's entry is read as the input of the first main layer
(``entry_is_block_input``); on a skipped step the layers are left out and the final layer receives the unified
sequence unchanged, plus the cached residual. The exit is the final layer of the default patch size (``2-1``).
The residual covers the whole unified sequence.

CFG: ``ZImagePipeline`` batches cond and uncond into one call, so MagCache sees one branch (the decision is shared
by both halves of the batch). No published curve exists: MagCache leaves the model uncached until a calibration of
it exists (``magcache.calibration``). A pre-hook on the first layer runs inside that layer's module call: with
``compile_repeated_blocks`` it is traced into the compiled block.
"""

from . import Adapter

ADAPTER = Adapter(
    family="z_image",
    transformer_classes=("ZImageTransformer2DModel",),
    block_lists=("layers",),
    entry_module="layers.0",
    entry_is_block_input=True,
    exit_module="all_final_layer.2-1",
    default_preset=lambda pipe, transformer: "z_image",
)
