"""Regional ``torch.compile`` of a transformer's blocks, made to work together with MagCache.

    import magcache
    magcache.compile_blocks(pipe)                 # or pipe.transformer; torch.compile kwargs pass through
    handle = magcache.apply(pipe, preset="flux")  # before or after: the order does not matter
    pipe(...)                                     # first run = warm-up: each block class compiles once

Why regional: MagCache never hooks or wraps the blocks (a skipped step swaps the block ``ModuleList``s for empty
ones and a pre-hook on ``norm_out`` adds the cached residual), so each compiled block sees exactly the same inputs,
guards and code whether the cache is on, off, skipping or computing. The blocks of one class share one compiled
graph (``nn.Module.compile`` compiles ``Module._call_impl``; dynamo inlines built-in modules, so parameters are
graph inputs, not guards), so a FLUX transformer compiles two graphs (double + single block) and Wan one. Nothing
recompiles across steps, runs or MagCache settings; a new input shape (another resolution or frame count) compiles
once more, like any compiled model.

Warm-up: compilation happens lazily on the first call of each block class with a new shape — on a CPU with
inductor that is seconds to minutes for the first run, on a GPU tens of seconds for full-size models. Time the
first run separately (the app shows it as "warm-up"); later runs run compiled.

Whole-model ``torch.compile(transformer)`` is not the supported route with MagCache: dynamo would trace the
per-call bookkeeping (step, branch, decision) too. Compile the blocks instead; they are ~all of the compute.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

__all__ = ["compile_blocks", "uncompile_blocks", "compiled_blocks", "block_modules"]

# Marks, on the transformer, the torch.compile arguments its blocks were compiled with (for idempotence).
_COMPILE_ATTR = "_magcache_compile_kwargs"


def _transformer(target: Any) -> torch.nn.Module:
    transformer = target if isinstance(target, torch.nn.Module) else getattr(target, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"compile_blocks() needs a diffusers pipeline with a .transformer or a module, got {type(target).__name__}")
    return getattr(transformer, "_orig_mod", transformer)  # torch.compile(module) returns a wrapper


def block_modules(target: Any) -> Iterator[torch.nn.Module]:
    """The transformer's repeated blocks: every block list of its MagCache adapter (VACE's ``vace_blocks``
    included); for a transformer without an adapter, the modules named in diffusers' ``_repeated_blocks``."""
    from .adapters import adapter_for

    transformer = _transformer(target)
    try:
        names = adapter_for(transformer).block_lists
    except TypeError:
        repeated = set(getattr(transformer, "_repeated_blocks", None) or ())
        if not repeated:
            raise TypeError(
                f"{type(transformer).__name__} has neither a MagCache adapter nor diffusers' _repeated_blocks; "
                "compile its blocks with block.compile() yourself"
            ) from None
        for module in transformer.modules():
            if type(module).__name__ in repeated:
                yield module
        return
    for name in names:
        # read _modules directly: during a skipped step the runtime swaps the list for an empty one
        blocks = transformer._modules.get(name)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise TypeError(f"{type(transformer).__name__} has no ModuleList {name!r}")
        yield from blocks


def compile_blocks(target: Any, **compile_kwargs: Any) -> int:
    """Compile each repeated block of ``target`` (a pipeline or its transformer) in place with
    ``block.compile(**compile_kwargs)`` (any :func:`torch.compile` argument: ``backend``, ``mode``,
    ``fullgraph``, ``dynamic``, ...). Works with and without :func:`magcache.apply`, in either order.

    Idempotent: calling it again with the same arguments changes nothing (no new compilation); with different
    arguments the blocks are compiled again with the new ones. Returns the number of blocks compiled by this call.
    Compilation itself happens at the first forward (warm-up).
    """
    transformer = _transformer(target)
    if getattr(transformer, "_compiled_call_impl", None) is not None or transformer is not _unwrapped(target):
        warnings.warn(
            "the whole transformer is compiled too: with MagCache its per-call bookkeeping would recompile at every "
            "step (dynamo then gives up and runs it eagerly). Compile the blocks only.", stacklevel=2)
    blocks = list(block_modules(transformer))
    previous = transformer.__dict__.get(_COMPILE_ATTR)
    if previous is not None and _same_kwargs(previous, compile_kwargs) and all(_is_compiled(b) for b in blocks):
        return 0
    for block in blocks:
        block.compile(**compile_kwargs)
    transformer.__dict__[_COMPILE_ATTR] = dict(compile_kwargs)
    return len(blocks)


def uncompile_blocks(target: Any) -> int:
    """Undo :func:`compile_blocks`: the blocks run eagerly again. Returns how many blocks were compiled."""
    transformer = _transformer(target)
    count = 0
    for block in block_modules(transformer):
        if _is_compiled(block):
            block._compiled_call_impl = None
            count += 1
    transformer.__dict__.pop(_COMPILE_ATTR, None)
    return count


def compiled_blocks(target: Any) -> int:
    """How many of the transformer's repeated blocks are compiled (``Module.compile``)."""
    return sum(_is_compiled(b) for b in block_modules(target))


def _unwrapped(target: Any) -> Any:
    return target if isinstance(target, torch.nn.Module) else getattr(target, "transformer", None)


def _is_compiled(block: torch.nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def _same_kwargs(a: dict, b: dict) -> bool:
    # backends may be callables (counters in tests): compare by identity, the rest by value
    if a.keys() != b.keys():
        return False
    return all(a[k] is b[k] or (not callable(a[k]) and a[k] == b[k]) for k in a)
