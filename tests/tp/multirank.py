"""Run a function on W gloo ranks and bring each rank's result back to the test.

``run_ranks(fn, world, *args)`` starts W processes, joins them in a gloo process group over a
FileStore in a fresh temporary directory (no ports to collide), calls
``fn(rank, world, *args, **kwargs)`` in each, and returns the W return values (any
``torch.save``-able structure) in rank order, so the parent can compare them bit for bit.

Failure never stalls CI: every rank runs under a wall-clock ``timeout`` (a hang in a
collective fails the test with the ranks still running named), a rank that raises fails the
test with its traceback (the others get a short grace, then are killed), and a rank that dies
without a word is reported with its exit code. With ``expect_errors=True`` an exception in a
rank is returned as a :class:`RankError` in that rank's slot instead, for tests of bad input.

How ranks start (:func:`start_method`): on a machine without CUDA they fork (0.1 s, unlike
spawn's 5 s). Where CUDA exists the parent may already have initialised it (a kernel test in
the same pytest process, or just ``torch.cuda.is_available()``), and a forked child that
touches CUDA then fails ("Cannot re-initialize CUDA in forked subprocess"); there ranks come
from a forkserver (a fresh interpreter, started once, with torch preloaded), so ``fn`` and
its arguments must be picklable: module-level functions, no lambdas or closures.
``TP_TEST_START_METHOD=fork|forkserver|spawn`` overrides the choice.

Ranks use one intra-op thread each: the machines have 2 cores shared by up to 4 ranks, and a
fixed thread count keeps CPU matmuls reproducible.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

GRACE_S = 3.0  # after one rank fails, how long the others get to report before being killed
START_METHODS = ("fork", "forkserver", "spawn")


def start_method() -> str:
    """``fork`` where no CUDA exists (fast), ``forkserver`` where it does (see the module doc)."""
    m = os.environ.get("TP_TEST_START_METHOD")
    if m:
        if m not in START_METHODS:
            raise ValueError(f"TP_TEST_START_METHOD={m!r}: expected one of {', '.join(START_METHODS)}")
        return m
    return "forkserver" if torch.cuda.is_available() else "fork"


def _context(method: str):
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed"])  # once per server: children start warm
    return ctx


@dataclass
class RankError:
    """An exception raised inside a rank (returned only with ``expect_errors=True``)."""

    rank: int
    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type}: {self.message}"


class MultiRankError(AssertionError):
    pass


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=False)


def _child(rank, world, store_dir, fn, args, kwargs, conn, done, timeout):
    try:
        torch.set_num_threads(1)
        if os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.FileStore(os.path.join(store_dir, "store"), world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=max(1.0, timeout))
        )
        res = fn(rank, world, *args, **kwargs)
        msg = ("ok", _dumps(res))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        msg = ("err", type(e).__name__, str(e), traceback.format_exc())
    try:
        conn.send(msg)
        conn.close()
        # Stay alive until every rank has reported: exiting early could reset sockets
        # that a slower peer is still reading its last message from.
        done.wait(timeout)
    finally:
        os._exit(0)


@contextlib.contextmanager
def _hidden_gpus(hide: bool):
    """``CUDA_VISIBLE_DEVICES=""`` in this process while a spawned child copies its environment."""
    if not hide:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def run_ranks(fn, world: int, *args, timeout: float = 60.0, expect_errors: bool = False,
              method: str | None = None, cpu_only: bool = False, **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` gloo ranks; return the results in rank order.
    ``method``: how ranks start (default :func:`start_method`). ``cpu_only``: the ranks see no GPU
    (``CUDA_VISIBLE_DEVICES=""``), for code that moves a model to whatever accelerator it finds
    (transformers' TP binds rank r to GPU ``LOCAL_RANK``); they start by spawn, so the setting is in
    their environment before anything asks CUDA."""
    if cpu_only:
        method = "spawn"
    method = method or start_method()
    if method != "fork" and getattr(fn, "__qualname__", "").count("<"):
        raise TypeError(f"run_ranks: {fn.__qualname__} is a lambda or a local function; ranks started by "
                        f"{method} need a module-level function (see tests/tp/multirank.py)")
    ctx = _context(method)
    done = ctx.Event()
    procs, conns = [], {}
    with tempfile.TemporaryDirectory(prefix="tp-ranks-") as store_dir:
        try:
            for r in range(world):
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_child, args=(r, world, store_dir, fn, args, kwargs, send, done, timeout), daemon=True
                )
                with _hidden_gpus(cpu_only):
                    p.start()
                send.close()
                procs.append(p)
                conns[recv] = r
            results: dict[int, object] = {}
            errors: dict[int, RankError] = {}
            deadline = time.monotonic() + timeout
            while conns:
                now = time.monotonic()
                if now >= deadline:
                    break
                ready = mpc.wait(list(conns), timeout=deadline - now)
                for c in ready:
                    r = conns.pop(c)
                    try:
                        msg = c.recv()
                    except EOFError:
                        procs[r].join(1.0)
                        errors[r] = RankError(r, "RankDied", f"exited with code {procs[r].exitcode} without a result", "")
                        continue
                    if msg[0] == "ok":
                        results[r] = _loads(msg[1])
                    else:
                        errors[r] = RankError(r, msg[1], msg[2], msg[3])
                if errors and not expect_errors:
                    deadline = min(deadline, time.monotonic() + GRACE_S)
            missing = sorted(conns.values())
            if missing and not (errors and not expect_errors):
                raise MultiRankError(
                    f"ranks {missing} of {world} did not finish within {timeout:.0f}s "
                    f"(a hang in a collective?); finished: {sorted(results)}; errors: "
                    + "; ".join(map(str, errors.values()))
                )
            if errors and not expect_errors:
                first = errors[min(errors)]
                raise MultiRankError(
                    "; ".join(map(str, errors.values()))
                    + (f" (ranks {missing} still running, killed)" if missing else "")
                    + f"\n--- traceback of rank {first.rank} ---\n{first.traceback}"
                )
            return [errors[r] if r in errors else results[r] for r in range(world)]
        finally:
            done.set()
            for p in procs:
                p.join(2.0)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(2.0)
