"""bench/quantization_quality.py: the float8 emulation rounds exactly like torchao, and the script runs on the demo
model (one scene) with sane numbers. Needs torchao (optional): skipped without it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from bench import quantization_quality as Q  # noqa: E402


def test_float8_emulation_rounds_weights_like_torchao():
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 32)
    weight = layer.weight.detach().clone()
    quantize_(layer, Float8WeightOnlyConfig())
    assert torch.equal(Q.float8_rowwise(weight), layer.weight.dequantize().float())
    assert not torch.equal(Q.float8_rowwise(weight), weight)


def test_one_scene_runs_every_format(tmp_path):
    report = Q.main(["--scenes", "1", "--json", str(tmp_path / "q.json")])
    cases = report["cases"]
    assert list(cases) == ["float32", "float32 + MagCache"] + [c for f in Q.FORMATS for c in (f, f"{f} + MagCache")]
    assert cases["float32"]["computed_calls"] == cases["float32"]["total_calls"]  # threshold 0: every call
    assert cases["float32 + MagCache"]["computed_calls"] < cases["float32"]["total_calls"]
    assert cases["int8_weight_only"]["psnr"] > 40 and cases["fp8_weight_only"]["psnr"] > 30
    assert report["weight_relative_error"]["int8_weight_only"]["mean"] < report["weight_relative_error"]["fp8_weight_only"]["mean"]
