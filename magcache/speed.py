"""Speed options that stack with MagCache: weight quantization, the attention kernel, and the compile mode.

    from magcache.speed import SpeedOptions
    options = SpeedOptions(quantization="fp8_dynamic", attention="_native_cudnn", compile_mode="default")
    options.validate("cuda")                                   # a clear SpeedOptionError where this cannot work
    pipe = FluxPipeline.from_pretrained(..., quantization_config=options.pipeline_quantization_config())
    options.apply_runtime(pipe)                                # attention backend + regional compile
    magcache.apply(pipe, preset="flux")                        # any order: the cache never touches weights or kernels

* **Quantization** (a load-time option: it changes the weights, so a loaded model is quantized or not) goes through
  diffusers' torchao integration (``TorchAoConfig``) when loading, or torchao's ``quantize_`` on a transformer that
  already exists (random-weight benchmarks). torchao is optional: it is imported only when a quantization is asked
  for. ``int8_weight_only`` keeps activations in the model dtype and dequantizes int8 weights (half the weight memory
  of bf16); ``fp8_weight_only`` stores float8 weights the same way (both run on a CPU too); ``fp8_dynamic`` also
  casts activations to float8 per row and runs float8 matrix products (the one that makes a Hopper GPU faster, not
  only smaller), on a CUDA GPU only. Float8 on a GPU needs compute capability 8.9 or newer (Ada, Hopper, Blackwell).
* **Attention backend** (run time) is diffusers' attention dispatcher: ``transformer.set_attention_backend(name)``.
  diffusers also makes the backend the process-wide default for processors that have none of their own; this module
  puts that default back, so one tab's choice does not leak into another model.
* **Compile mode** (run time) is :func:`magcache.compile_blocks` with ``mode=``: regional compilation of the
  repeated blocks, which keeps every block compiled on MagCache's computed steps and never traces its bookkeeping.

MagCache is exact under every option: a skipped step adds the residual the same (quantized, compiled) blocks produced,
and threshold 0 reproduces the uncached run of the same model bit for bit (``tests/test_speed.py``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from .compile import compile_blocks, uncompile_blocks

__all__ = [
    "QUANTIZATIONS", "ATTENTION_BACKENDS", "COMPILE_MODES", "SpeedOptions", "SpeedOptionError",
    "check_quantization", "check_attention", "check_compile_mode", "quantization_config",
    "pipeline_quantization_config", "quantize_transformer", "stored_bytes", "set_attention_backend",
    "set_compile_mode",
]

# name -> (torchao config class, runs on a CPU, what it does). Float8 on a GPU needs compute capability >= 8.9.
QUANTIZATIONS: dict[str, tuple[str | None, bool, str]] = {
    "none": (None, True, "weights in the model dtype"),
    "int8_weight_only": ("Int8WeightOnlyConfig", True, "int8 weights, dequantized per matrix product"),
    "fp8_weight_only": ("Float8WeightOnlyConfig", True, "float8 weights, dequantized per matrix product"),
    "fp8_dynamic": ("Float8DynamicActivationFloat8WeightConfig", False,
                    "float8 weights and per-row float8 activations: float8 matrix products"),
}
# diffusers' attention dispatcher names (AttentionBackendName) offered here -> what runs
ATTENTION_BACKENDS: dict[str, str] = {
    "native": "PyTorch scaled_dot_product_attention, kernel chosen by PyTorch",
    "_native_cudnn": "PyTorch SDPA forced to cuDNN attention (CUDA)",
    "_native_flash": "PyTorch SDPA forced to its FlashAttention-2 kernel (CUDA)",
    "_native_efficient": "PyTorch SDPA forced to its memory-efficient kernel (CUDA)",
    "flash": "the flash-attn package (FlashAttention-2, CUDA)",
    "_flash_3": "FlashAttention-3 built from source (Hopper)",
    "sage": "the sageattention package (SageAttention, CUDA)",
}
# "none" runs eagerly; the others are torch.compile modes for the blocks
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
FLOAT8_MIN_CAPABILITY = (8, 9)
TORCHAO_MIN_VERSION = "0.15.0"  # what diffusers' TorchAoConfig accepts


class SpeedOptionError(ValueError):
    """A speed option this device or this installation cannot run; the message says why and what to do."""


def _require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise SpeedOptionError(f"{what} needs a CUDA GPU; this model runs on {device.type}")
    if not torch.cuda.is_available():
        raise SpeedOptionError(f"{what} needs a CUDA GPU; torch {torch.__version__} sees none")


def _torchao():
    if importlib.util.find_spec("torchao") is None:
        raise SpeedOptionError(f"weight quantization needs torchao >= {TORCHAO_MIN_VERSION}: pip install torchao")
    from packaging.version import Version

    try:
        import torchao
    except Exception as e:  # noqa: BLE001 - a torchao built for another torch can fail at import
        raise SpeedOptionError(f"torchao does not import with torch {torch.__version__} ({type(e).__name__}: {e}): "
                               "install the torchao release made for this torch") from None
    if Version(torchao.__version__.split("+")[0]) < Version(TORCHAO_MIN_VERSION):
        raise SpeedOptionError(f"torchao {torchao.__version__} is too old for diffusers' TorchAoConfig (needs >= "
                               f"{TORCHAO_MIN_VERSION}): pip install -U torchao")
    return torchao


def check_quantization(name: str, device: str | torch.device) -> None:
    """Raise :class:`SpeedOptionError` unless ``name`` can quantize a model that runs on ``device``."""
    if name not in QUANTIZATIONS:
        raise SpeedOptionError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if name == "none":
        return
    dev = torch.device(device)
    runs_on_cpu = QUANTIZATIONS[name][1]
    if dev.type == "cpu" and not runs_on_cpu:
        raise SpeedOptionError(f"{name} (float8 matrix products) needs a CUDA GPU of compute capability >= "
                               f"{'.'.join(map(str, FLOAT8_MIN_CAPABILITY))}; this model runs on cpu: use "
                               "int8_weight_only or fp8_weight_only there")
    if name.startswith("fp8") and dev.type != "cpu":
        what = f"{name} (float8)"
        _require_cuda(dev, what)
        capability = torch.cuda.get_device_capability(dev)
        if capability < FLOAT8_MIN_CAPABILITY:
            raise SpeedOptionError(
                f"{what} needs compute capability >= {'.'.join(map(str, FLOAT8_MIN_CAPABILITY))} (Ada, Hopper or "
                f"newer); {torch.cuda.get_device_name(dev)} has {capability[0]}.{capability[1]}: use int8_weight_only")
    _torchao()


def check_attention(name: str, device: str | torch.device) -> None:
    """Raise :class:`SpeedOptionError` unless diffusers can run attention backend ``name`` on ``device``."""
    if name not in ATTENTION_BACKENDS:
        raise SpeedOptionError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "native":
        return
    _require_cuda(torch.device(device), f"attention backend {name!r}")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:  # the missing-package checks (flash-attn, FlashAttention-3, sageattention) are diffusers' own
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as e:
        raise SpeedOptionError(str(e)) from None


def check_compile_mode(mode: str, device: str | torch.device) -> None:
    """Raise :class:`SpeedOptionError` unless the blocks can be compiled with ``mode`` on ``device``."""
    if mode not in COMPILE_MODES:
        raise SpeedOptionError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "reduce-overhead":  # CUDA graphs
        _require_cuda(torch.device(device), "compile mode 'reduce-overhead' (CUDA graphs)")


def _ao_config(name: str):
    _torchao()
    import torchao.quantization as q

    cls = getattr(q, QUANTIZATIONS[name][0])
    if name == "fp8_dynamic":
        return cls(granularity=q.PerRow())  # per-row scales: the accurate float8 recipe on Hopper
    return cls()


def quantization_config(name: str):
    """diffusers' ``TorchAoConfig`` for ``name`` (``None`` for ``"none"``): pass it as ``quantization_config=`` to a
    transformer's ``from_pretrained``."""
    if name not in QUANTIZATIONS:
        raise SpeedOptionError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if name == "none":
        return None
    from diffusers import TorchAoConfig

    return TorchAoConfig(_ao_config(name))


