"""Strategies side by side: block work is counted as torch itself counts it, and a strategy's run equals a direct
run of the same cache on a fresh pipeline."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import magcache
import magcache.studio.strategies as S
from magcache.studio.tiny import build_tiny_pipeline

STEPS = 6
CALL = dict(num_inference_steps=STEPS, height=16, width=16, max_sequence_length=16, output_type="np",
            true_cfg_scale=2.0, negative_prompt="blurry")
ITEM = ("a red circle", 3)
BLOCK = re.compile(r"FluxTransformer2DModel\.(single_)?transformer_blocks\.\d+")
ONE_KNOB = {"first_block_cache": [0.3], "taylorseer": [3], "faster_cache": [2], "pyramid_attention_broadcast": [2],
            "diffusers_magcache": [0.24]}


def _run(pipe, **extra):
    kw = dict(CALL, prompt=ITEM[0], generator=torch.Generator("cpu").manual_seed(ITEM[1]), **extra)
    return pipe(**kw).images


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("flux")


@pytest.mark.parametrize("strategy", [None, "magcache", *S.HOOK_KNOBS])
def test_block_work_equals_torch_flop_counter(pipe, strategy):
    """Linear work counted by our hooks == matrix-multiply FLOPs / 2 that torch's FlopCounterMode attributes to the
    blocks; attention work == one full joint attention per block call whose attention ran."""
    from torch.utils.flop_counter import FlopCounterMode

    handle = None
    if strategy == "magcache":
        handle = magcache.apply(pipe, preset="flux", thresh=1.0, K=2, retention_ratio=0.2)
    elif strategy is not None:
        handle = magcache.apply(pipe, preset="flux")
        pipe.transformer.enable_cache(S._hook_config(strategy, ONE_KNOB[strategy][0], pipe, handle, STEPS))
        handle.remove()
    t = pipe.transformer
    try:
        with FlopCounterMode(display=False, depth=None) as flops:
            with S.BlockWorkCounter(t, ("transformer_blocks", "single_transformer_blocks")) as counter:
                _run(pipe)
    finally:
        if strategy == "magcache":
            handle.remove()
        elif strategy is not None:
            t.disable_cache()
    torch_block_flops = sum(sum(v.values()) for k, v in flops.get_flop_counts().items() if BLOCK.fullmatch(k))
    assert counter.linear_macs * 2 == torch_block_flops > 0
    # joint attention over the 16 text tokens and the packed 2x2 latent patches of a 16x16 image, per block call
    tokens = 16 + (16 // (pipe.vae_scale_factor * 2)) ** 2
    per_call = t.config.num_attention_heads * tokens * tokens * 2 * t.config.attention_head_dim
    assert counter.attention_macs % per_call == 0
    blocks = len(t.transformer_blocks) + len(t.single_transformer_blocks)
    if strategy is None:
        assert counter.attention_macs == per_call * blocks * STEPS * 2
    if strategy == "magcache":  # a skipped call runs no block at all
        computed = sum(len(v) for v in handle.last_run.computed.values())
        assert counter.attention_macs == per_call * blocks * computed < per_call * blocks * STEPS * 2


def test_strategy_runs_equal_direct_runs_and_count_magcache_exactly(pipe):
    res = S.run_strategies(pipe, CALL, [ITEM], levels=(2.0,), knobs=ONE_KNOB, keep_outputs=True, preset="flux")
    assert not res.unsupported and magcache.get_handle(pipe) is None
    assert {r.strategy for r in res.rows} == set(S.STRATEGIES)
    outputs = res.outputs
    assert np.array_equal(outputs["uncached"][0], _run(build_tiny_pipeline("flux")))
    rows = {r.strategy: r for r in res.rows}
    for name in S.HOOK_KNOBS:
        fresh = build_tiny_pipeline("flux")
        handle = magcache.apply(fresh, preset="flux")
        config = S._hook_config(name, ONE_KNOB[name][0], fresh, handle, STEPS)
        handle.remove()
        fresh.transformer.enable_cache(config)
        label = S.StrategyPoint(name, S.HOOK_KNOBS[name][0], float(ONE_KNOB[name][0])).label
        assert np.array_equal(outputs[label][0], _run(fresh)), name
    # MagCache family: the same schedule applied directly gives the same output, and the counted work is exactly
    # the share of computed transformer calls (a skipped call runs no block)
    for name in ("magcache", "magcache_optimal", "uniform"):
        row = rows[name]
        fresh = build_tiny_pipeline("flux")
        if name == "magcache":
            h = magcache.apply(fresh, preset="flux")
            settings, _ = S.reference_at(h, STEPS, 2, 2.0)
            h.configure(thresh=settings.thresh)
        elif name == "magcache_optimal":
            budget = len(rows["magcache"].computed["cond"])
            magcache.apply(fresh, preset="flux", schedule="optimal", budget=budget)
        else:
            magcache.apply(fresh, preset="flux").configure(computed_steps={"cond": S.uniform_steps(STEPS, 3)})
        assert np.array_equal(outputs[f"{name} target_speedup=2"][0], _run(fresh)), name
        computed = sum(len(v) for v in row.computed.values())
        assert row.compute_fraction == pytest.approx(computed / (2 * STEPS), abs=1e-5)
    assert rows["uniform"].computed == {"cond": S.uniform_steps(STEPS, 3), "uncond": S.uniform_steps(STEPS, 3)}
    assert rows["first_block_cache"].compute_fraction < 1  # FirstBlockCache at 0.3 skips on this model


def test_uniform_and_random_schedules():
    assert S.uniform_steps(28, 7) == [0, 4, 9, 14, 18, 22, 27]  # 22.5 rounds half to even
    assert S.uniform_steps(10, 1) == [0]
    import random

    steps = S.random_steps(28, 7, random.Random(0))
    assert len(steps) == 7 and steps[0] == 0 and steps == sorted(set(steps))


def test_prompt_sets_are_fixed_and_disjoint():
    from magcache.studio.demo import data as D

    tuning, heldout = D.prompt_set("tuning"), D.prompt_set("heldout")
    assert len(tuning) == len(heldout) == 32  # 16 prompts x 2 seeds
    assert not {p for p, _ in tuning} & {p for p, _ in heldout}
    captions = [s.caption for s in D.held_out_scenes()]  # never seen in training
    assert {p for p, _ in tuning + heldout} <= set(captions)
    assert [p for p, _ in D.prompt_set("tuning", 8, 1)] == captions[42:50]  # the prompts the defaults were chosen on
    assert D.prompt_set("heldout", 2, 2) == [(captions[6], 3006), (captions[6], 4006), (captions[7], 3007),
                                             (captions[7], 4007)]
    with pytest.raises(ValueError):
        D.prompt_set("validation")
