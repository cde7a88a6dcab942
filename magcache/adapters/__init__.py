"""One declaration per model family: where the block stack starts and ends, and which block lists a skipped
step leaves out. The runtime needs nothing else, so no model ``forward`` is copied or replaced.

How a skipped step works (see ``magcache/runtime.py``): the transformer's own ``forward`` runs with the listed
block ``ModuleList``s swapped for empty ones, so embeddings, RoPE, text embedders and the output head run as usual
and the hidden states reach the exit module unchanged; a pre-hook on the exit module replaces them with
``stack input + cached residual``. On a computed step the same two points give the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Adapter:
    family: str
    transformer_classes: tuple[str, ...]
    block_lists: tuple[str, ...]  # ModuleLists left out on a skipped step
    entry_module: str  # its output is the block stack's input (image tokens)
    # True: ``entry_module`` is the stack's first block and its *input* is the stack's input (Z-Image: the sequence
    # entering the stack is built inside ``forward``, not by a module).
    entry_is_block_input: bool = False
    exit_module: str = "norm_out"  # its first argument is the block stack's output (image tokens)
    entry_to_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
    default_preset: Callable[[Any, torch.nn.Module], str] | None = None
    # Two-expert pipelines (Wan2.2 A14B): the pipeline attribute holding the second expert, and how many of a run's
    # steps (given the scheduler's timesteps) go to the first expert.
    second_expert: str | None = None
    expert_split: Callable[[Any, Any], int | None] | None = None
    notes: str = ""

    def stack_input(self, entry_output: torch.Tensor) -> torch.Tensor:
        return self.entry_to_tokens(entry_output) if self.entry_to_tokens else entry_output

    def experts(self, pipe: Any) -> list[torch.nn.Module]:
        """The pipeline's transformers that share one MagCache state: ``[transformer]``, plus the second expert of
        a two-expert pipeline."""
        second = getattr(pipe, self.second_expert, None) if self.second_expert and pipe is not None else None
        return [pipe.transformer] + ([second] if isinstance(second, torch.nn.Module) else [])

    def preset_for(self, pipe: Any, transformer: torch.nn.Module) -> str:
        if self.default_preset is None:
            raise ValueError(f"no default preset for {type(transformer).__name__}; pass preset=...")
        return self.default_preset(pipe, transformer)


def _registry() -> dict[str, Adapter]:
    from . import chroma, flux, flux2, framepack, hunyuan_video, hunyuan_video15, qwen_image, wan, z_image

    adapters = [flux.ADAPTER, chroma.ADAPTER, hunyuan_video.ADAPTER, wan.ADAPTER, wan.VACE_ADAPTER, framepack.ADAPTER,
                qwen_image.ADAPTER, hunyuan_video15.ADAPTER, flux2.ADAPTER, z_image.ADAPTER]
    return {name: a for a in adapters for name in a.transformer_classes}


def adapter_for(transformer: torch.nn.Module) -> Adapter:
    """The adapter for ``transformer``'s class (or a base class), with a clear error otherwise."""
    registry = _registry()
    for cls in type(transformer).__mro__:
        if cls.__name__ in registry:
            return registry[cls.__name__]
    raise TypeError(
        f"MagCache has no adapter for {type(transformer).__name__}; supported transformers: "
        + ", ".join(sorted(registry))
    )


def adapter_by_family(family: str) -> Adapter:
    for a in _registry().values():
        if a.family == family:
            return a
    raise KeyError(f"no adapter for model family {family!r}")
