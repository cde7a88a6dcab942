"""MagCache on the newer pipelines (diffusers 0.42.1, tiny random-weight models built in code, CPU):
Wan2.2 T2V-A14B / I2V-A14B (two experts in one run), TI2V-5B (text and image), Qwen-Image, HunyuanVideo-1.5,
and the calibrate-first FLUX.2-klein and Z-Image.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import magcache
from magcache import policy as P
from magcache.calibration import CalibrationStore
from magcache.curves import apply_best, choose_curves, model_id
from magcache.measure import calibrate
from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs
from test_new_models import research_loop

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
# kind -> (default preset, arguments that turn true CFG on, settings that skip in both branches at 8 steps). The
# retention keeps step 0 protected whether counted over one branch or two: the runtime learns the branch count at
# step 1 (step 0 computes either way; only the recorded reason could differ).
KINDS = {
    "wan22_t2v": ("wan2.2_t2v_14B", {"guidance_scale": 5.0}, dict(thresh=0.3, K=3, retention_ratio=0.2)),
    "wan22_i2v": ("wan2.2_i2v_14B", {"guidance_scale": 5.0}, dict(thresh=0.3, K=3, retention_ratio=0.0)),
    "wan22_ti2v": ("wan2.2_ti2v_5B", {"guidance_scale": 5.0}, dict(thresh=0.3, K=3, retention_ratio=0.2)),
    "wan22_ti2v_i2v": ("wan2.2_ti2v_5B_i2v", {"guidance_scale": 5.0}, dict(thresh=0.3, K=3, retention_ratio=0.2)),
    "qwen_image": ("qwen_image", {"true_cfg_scale": 4.0, "negative_prompt": "blurry"},
                   dict(thresh=0.3, K=3, retention_ratio=0.2)),
    "hunyuan_video15": ("hunyuan_video1.5", {}, dict(thresh=0.3, K=3, retention_ratio=0.1)),
    "flux2_klein": ("flux2_klein", {"guidance_scale": 4.0}, dict(thresh=0.3, K=3, retention_ratio=0.1)),
    "z_image": ("z_image", {"guidance_scale": 4.0}, dict(thresh=0.3, K=3, retention_ratio=0.1)),
}
# a made-up curve for the models without a published one (their presets have none)
TEST_CURVE = [[1.0, 1.02, 0.99, 0.98, 0.99, 0.97, 0.96, 0.9]]


def call_kwargs(kind: str, steps: int = STEPS) -> dict:
    kw = tiny_call_kwargs(kind, steps)
    kw.update(KINDS[kind][1], output_type="latent")
    return kw


def output(result) -> torch.Tensor:
    images = getattr(result, "images", None)
    return images if images is not None else result.frames


class CallRecorder:
    """Per transformer call, over all the pipeline's transformers: which expert ran, its inputs, the stack input
    seen by the adapter's entry point (None when the stack was left out) and what the exit module received."""

    def __init__(self, handle):
        a = handle.adapter
        self.calls: list[dict] = []
        self._hooks = []
        for expert, t in enumerate(handle.transformers):
            def on_call(module, args, kwargs, expert=expert):
                clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                self.calls.append({"expert": expert, "entry": None, "exit": None,
                                   "inputs": (tuple(map(clone, args)), {k: clone(v) for k, v in kwargs.items()})})

            self._hooks.append(t.register_forward_pre_hook(on_call, with_kwargs=True))
            entry = t.get_submodule(a.entry_module)
            if a.entry_is_block_input:
                self._hooks.append(entry.register_forward_pre_hook(lambda m, args: self._entry(args[0])))
            else:
                self._hooks.append(entry.register_forward_hook(lambda m, args, out: self._entry(a.stack_input(out))))
            self._hooks.append(t.get_submodule(a.exit_module).register_forward_pre_hook(
                lambda m, args: self.calls[-1].__setitem__("exit", args[0].clone())))

    def _entry(self, tokens: torch.Tensor) -> None:
        if self.calls and self.calls[-1]["entry"] is None:
            self.calls[-1]["entry"] = tokens.clone()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def decisions_in_call_order(run, branches=("cond", "uncond")):
    return [(step, b, run.branches[b].decisions[step]) for step in range(run.num_steps) for b in branches
            if b in run.branches]


def stack_input_of(handle, expert: int, inputs) -> torch.Tensor:
    """The stack input of a call, recomputed by running that call again without MagCache (Z-Image: the stack's
    input is the first layer's input, which a skipped call never reaches)."""
    rec = CallRecorder(handle)
    handle.enabled = False
    try:
        with torch.no_grad():
            handle.transformers[expert](*inputs[0], **inputs[1])
    finally:
        handle.enabled = True
        rec.remove()
    return rec.calls[-1]["entry"]


