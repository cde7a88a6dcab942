"""Speed options (``magcache.speed``): validation with clear errors, and MagCache staying exact under each option.

The refusals are tested on every machine (torchao absent, float8 on a CPU or an older GPU, CUDA-only kernels on a
CPU, packages that are not installed). The torchao parts (int8 weight-only on a CPU, load-time quantization) run
where torchao is installed and are skipped otherwise: the project does not require it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import magcache
from magcache import speed
from magcache.compile import block_modules, compiled_blocks
from magcache.speed import SpeedOptionError, SpeedOptions
from magcache.studio.tiny import tiny_call_kwargs

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (optional)")
STEPS = 6
SMALL = dict(prompt="a red circle", height=16, width=16, max_sequence_length=16, output_type="latent")


def _run(pipe, kind: str = "flux", **extra) -> torch.Tensor:
    kw = tiny_call_kwargs(kind, STEPS) | SMALL | extra
    out = pipe(**kw)
    return out.images if kind == "flux" else out.frames


def _exact_at_threshold_zero(pipe, kind: str = "flux") -> None:
    """Threshold 0 computes every step: the cached run equals the uncached run of the same model bit for bit."""
    plain = _run(pipe, kind)
    handle = magcache.apply(pipe, thresh=0.0)
    try:
        cached = _run(pipe, kind)
        assert sum(map(len, handle.last_run.computed.values())) == STEPS * len(handle.last_run.computed)
    finally:
        handle.remove()
    assert torch.equal(plain, cached)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: every machine
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("quantization", "int4"), ("attention", "xla"), ("compile_mode", "fast")])
def test_unknown_option_names_list_the_choices(field, value):
    with pytest.raises(SpeedOptionError, match="choose one of"):
        SpeedOptions(**{field: value}).validate("cpu")


def test_defaults_validate_anywhere_and_need_no_torchao(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else object())
    SpeedOptions().validate("cpu")
    assert SpeedOptions().load_key() == "" and SpeedOptions().quantization_config() is None


def test_missing_torchao_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(SpeedOptionError, match="pip install torchao"):
        SpeedOptions(quantization="int8_weight_only").validate("cpu")


def test_a_torchao_that_does_not_import_is_a_clear_refusal(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torchao":
            raise ImportError("undefined symbol: some_torch_function")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(SpeedOptionError, match="does not import with torch.*undefined symbol"):
        speed.check_quantization("int8_weight_only", "cpu")


def test_float8_matrix_products_are_refused_on_a_cpu():
    with pytest.raises(SpeedOptionError, match="needs a CUDA GPU.*use int8_weight_only or fp8_weight_only"):
        SpeedOptions(quantization="fp8_dynamic").validate("cpu")


def test_float8_is_refused_below_compute_capability_8_9(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(SpeedOptionError, match=r"compute capability >= 8\.9.*RTX 3090 has 8\.6.*int8_weight_only"):
        speed.check_quantization("fp8_dynamic", "cuda")


@pytest.mark.parametrize("backend", ["_native_cudnn", "_native_flash", "flash", "sage"])
def test_gpu_attention_backends_are_refused_on_a_cpu(backend):
    with pytest.raises(SpeedOptionError, match="needs a CUDA GPU"):
        SpeedOptions(attention=backend).validate("cpu")


@pytest.mark.parametrize("backend, package", [("flash", "flash-attn"), ("sage", "sageattention"),
                                              ("_flash_3", "FA3")])
def test_attention_packages_that_are_missing_are_named(monkeypatch, backend, package):
    from diffusers.models import attention_dispatch as dispatch

    for flag in ("_CAN_USE_FLASH_ATTN", "_CAN_USE_SAGE_ATTN", "_CAN_USE_FLASH_ATTN_3"):
        monkeypatch.setattr(dispatch, flag, False)
    monkeypatch.setattr(speed, "_require_cuda", lambda device, what: None)  # as if on a GPU
    with pytest.raises(SpeedOptionError, match=package):
        speed.check_attention(backend, "cuda")


def test_an_offloaded_model_is_validated_for_its_execution_device(tiny, monkeypatch):
    """With CPU offload the weights wait on the CPU: the device the caller names decides, not the weights'."""
    pipe = tiny("flux")
    with pytest.raises(SpeedOptionError, match="needs a CUDA GPU"):
        speed.set_attention_backend(pipe.transformer, "_native_cudnn")
    monkeypatch.setattr(speed, "_require_cuda", lambda device, what: None)  # as if "cuda" were there
    speed.set_attention_backend(pipe.transformer, "_native_cudnn", device="cuda")
    assert len(_backends(pipe.transformer)) == 1 and None not in _backends(pipe.transformer)


