"""bench/gpu_stack.py runs end to end before any GPU time is spent: its --smoke mode (tiny models of every
architecture on this CPU, every phase and case) writes a complete result file whose tables render."""

from __future__ import annotations

import importlib.util
import json

import torch

from bench import architectures, gpu_stack


def test_smoke_run_covers_every_phase_case_and_architecture(tmp_path):
    path = tmp_path / "smoke.json"
    report = gpu_stack.main(["--smoke", "--json", str(path)])
    assert json.loads(path.read_text())["phases"].keys() == set(gpu_stack.PHASES)
    per_call = report["phases"]["per_call"]
    assert list(per_call) == list(architectures.ARCHITECTURES)
    for name, entry in per_call.items():
        assert "skipped" not in entry, (name, entry.get("skipped"))  # every tiny model builds and runs
        assert entry["full_call_ms"] > 0 and entry["head_only_call_ms"] > 0
        has_adapter = entry["ours_skip_call_ms"] is not None
        assert has_adapter == (entry["modelled"] is not None) or entry["preset"] is None, name
    # every architecture has an adapter now; FLUX.2 has no published curve, so no modelled speed-up
    assert all(entry["ours_skip_call_ms"] is not None for entry in per_call.values())
    assert per_call["flux2"]["modelled"] is None
    torchao = importlib.util.find_spec("torchao") is not None
    for name in ("flux", "wan"):
        phase = report["phases"][name]
        cases = phase["cases"]
        assert {"eager", "magcache", "diffusers_magcache", "compile", "magcache+compile"} <= cases.keys(), phase
        assert ("magcache+compile+int8_weight_only" in cases) == torchao
        if not torchao:
            assert "pip install torchao" in phase["skipped"]["int8_weight_only"]
        for case, r in cases.items():
            assert r["output_finite"] and r["graphs_compiled_during_timed_run"] == 0, (name, case)
            if "int8" not in case:  # float32 on a CPU: the cache at the reference settings stays close
                assert r["update_rel_rmse_vs_eager"] < 1e-3, (name, case)
    tables = gpu_stack.render_tables(report)
    for entry in per_call.values():
        assert entry["family"] in tables
    assert "smoke run" in tables


def test_budget_stops_new_cases_and_still_writes_the_file(tmp_path):
    path = tmp_path / "none.json"
    report = gpu_stack.main(["--smoke", "--budget", "0", "--json", str(path)])
    assert json.loads(path.read_text()) == report
    assert report["phases"]["flux"] == {"skipped": "time budget"}
    assert {e["skipped"] for e in report["phases"]["per_call"].values()} == {"time budget"}


def test_full_configurations_are_the_released_sizes():
    """Parameter counts on the meta device (nothing allocated) match the released models' sizes."""
    billions = {name: architectures.parameter_count(name, "full") / 1e9
                for name in ("flux", "wan_t2v_1_3b", "wan_t2v_14b", "qwen_image", "flux2", "z_image")}
    expected = {"flux": 11.9, "wan_t2v_1_3b": 1.4, "wan_t2v_14b": 14.3, "qwen_image": 20.4, "flux2": 32.2,
                "z_image": 6.2}
    for name, size in expected.items():
        assert abs(billions[name] - size) / size < 0.05, (name, billions[name])
    assert torch.get_default_dtype() == torch.float32


def test_refused_options_are_recorded_and_the_other_cases_run(tmp_path):
    report = gpu_stack.main(["--smoke", "--phases", "flux", "--attention", "_native_cudnn", "--quantization",
                             "fp8_dynamic", "--json", str(tmp_path / "refused.json")])
    phase = report["phases"]["flux"]
    assert "needs a CUDA GPU" in phase["skipped"]["attention _native_cudnn"]
    assert "needs a CUDA GPU" in phase["skipped"]["fp8_dynamic"]
    assert {"eager", "magcache", "compile", "magcache+compile"} <= phase["cases"].keys()
    assert all(r["options"]["attention"] == "native" for r in phase["cases"].values())
