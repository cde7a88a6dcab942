import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads can be 30x slower.
torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """Factory: ``tiny("flux")`` -> a fresh tiny offline pipeline of that kind."""
    from magcache.studio.tiny import build_tiny_pipeline

    return build_tiny_pipeline
