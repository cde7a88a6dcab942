"""MagCache keeps compiled blocks compiled: no graph breaks, no recompilations across steps, runs, settings and
skip/compute mixes, and every computed block call runs the compiled graph.

The backend is ``aot_eager`` wrapped in a counter: dynamo captures and guards exactly as with inductor (which is
where recompilations and graph breaks come from) and AOTAutograd traces the graphs, without inductor's C++ codegen,
which takes minutes on this CPU. ``bench/run.py`` times the inductor path.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import magcache
from magcache.compile import block_modules, compile_blocks, compiled_blocks, uncompile_blocks
from magcache.studio.tiny import tiny_call_kwargs


class GraphCounter:
    """A torch.compile backend that counts the graphs it compiles and the executions of compiled graphs."""

    def __init__(self, backend: str = "aot_eager"):
        self.backend = backend
        self.graphs = 0
        self.executions = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        compiled = lookup_backend(self.backend)(gm, example_inputs)

        def run(*args):
            self.executions += 1
            return compiled(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def run(pipe, kind, steps, **overrides):
    return pipe(**(tiny_call_kwargs(kind, steps, seed=0) | overrides), output_type="latent")[0]


def computed_calls(handle) -> int:
    return sum(len(v) for v in handle.last_run.computed.values())


@pytest.mark.parametrize(
    "kind, settings_a, settings_b",
    [
        ("flux", dict(thresh=0.3, K=3), dict(thresh=0.1, K=2)),
        ("wan_t2v", dict(thresh=0.3, K=3), dict(thresh=0.05, K=1)),  # real CFG: cond + uncond branches
    ],
)
def test_cached_runs_keep_blocks_compiled(tiny, kind, settings_a, settings_b):
    steps = 10
    pipe = tiny(kind)
    blocks = len(list(block_modules(pipe)))
    handle = magcache.apply(pipe, **settings_a)

    eager = {}
    for name, settings in (("a", settings_a), ("b", settings_b)):
        handle.configure(**settings)
        eager[name] = (run(pipe, kind, steps), handle.last_run.computed)
    branches = len(eager["a"][1])
    assert eager["a"][1] != eager["b"][1], "the two settings must give different skip/compute mixes"
    for _, schedule in eager.values():
        assert all(0 < len(v) < steps for v in schedule.values()), schedule  # each run skips and computes

    counter = GraphCounter()
    assert compile_blocks(pipe, backend=counter) == blocks

    # compiled, cache off: the graphs an uncached compiled transformer needs
    handle.configure(enabled=False)
    run(pipe, kind, steps)
    graphs = counter.graphs
    assert graphs >= 1
    assert counter.executions == steps * branches * blocks

    # cache on, settings a / b / a: same graphs, compiled blocks on exactly the computed steps, eager outputs
    handle.configure(enabled=True)
    for name in ("a", "b", "a"):
        handle.configure(**(settings_a if name == "a" else settings_b))
        before = counter.executions
        out = run(pipe, kind, steps)
        reference, schedule = eager[name]
        assert handle.last_run.computed == schedule
        assert counter.graphs == graphs, "the cache caused a recompilation"
        assert counter.executions - before == computed_calls(handle) * blocks
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)

    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_blocks_is_idempotent_and_order_free(tiny):
    pipe = tiny("flux")
    blocks = len(list(block_modules(pipe)))
    counter = GraphCounter("eager")
    assert compile_blocks(pipe, backend=counter) == blocks  # before apply
    assert compile_blocks(pipe.transformer, backend=counter) == 0  # same arguments: nothing to do
    assert compiled_blocks(pipe) == blocks
    handle = magcache.apply(pipe, thresh=0.3, K=3)
    run(pipe, "flux", 8)
    graphs = counter.graphs
    assert graphs >= 1 and counter.executions == computed_calls(handle) * blocks
    compile_blocks(pipe, backend=counter)  # again after apply: no new wrapper, so no recompilation
    run(pipe, "flux", 8)
    assert counter.graphs == graphs

    assert uncompile_blocks(pipe) == blocks
    assert compiled_blocks(pipe) == 0
    executions = counter.executions
    run(pipe, "flux", 8)
    assert counter.executions == executions  # eager again
    other = GraphCounter("eager")
    assert compile_blocks(pipe, backend=other) == blocks  # different arguments compile again
    run(pipe, "flux", 8)
    assert other.executions == computed_calls(handle) * blocks


def test_framepack_blocks_compile_without_repeated_blocks(tiny):
    """FramePack's transformer class has no ``_repeated_blocks`` (``compile_repeated_blocks`` raises); the adapter's
    block lists still compile, and each section is a cached run with compiled blocks."""
    pipe = tiny("framepack")
    assert not getattr(pipe.transformer, "_repeated_blocks", None)
    counter = GraphCounter("eager")
    blocks = compile_blocks(pipe, backend=counter)
    assert blocks == len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    handle = magcache.apply(pipe, thresh=0.5, K=2, retention_ratio=0.0)
    run(pipe, "framepack", 6, num_frames=17)  # two sections of 9 frames
    sections = [r for r in handle.runs if r.completed]
    assert len(sections) == 2
    computed = sum(sum(len(v) for v in r.computed.values()) for r in sections)
    assert computed < sum(r.num_steps for r in sections)  # steps were skipped
    assert counter.executions == computed * blocks
    assert graph_breaks() == 0


def test_diffusers_builtin_magcache_keeps_every_block_eager(tiny):
    """The comparison point: diffusers' MagCache hooks are ``torch.compiler.disable``d and wrap
    every block, so compiled blocks never run compiled, in either order. If this starts failing, diffusers fixed
    it: update docs/benchmarks.md."""
    from diffusers.hooks import MagCacheConfig

    for compile_first in (True, False):
        torch._dynamo.reset()
        pipe = tiny("flux")
        counter = GraphCounter("eager")
        config = MagCacheConfig(threshold=0.3, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=8,
                                mag_ratios=magcache.get_preset("flux").curves[0])
        if compile_first:
            compile_blocks(pipe, backend=counter)
            pipe.transformer.enable_cache(config)
        else:
            pipe.transformer.enable_cache(config)
            compile_blocks(pipe, backend=counter)
        run(pipe, "flux", 8)
        assert (counter.graphs, counter.executions) == (0, 0)


def test_computed_steps_hold_no_stack_input_across_the_blocks(tiny):
    """Peak memory: while the blocks of a computed step run, MagCache holds no reference to the stack input (the
    previous residual's buffer takes ``-input`` in place and the exit adds the output), so at the peak the cache adds
    one residual per branch, not input + old residual + new residual. The output is unchanged."""
    import weakref

    pipe = tiny("flux")
    t = pipe.transformer
    eager_handle = magcache.apply(pipe, thresh=0.3, K=3)
    entries, alive = [], []
    t.x_embedder.register_forward_hook(lambda m, a, out: entries.append(weakref.ref(out)))
    t.transformer_blocks[1].register_forward_pre_hook(lambda m, a: alive.append(entries[-1]() is not None))
    out = run(pipe, "flux", 10)
    computed = computed_calls(eager_handle)
    assert 0 < computed < 10 and len(alive) == computed
    assert not any(alive), "the stack input was kept alive across the block stack"
    held = [b.residual for b in eager_handle._run.branches.values() if b.residual is not None] if eager_handle._run else []
    assert len(held) <= 1

    # the residual is exactly out - in on every computed step (checked in a second run that keeps the input)
    inputs, checked = [], []
    t.x_embedder.register_forward_hook(lambda m, a, out: inputs.append(out))

    def check_residual(module, args):  # runs after MagCache's own exit pre-hook
        call = eager_handle._call
        if not call.skip:
            checked.append(torch.equal(call.branch.residual, args[0] - inputs[-1]))

    t.norm_out.register_forward_pre_hook(check_residual)
    torch.testing.assert_close(run(pipe, "flux", 10), out, rtol=0, atol=0)
    assert len(checked) == computed and all(checked)


def test_compile_blocks_warns_when_the_whole_transformer_is_compiled(tiny):
    """Whole-model compile traces MagCache's per-call bookkeeping and recompiles every step; say so."""
    pipe = tiny("flux")
    pipe.transformer.compile(backend="eager")
    with pytest.warns(UserWarning, match="whole transformer is compiled"):
        compile_blocks(pipe, backend="eager")
    wrapped = torch.compile(tiny("flux").transformer, backend="eager")  # an OptimizedModule around it
    with pytest.warns(UserWarning, match="whole transformer is compiled"):
        assert compile_blocks(wrapped, backend="eager") == len(list(block_modules(wrapped._orig_mod)))
