"""MagCache for diffusers pipelines: skip transformer steps whose block-stack residual can be predicted.

    import magcache
    handle = magcache.apply(pipe, preset="flux")          # reference defaults for FLUX.1-dev
    image = pipe("a cat", num_inference_steps=28).images[0]
    print(handle.last_run.summary())                      # computed / skipped steps per branch

The decision rule lives in :mod:`magcache.policy` (pure Python); :func:`magcache.policy.simulate` predicts the
schedule of a run without a model, with the same code the runtime uses.
"""

from .policy import Rules, Schedule, Settings, simulate, solve_thresh_for_speedup
from .presets import Preset, get_preset, list_presets

# These need torch; the policy, the presets and the CLI's schedule command do not, so they load on first use.
_LAZY = {
    "MagCacheHandle": "runtime",
    "RunStats": "runtime",
    "apply": "runtime",
    "get_handle": "runtime",
    "remove": "runtime",
    "compile_blocks": "compile",
    "uncompile_blocks": "compile",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'magcache' has no attribute {name!r}")


__all__ = [
    "apply",
    "compile_blocks",
    "uncompile_blocks",
    "remove",
    "get_handle",
    "MagCacheHandle",
    "RunStats",
    "Preset",
    "get_preset",
    "list_presets",
    "Rules",
    "Settings",
    "Schedule",
    "simulate",
    "solve_thresh_for_speedup",
]
__version__ = "0.1.0"
