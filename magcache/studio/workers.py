"""One generation over several GPUs: the model manager under context parallelism, and the app's follower ranks.

With ``MAGCACHE_GPUS=N`` (N > 1) the app starts N processes, one per GPU (:func:`start`). Rank 0 serves Gradio and
owns the :class:`ParallelModelManager`; ranks 1..N-1 run :func:`follow`, a loop that does what rank 0 asks through
the process group's key-value store:

* ``load``: load the same model (the same :class:`~magcache.studio.manager.LoadPlan`) on this rank's GPU and answer;
  when every rank has it, every rank enables context parallelism on its transformer together (``enable``).
* ``run``: call the pipeline with the arguments rank 0 calls it with (generator state, MagCache settings and curves
  included), in step with rank 0 (:func:`magcache.parallel.run_in_lockstep`): a Stop on rank 0 stops every rank at
  the same step, and an error on any rank is reported to rank 0 instead of leaving the others waiting.
* Every request carries the keys rank 0 has loaded; a follower unloads the models rank 0 no longer has.

Models without a context-parallel plan in diffusers run on rank 0's GPU alone, with a note saying so. The CLI
(``torchrun ... -m magcache generate``, :mod:`magcache.studio.generate`) uses the same manager without a leader:
every rank runs the same command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any, Callable

import torch

from magcache import parallel

from .manager import Cancelled, LoadedModel, LoadPlan, ModelLoadError, ModelManager, free_memory, is_out_of_memory

logger = logging.getLogger("magcache.studio")

_POLL_S = 0.02  # how often a waiting follower looks for a request (and checks that rank 0 is still there)


def gpu_count() -> int:
    """``MAGCACHE_GPUS`` (default 1): how many GPUs one generation runs on."""
    value = (os.environ.get("MAGCACHE_GPUS") or "1").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MAGCACHE_GPUS must be a whole number >= 1, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Requests from rank 0 to the followers
# --------------------------------------------------------------------------------------------------
class Channel:
    """Numbered requests from rank 0 and one reply per follower, as pickles in the process group's store (a TCP
    store of these processes only, on this machine)."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout_s: float):
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.timeout = timedelta(seconds=timeout_s)
        self.sent = 0  # rank 0: requests sent; followers: requests received
        self.broken: str | None = None  # rank 0: why the followers can no longer be reached

    def send(self, message: dict) -> int:
        if self.broken:
            raise parallel.RanksOutOfStep(f"{self.broken}; restart the app to use the other GPUs again")
        self.sent += 1
        self.store.set(f"request/{self.sent}", pickle.dumps(message))
        return self.sent

    def replies(self, number: int) -> dict[int, dict]:
        """Every follower's reply to request ``number`` (waits at most the timeout)."""
        keys = [f"reply/{number}/{r}" for r in range(1, self.world_size)]
        try:
            self.store.wait(keys, self.timeout)
        except RuntimeError as e:  # a follower died or is stuck: later requests fail at once instead of waiting
            self.broken = f"a follower rank did not answer within {self.timeout.total_seconds():g} s ({e})"
            raise parallel.RanksOutOfStep(self.broken) from None
        out = {r: pickle.loads(self.store.get(k)) for r, k in zip(range(1, self.world_size), keys)}
        for k in keys:
            self.store.delete_key(k)
        self.store.delete_key(f"request/{number}")
        return out

    def receive(self, leader_alive: Callable[[], bool]) -> tuple[int, dict]:
        """The next request (followers), waiting as long as rank 0 is alive."""
        key = f"request/{self.sent + 1}"
        while not self.store.check([key]):  # polled: a blocking wait with a timeout logs a warning each time
            if not leader_alive():
                raise SystemExit(0)
            time.sleep(_POLL_S)
        self.sent += 1
        return self.sent, pickle.loads(self.store.get(key))

    def reply(self, number: int, message: dict) -> None:
        self.store.set(f"reply/{number}/{self.rank}", pickle.dumps(message))


def _failure(error: BaseException) -> dict:
    return {"ok": False, "error": f"{type(error).__name__}: {error}", "oom": is_out_of_memory(error)}


def _raise_for_replies(replies: dict[int, dict], what: str) -> None:
    failed = {r: m for r, m in replies.items() if not m.get("ok")}
    if not failed:
        return
    message = "; ".join(f"rank {r}: {m['error']}" for r, m in sorted(failed.items()))
    if any(m.get("oom") for m in failed.values()):
        raise torch.OutOfMemoryError(f"{what} on another GPU: {message}")
    raise RuntimeError(f"{what} failed on another GPU: {message}")