def check_skips_reuse_their_branch_residual(handle, rec, run) -> int:
    """Every computed call stores exit - entry for its branch; every skipped call hands the exit module the stack
    input plus its branch's last stored residual (from whichever expert computed it). Returns the skips checked."""
    calls = decisions_in_call_order(run)
    assert len(calls) == len(rec.calls)
    residual: dict[str, torch.Tensor] = {}
    skips = 0
    for (step, branch, decision), call in zip(calls, rec.calls):
        if decision.skip:
            if handle.adapter.entry_is_block_input:  # the first block never ran: recompute the stack input
                assert call["entry"] is None
                entry = stack_input_of(handle, call["expert"], call["inputs"])
            else:
                entry = call["entry"]
            expected = (entry + residual[branch]).to(call["exit"].dtype)
            assert torch.equal(call["exit"], expected), (step, branch)
            skips += 1
        else:
            residual[branch] = call["exit"].to(call["entry"].dtype) - call["entry"]
    return skips


# --------------------------------------------------------------------------------------------------
# Every new adapter: thresh 0 exact, skips = input + own residual, run = predict = CLI
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_new_adapters_exact_at_thresh0_and_follow_the_prediction(kind):
    preset_id, _, settings = KINDS[kind]
    pipe = build_tiny_pipeline(kind)
    plain = output(pipe(**call_kwargs(kind)))

    handle = magcache.apply(pipe, thresh=0)
    assert handle.preset.id == preset_id
    extra = {"curves": TEST_CURVE} if handle.preset.calibrate_first else {}
    handle.configure(**extra)
    off = output(pipe(**call_kwargs(kind)))
    assert off.dtype == plain.dtype and torch.equal(off, plain), "thresh 0 must be the uncached pipeline, bit for bit"

    handle.configure(**settings)
    rec = CallRecorder(handle)
    cached = output(pipe(**call_kwargs(kind)))
    rec.remove()
    run = handle.last_run
    branches = len(run.branches)
    assert branches == (1 if kind == "z_image" else 2)  # Z-Image batches cond and uncond into one call
    predicted = handle.predict(STEPS, branches)
    assert run.completed and run.computed == predicted.computed
    for b in predicted.decisions:
        assert run.branches[b].decisions == predicted.decisions[b]
    assert check_skips_reuse_their_branch_residual(handle, rec, run) > 0
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    assert all(b.residual is None for b in handle._run.branches.values()), "residuals freed at the end of the run"

    if not handle.preset.calibrate_first:  # the CLI predicts the same schedule without a model
        proc = subprocess.run([sys.executable, "-m", "magcache", "schedule", "--preset", preset_id, "--steps",
                               str(STEPS), "--thresh", str(settings["thresh"]), "--retention",
                               str(settings["retention_ratio"]), "--K", str(settings["K"]), "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["computed"] == run.computed
    handle.remove()
    assert torch.equal(output(pipe(**call_kwargs(kind))), plain)


# --------------------------------------------------------------------------------------------------
# Wan2.2 A14B: one run over both experts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wan22_t2v", "wan22_i2v"])
def test_wan22_one_run_spans_both_experts_with_the_reference_state(kind):
    preset_id, _, settings = KINDS[kind]
    pipe = build_tiny_pipeline(kind)
    handle = magcache.apply(pipe, **settings)
    assert handle.transformers == [pipe.transformer, pipe.transformer_2]
    rec = CallRecorder(handle)
    pipe(**call_kwargs(kind))
    rec.remove()

    # the split is where the pipeline really switched: timesteps at or above boundary_ratio * 1000
    pipe.scheduler.set_timesteps(STEPS)
    split = int((pipe.scheduler.timesteps >= pipe.config.boundary_ratio * 1000).sum())
    assert 0 < split < STEPS and handle.split_step(STEPS) == split
    assert [c["expert"] for c in rec.calls] == [0] * (2 * split) + [1] * (2 * (STEPS - split))

    # one run, one state: the decisions are the research code's loop (shared counter, slots and accumulators
    # over both experts, nothing reset at the switch), at the real split
    assert len(handle.runs) == 1
    run = handle.last_run
    mode = "t2v" if kind == "wan22_t2v" else "i2v"
    expected = research_loop(preset_id, STEPS, settings["thresh"], settings["retention_ratio"], settings["K"], mode,
                             split)
    assert run.computed == expected == handle.predict(STEPS, 2).computed

    # some branch skips its first low-noise call, reusing the residual the high-noise expert left for it (the
    # research code's shared slot); a state reset at the switch (one MagCache state per expert) would compute it
    first_low = {b: run.branches[b].decisions[split] for b in ("cond", "uncond")}
    assert any(d.skip for d in first_low.values()), first_low
    assert check_skips_reuse_their_branch_residual(handle, rec, run) > 0
    per_expert = P.simulate(handle.curves_for(STEPS), STEPS - split, handle.settings, P.Rules(
        compare="<", retention_per_call=True), 2)  # what a fresh state at the switch would do with the low phase
    assert any(not per_expert.decisions[b][0].skip for b in ("cond", "uncond"))
    handle.remove()
    assert "_magcache_handle" not in pipe.transformer_2.__dict__ and "forward" not in pipe.transformer_2.__dict__


def test_wan22_t2v_protects_the_first_low_noise_calls_and_keeps_branches_apart():
    pipe = build_tiny_pipeline("wan22_t2v")
    handle = magcache.apply(pipe, thresh=10.0, K=100, retention_ratio=0.25)  # only retention computes
    pipe(**call_kwargs("wan22_t2v"))
    split = handle.split_step(STEPS)  # 6 of 8 steps: calls 0-11 high, 12-15 low
    # each phase's first 25 % of calls: int(12 * 0.25) = 3 -> calls 0-2; 12 <= c <= 4 * 0.25 + 12 -> calls 12-13
    assert split == 6
    assert handle.last_run.computed == {"cond": [0, 1, 6], "uncond": [0, 6]}
    handle.remove()


# --------------------------------------------------------------------------------------------------
# Calibrate first: FLUX.2 and Z-Image
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flux2_klein", "z_image"])
def test_calibrate_first_models_run_uncached_then_follow_their_calibration(kind, tmp_path, caplog):
    preset_id = KINDS[kind][0]
    pipe = build_tiny_pipeline(kind)
    kw = call_kwargs(kind)
    plain = output(pipe(**call_kwargs(kind)))
    store = CalibrationStore(tmp_path)

    with caplog.at_level(logging.WARNING, logger="magcache"):
        handle = magcache.apply(pipe)
    assert "no published ratio curve" in caplog.text and "calibrate" in caplog.text
    assert torch.equal(output(pipe(**call_kwargs(kind))), plain), "without a curve the model runs uncached"
    run = handle.last_run  # still recorded: every step computed, caching off
    predicted = handle.predict(STEPS, len(run.branches))
    assert run.computed == predicted.computed == {b: list(range(STEPS)) for b in run.branches}
    assert {d.reason for d in predicted.decisions["cond"]} == {"cache off"}
    choice = choose_curves(preset_id, model_id(pipe), STEPS, (32, 32, 1), store=store)
    assert choice.curves == [] and "MagCache is off" in choice.label
    handle.remove()

    cal = store.save(calibrate(pipe, call_kwargs(kind)))
    assert cal.preset == preset_id and cal.num_steps == STEPS
    handle, choice = apply_best(pipe, call_kwargs(kind), store=store, thresh=0.5, K=2, retention_ratio=0.2)
    assert choice.calibration is not None and choice.calibration.id == cal.id
    pipe(**call_kwargs(kind))
    run = handle.last_run
    predicted = handle.predict(STEPS, len(run.branches))
    assert run.completed and run.computed == predicted.computed
    assert any(predicted.skipped.values()), "the calibrated curve lets some steps skip at these settings"
    assert handle.curves == [list(c) for c in cal.curves_for(len(run.branches) > 1)]
    handle.remove()
    del kw


# --------------------------------------------------------------------------------------------------
# Default presets by pipeline (no model run)
# --------------------------------------------------------------------------------------------------
def test_default_presets_follow_the_pipeline_class():
    from magcache.adapters import flux2, qwen_image

    named = lambda name: type(name, (), {})()  # noqa: E731 - a stand-in pipeline of that class name
    assert qwen_image._default_preset(named("QwenImagePipeline"), None) == "qwen_image"
    assert qwen_image._default_preset(named("QwenImageEditPipeline"), None) == "qwen_image_edit"
    assert qwen_image._default_preset(named("QwenImageEditPlusPipeline"), None) == "qwen_image_edit"
    assert flux2._default_preset(named("Flux2Pipeline"), None) == "flux2"
    assert flux2._default_preset(named("Flux2KleinPipeline"), None) == "flux2_klein"
    with pytest.raises(ValueError, match="KV cache"):
        flux2._default_preset(named("Flux2KleinKVPipeline"), None)