def test_reduce_overhead_is_refused_on_a_cpu():
    with pytest.raises(SpeedOptionError, match="CUDA graphs"):
        SpeedOptions(compile_mode="reduce-overhead").validate("cpu")
    SpeedOptions(compile_mode="max-autotune-no-cudagraphs").validate("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Attention backend and compile mode on tiny models
# ---------------------------------------------------------------------------------------------------------------
def _backends(transformer) -> set:
    return {getattr(m.processor, "_attention_backend", "-") for m in transformer.modules() if hasattr(m, "processor")}


def test_attention_backend_is_set_per_model_without_changing_the_default(tiny, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    a, b = tiny("flux"), tiny("flux")
    default = _AttentionBackendRegistry._active_backend
    monkeypatch.setattr(speed, "check_attention", lambda name, device: None)  # cuDNN is not run here, only set
    speed.set_attention_backend(a.transformer, "_native_cudnn")
    assert _backends(a.transformer) == {AttentionBackendName._NATIVE_CUDNN}
    assert _AttentionBackendRegistry._active_backend == default  # model b still follows the default
    assert _backends(b.transformer) == {None}
    speed.set_attention_backend(a.transformer, "native")
    assert _backends(a.transformer) == {None}


@pytest.mark.parametrize("kind", ["flux", "wan_t2v"])
def test_native_attention_keeps_outputs_and_magcache_exact(tiny, kind):
    pipe = tiny(kind)
    extra = {} if kind == "flux" else dict(num_frames=5)
    kw = dict(kind=kind, **extra)
    before = _run(pipe, **kw)
    SpeedOptions(attention="native").apply_runtime(pipe)
    assert torch.equal(before, _run(pipe, **kw))
    plain = _run(pipe, **kw)
    handle = magcache.apply(pipe, thresh=0.0)
    try:
        assert torch.equal(plain, _run(pipe, **kw))
    finally:
        handle.remove()


def test_compile_mode_compiles_the_blocks_and_magcache_stays_exact(tiny):
    import torch._dynamo

    torch._dynamo.reset()
    pipe = tiny("flux")
    eager = _run(pipe)
    options = SpeedOptions(compile_mode="default")
    options.apply_runtime(pipe, compile_backend="aot_eager")
    blocks = len(list(block_modules(pipe)))
    assert compiled_blocks(pipe) == blocks
    options.apply_runtime(pipe, compile_backend="aot_eager")  # idempotent: nothing compiled again
    assert speed.set_compile_mode(pipe, "default", backend="aot_eager") == 0
    compiled = _run(pipe)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # aot_eager: same ops, maybe reordered
    _exact_at_threshold_zero(pipe)
    assert speed.set_compile_mode(pipe, "none") == blocks and compiled_blocks(pipe) == 0


# ---------------------------------------------------------------------------------------------------------------
# Quantization (torchao, optional)
# ---------------------------------------------------------------------------------------------------------------
@needs_torchao
@pytest.mark.parametrize("quantization", ["int8_weight_only", "fp8_weight_only"])
def test_weight_only_quantization_in_place_keeps_magcache_exact(tiny, quantization):
    pipe = tiny("flux")
    full = _run(pipe)
    linears = sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    linear_float32_bytes = sum(speed.stored_bytes(m.weight) for m in pipe.transformer.modules()
                               if isinstance(m, torch.nn.Linear))
    assert speed.quantize_transformer(pipe.transformer, quantization) == linears
    quantized = _run(pipe)
    assert not torch.equal(full, quantized)  # the weights really changed
    assert torch.isfinite(quantized).all()
    _exact_at_threshold_zero(pipe)
    linear_bytes = sum(speed.stored_bytes(m.weight) for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    assert linear_bytes < 0.5 * linear_float32_bytes  # 1-byte weights + per-row scales, not the float32 reported
    skipped = magcache.apply(pipe, thresh=1.0, retention_ratio=0.2, K=2)  # and skipping still works on it
    try:
        _run(pipe)
        assert sum(map(len, skipped.last_run.computed.values())) < STEPS
    finally:
        skipped.remove()


@needs_torchao
def test_int8_weight_only_at_load_time(tiny, tmp_path):
    from diffusers import FluxTransformer2DModel, PipelineQuantizationConfig

    pipe = tiny("flux")
    pipe.transformer.save_pretrained(tmp_path)
    options = SpeedOptions(quantization="int8_weight_only")
    options.validate("cpu")
    assert options.load_key() == "quant=int8_weight_only"
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, dtype=torch.float32,
                                                    quantization_config=options.quantization_config())
    weight = loaded.transformer_blocks[0].attn.to_q.weight
    assert "Int8" in type(weight).__name__
    config = options.pipeline_quantization_config()
    assert isinstance(config, PipelineQuantizationConfig) and set(config.quant_mapping) == {"transformer"}
    pipe.transformer = loaded
    _exact_at_threshold_zero(pipe)