# --------------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------------
class ParallelModelManager(ModelManager):
    """A :class:`ModelManager` whose models run with ``kind`` context parallelism over every rank of the process
    group. With a ``channel`` (the app's rank 0) it also makes the follower ranks load, run and unload the same
    models; without one (the CLI under torchrun) every rank runs the same code and loads on its own."""

    def __init__(self, *args: Any, kind: str = "ulysses", channel: Channel | None = None, follower: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.channel = channel
        self.follower = follower  # loads only; rank 0's "enable" request switches context parallelism on
        self.lock = threading.Lock()  # one request to the followers at a time

    def plan(self, tab_id: str, variant: str | None = None, weights: str | None = None,
             base: str | None = None) -> LoadPlan:
        plan = super().plan(tab_id, variant, weights, base)
        if self.channel is not None and not parallel.supports_context_parallel(plan.transformer_cls):
            note = (f"{plan.transformer_cls} has no context-parallel plan in diffusers, so this model runs on one GPU "
                    f"(rank 0) instead of {self.channel.world_size}.")
            plan = replace(plan, notes=plan.notes + (note,))
        return plan

    def _load(self, plan: LoadPlan) -> LoadedModel:
        if self.follower:
            return super()._load(plan)
        if not parallel.supports_context_parallel(plan.transformer_cls):
            if self.channel is None:
                parallel.check_context_parallel(plan.transformer_cls, self.kind, self.device)  # raises, says why
            return super()._load(plan)
        if self.channel is None:
            loaded = super()._load(plan)
            parallel.enable_context_parallel(loaded.pipe.transformer, self.kind)
            return loaded
        with self.lock:
            number = self.channel.send({"kind": "load", "plan": plan, "keep": self._keys()})
            try:
                loaded = super()._load(plan)
            finally:
                replies = self.channel.replies(number)  # always collected, so the next request starts clean
            _raise_for_replies(replies, f"loading {plan.variant_id}")
            number = self.channel.send({"kind": "enable", "key": plan.key, "keep": self._keys() + [plan.key]})
            failure = None
            try:
                parallel.enable_context_parallel(loaded.pipe.transformer, self.kind)
            except Exception as e:  # noqa: BLE001 - reported after the followers answered
                failure = e
            _raise_for_replies(self.channel.replies(number), "enabling context parallelism")
            if failure is not None:
                raise failure
        _lead(loaded.pipe, self, plan.key)
        return loaded

    def _keys(self) -> list[str]:
        return [m.key for m in self.loaded()]

    def shutdown(self) -> None:
        """Tell the followers to exit (rank 0, when the app stops)."""
        if self.channel is not None:
            with self.lock:
                self.channel.send({"kind": "shutdown"})


# --------------------------------------------------------------------------------------------------
# Rank 0's pipelines: every call also runs on the followers
# --------------------------------------------------------------------------------------------------
def _lead(pipe: Any, manager: ParallelModelManager, key: str) -> None:
    """Make ``pipe``'s calls run on every rank: its class becomes a subclass whose ``__call__`` sends the call to the
    followers first (``isinstance`` checks, attributes and MagCache's hooks are unaffected)."""
    base = type(pipe)
    pipe.__class__ = type(base.__name__, (_LeaderCalls, base), {"_magcache_manager": manager, "_magcache_key": key})


class _LeaderCalls:
    _magcache_manager: ParallelModelManager
    _magcache_key: str

    def __call__(self, *args: Any, **call: Any) -> Any:
        if args:
            raise TypeError("a context-parallel pipeline takes keyword arguments only (so every rank gets them)")
        manager = self._magcache_manager
        user_step_end = call.pop("callback_on_step_end", None)
        generator = call.pop("generator", None)
        message = {"kind": "run", "key": self._magcache_key, "keep": manager._keys(),
                   "call": call, "generator": _generator_state(generator),
                   "magcache": _handle_state(self)}
        with manager.lock:
            number = manager.channel.send(message)  # first: making the lockstep may need the followers
            lockstep = parallel.lockstep_for(self.transformer, _block_lists(self))
            output, failure, peer_failed = None, None, None
            try:
                output = parallel.run_in_lockstep(self, lockstep, dict(call, generator=generator),
                                                  on_step_end=user_step_end, call_with=super().__call__)
            except parallel.RunStopped as e:
                failure = Cancelled(str(e))
            except parallel.PeerFailed as e:
                peer_failed = e  # the followers' replies say what failed
            except BaseException as e:
                failure = e
            replies = manager.channel.replies(number)
        if failure is not None:
            raise failure
        _raise_for_replies(replies, "the run")
        if peer_failed is not None:
            raise peer_failed
        return output


def _block_lists(pipe: Any) -> tuple[str, ...]:
    from magcache.adapters import adapter_for

    return adapter_for(pipe.transformer).block_lists


def _generator_state(generator: Any) -> tuple[str, torch.Tensor] | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError("a context-parallel run takes one torch.Generator (or none)")
    return str(generator.device), generator.get_state()


def _generator(state: tuple[str, torch.Tensor] | None) -> torch.Generator | None:
    if state is None:
        return None
    generator = torch.Generator(state[0])
    generator.set_state(state[1])
    return generator


def _handle_state(pipe: Any) -> dict | None:
    """What the followers need to take the same MagCache decisions: the handle's preset, settings, curves, rules and
    modes (None without a handle)."""
    handle = pipe.transformer.__dict__.get("_magcache_handle")
    if handle is None:
        return None
    return {"preset": handle.preset.id, "settings": handle.settings, "curves": handle.curves, "rules": handle.rules,
            "calibrate": handle.calibrate, "enabled": handle.enabled, "computed_steps": handle.computed_steps}


def _mirror_handle(pipe: Any, state: dict | None) -> None:
    import magcache

    if state is None:
        magcache.remove(pipe)
        return
    handle = magcache.get_handle(pipe)
    if handle is None or handle.preset.id != state["preset"]:
        handle = magcache.apply(pipe, preset=state["preset"], curves=state["curves"], rules=state["rules"])
    handle.settings, handle.curves, handle.rules = state["settings"], state["curves"], state["rules"]
    handle.calibrate, handle.enabled = state["calibrate"], state["enabled"]
    handle.computed_steps = state["computed_steps"]


# --------------------------------------------------------------------------------------------------
# Followers
# --------------------------------------------------------------------------------------------------
def follow(manager: ParallelModelManager, channel: Channel, leader_alive: Callable[[], bool]) -> None:
    """Rank > 0: do what rank 0 asks until it says ``shutdown`` (or goes away). Every request gets a reply, errors
    included; nothing a request leaves behind (a failed load, an out-of-memory run) outlives it."""
    while True:
        number, message = channel.receive(leader_alive)
        kind = message["kind"]
        if kind == "shutdown":
            manager.unload_all()
            return
        for key in [k for k in manager._keys() if k not in message["keep"] and k != message.get("key")]:
            manager.unload(key)
        try:
            if kind == "load":
                plan = message["plan"]
                if plan.key not in manager._keys():
                    manager._get(plan, None, hold=False)
            elif kind == "enable":
                parallel.enable_context_parallel(_loaded(manager, message["key"]).pipe.transformer, manager.kind)
            elif kind == "run":
                _follow_run(manager, message)
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as e:  # noqa: BLE001 - every failure goes back to rank 0, which reports it
            logger.warning("rank %d: %s request failed: %s", channel.rank, kind, f"{type(e).__name__}: {e}")
            channel.reply(number, _failure(e))
            del e
            free_memory()
            continue
        channel.reply(number, {"ok": True})


def _loaded(manager: ModelManager, key: str) -> LoadedModel:
    for m in manager.loaded():
        if m.key == key:
            return m
    raise KeyError(f"model {key!r} is not loaded on this rank")


def _follow_run(manager: ParallelModelManager, message: dict) -> None:
    pipe = _loaded(manager, message["key"]).pipe
    _mirror_handle(pipe, message["magcache"])
    call = dict(message["call"], generator=_generator(message["generator"]))
    call["output_type"] = "latent"  # only rank 0 decodes and shows the output
    lockstep = parallel.lockstep_for(pipe.transformer, _block_lists(pipe))
    try:
        parallel.run_in_lockstep(pipe, lockstep, call)
    except parallel.RunStopped:
        pass  # rank 0 stopped the run: not a failure of this rank
    finally:
        with contextlib.suppress(Exception):
            pipe.maybe_free_model_hooks()


# --------------------------------------------------------------------------------------------------
# Starting the ranks
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(rank: int, world_size: int, port: int) -> tuple[Channel, str]:
    """Join the process group of the app's ranks on this machine (rank 0 hosts the store) and return the request
    channel and this rank's device. Model collectives time out after ``MAGCACHE_CP_TIMEOUT`` seconds, requests and
    agreements after twice that."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                          timeout=timedelta(seconds=parallel.control_timeout_seconds()))
    _, _, device = parallel.init_process_group(store, rank, world_size)
    parallel.control_group(range(world_size))  # now, while every rank is here: later only the runs are in step
    return Channel(dist.PrefixStore("magcache", store), rank, world_size, parallel.control_timeout_seconds()), device


def follower_main(rank: int, world_size: int, port: int, leader_pid: int, manager_kwargs: dict) -> None:
    """Entry point of a follower process (spawned by :func:`start`)."""
    channel, device = connect(rank, world_size, port)
    manager = ParallelModelManager(device=device, follower=True, **manager_kwargs)
    follow(manager, channel, lambda: _alive(leader_pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def start(world_size: int, **manager_kwargs: Any) -> ParallelModelManager:
    """Rank 0 of the app: spawn ``world_size - 1`` follower processes (one per further GPU), join the process group
    with them and return the manager whose models run over all of them."""
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(f"MAGCACHE_GPUS={world_size} but this machine has {torch.cuda.device_count()} GPU(s)")
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.get_context("spawn")
    for rank in range(1, world_size):
        context.Process(target=follower_main, args=(rank, world_size, port, os.getpid(), manager_kwargs),
                        daemon=True, name=f"magcache-rank-{rank}").start()
    channel, device = connect(0, world_size, port)
    logger.info("context parallelism over %d ranks (%s); rank 0 serves the app", world_size, device)
    return ParallelModelManager(device=device, kind="ulysses", channel=channel, **manager_kwargs)
