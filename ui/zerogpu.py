"""Hugging Face ZeroGPU support: ``spaces.GPU`` when the ``spaces`` package is installed (it returns the function
unchanged unless the Space runs on ZeroGPU hardware), a no-op everywhere else."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def gpu_task(fn: F) -> F:
    """Wrap ``fn`` so that ZeroGPU attaches a GPU while it runs (``MAGCACHE_GPU_DURATION`` seconds, default 120)."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=int(os.environ.get("MAGCACHE_GPU_DURATION", "120")))(fn)