def pipeline_quantization_config(name: str):
    """diffusers' ``PipelineQuantizationConfig`` that quantizes the pipeline's transformer only (``None`` for
    ``"none"``): pass it as ``quantization_config=`` to a pipeline's ``from_pretrained``. Text encoders and the VAE
    keep their dtype: the transformer is where the steps spend their time and most of the memory."""
    config = quantization_config(name)
    if config is None:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


def quantize_transformer(transformer: torch.nn.Module, name: str, device: str | torch.device | None = None) -> int:
    """Quantize the linear layers of an already built ``transformer`` in place with torchao's ``quantize_`` (what
    ``from_pretrained(quantization_config=...)`` does while loading), for a model that runs on ``device`` (default:
    where its weights are). Returns how many linear layers it changed."""
    check_quantization(name, device or _module_device(transformer))
    if name == "none":
        return 0
    config = _ao_config(name)
    from torchao.quantization import quantize_

    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    before = [type(m.weight) for m in linears]
    quantize_(transformer, config)
    return sum(type(m.weight) is not b for m, b in zip(linears, before))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` really holds: for a torchao-quantized weight (a tensor subclass that reports the original
    dtype) the sum of its inner tensors (int8 or float8 data and scales), else numel x element size."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def set_attention_backend(transformer: torch.nn.Module, name: str, device: str | torch.device | None = None) -> None:
    """Run the attention of ``transformer`` with diffusers' backend ``name``, validated for ``device`` (default:
    where its weights are; pass the execution device of a CPU-offloaded model). The process-wide default backend is
    left as it was, so other models keep theirs."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    check_attention(name, device or _module_device(transformer))
    transformer = getattr(transformer, "_orig_mod", transformer)
    previous = _AttentionBackendRegistry._active_backend
    try:
        if name == "native":
            transformer.reset_attention_backend()  # processors follow the default again: native unless overridden
        else:
            transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)


def set_compile_mode(target: Any, mode: str, backend: str | Any = "inductor",
                     device: str | torch.device | None = None) -> int:
    """Compile the repeated blocks of ``target`` (a pipeline or transformer) with ``mode`` (``"none"``: run them
    eagerly again), validated for ``device`` (default: where the weights are). Returns the number of blocks
    compiled or uncompiled by this call."""
    transformer = getattr(target, "transformer", target)
    check_compile_mode(mode, device or _module_device(transformer))
    if mode == "none":
        return uncompile_blocks(transformer)
    return compile_blocks(transformer, backend=backend, **({} if mode == "default" else {"mode": mode}))


def _module_device(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass(frozen=True)
class SpeedOptions:
    """What a tab runs with besides MagCache: plain data the app can keep per tab.

    ``quantization`` is a load-time option (part of the loaded model's identity: see :meth:`load_key`);
    ``attention`` and ``compile_mode`` are run-time options (:meth:`apply_runtime` on an already loaded model)."""

    quantization: str = "none"
    attention: str = "native"
    compile_mode: str = "none"

    def validate(self, device: str | torch.device) -> None:
        """Raise :class:`SpeedOptionError` for the first option ``device`` (or the installation) cannot run."""
        check_quantization(self.quantization, device)
        check_attention(self.attention, device)
        check_compile_mode(self.compile_mode, device)

    def load_key(self) -> str:
        """What distinguishes a loaded model: the same weights quantized differently are different models."""
        return "" if self.quantization == "none" else f"quant={self.quantization}"

    def quantization_config(self):
        return quantization_config(self.quantization)

    def pipeline_quantization_config(self):
        return pipeline_quantization_config(self.quantization)

    def apply_runtime(self, target: Any, compile_backend: str | Any = "inductor",
                      device: str | torch.device | None = None) -> None:
        """Set the attention backend and the compile mode on ``target`` (a pipeline or its transformer) that runs on
        ``device`` (default: where its weights are). Idempotent: the same options again change nothing (no
        recompilation)."""
        transformer = getattr(target, "transformer", target)
        set_attention_backend(transformer, self.attention, device)
        set_compile_mode(transformer, self.compile_mode, backend=compile_backend, device=device)
