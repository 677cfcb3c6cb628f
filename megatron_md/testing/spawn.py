"""Run many named checks in one group of spawned gloo processes, from pytest or plain Python.

Starting a rank costs seconds (``import torch``; ~8 s more for megatron-core on a small
CPU), while a distributed check itself takes milliseconds. So one group of processes runs a
*rank function* that executes many named sub-checks; the parent collects, per check and per
rank, ``"ok"`` or the traceback, and pytest tests each assert one check::

    # tests/distributed/test_example.py
    from megatron_md.testing.spawn import group_fixture

    def _checks(ctx):                       # module level: it is imported by the children
        import torch, torch.distributed as dist
        with ctx.check("all_reduce_sum"):
            t = torch.ones(2) * (ctx.rank + 1)
            dist.all_reduce(t)
            assert t.tolist() == [3.0, 3.0]
        with ctx.check("broadcast"):
            ...
        ctx.record("note", 42)              # values come back in GroupResult.values

    group = group_fixture(2, _checks, timeout=60)   # module-scoped fixture named "group"

    def test_all_reduce_sum(group):
        group.assert_ok("all_reduce_sum")

or directly: ``result = run_group(2, _checks); result.raise_for_failures()``.

How it works:

* Processes: by default the ranks are forked from a multiprocessing *fork server* that
  imported torch (and megatron-core, for megatron groups) once per parent process, so only
  the first group pays the import; ``start_method="spawn"`` gives fresh interpreters.
* Rendezvous and reporting: the parent hosts a ``TCPStore`` on 127.0.0.1 bound to a
  kernel-chosen port (no probe-then-bind race). It serves the gloo rendezvous and carries
  each rank's progress (start/end of every check, recorded values, errors) to the parent,
  which therefore knows what each rank was doing even if it must kill it.
* Isolation between checks: after each check the ranks meet at a store barrier, so the
  collectives of one check never pair with those of the next. A failed check does not stop
  the following ones. A rank whose check failed while a peer is still blocked in a
  collective of that check aborts after ``stuck_grace`` seconds, which turns the peer's hang
  into a connection error; a rank that dies or fails outside a check stops the group.
* Hangs: a group ``timeout`` (and optional per-check timeouts) kill the ranks; before that
  the busy ranks' Python stacks are dumped with ``faulthandler`` into the report, which thus
  names the rank, the check and the line. Each rank's stdout/stderr go to a log whose tail
  is attached to failures (``GroupResult.logs`` has it all).

With ``megatron=True`` each rank imports megatron-core, applies
:mod:`megatron_md.megatron.cpu_compat` and, given ``parallel={"tp": 2, ...}``, calls
``parallel_state.initialize_model_parallel``; :meth:`RankContext.init_model_parallel`
re-initialises with other sizes between checks. Without it only torch is imported (fast).

Requirements: the rank function and its arguments must be importable/picklable by the
children (a module-level function, or ``"package.module:function"``), and all ranks must run
the same sequence of checks (a check may do nothing on some ranks). Test modules run in the
children without pytest's assertion rewriting: give ``assert`` a message. POSIX only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import importlib
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "OK",
    "GroupError",
    "GroupResult",
    "RankContext",
    "SkipCheck",
    "group_fixture",
    "run_group",
]

OK = "ok"
"""Status of a passed check; a skipped check's status starts with ``"skipped: "``."""

_SKIPPED = "skipped: "
_HOST = "127.0.0.1"
_ABORT_KEY = "group/abort"


class GroupError(AssertionError):
    """A spawned group, or one of its checks, failed; the message carries the tracebacks."""


class SkipCheck(Exception):
    """Raise inside ``ctx.check(...)`` to mark that check as skipped (pytest skips the test)."""


# ================================================================================== child
class RankContext:
    """What the rank function receives: rank info, ``check()``, ``record()`` and helpers."""

    def __init__(self, rank: int, world_size: int, store: Any, tmpdir: str, options: dict):
        self.rank = rank
        self.world_size = world_size
        self.tmpdir = tmpdir
        """A directory shared by all ranks of this group, removed when the group ends."""
        self._store = store
        self._options = options
        self._nmsg = 0
        self._nsync = 0
        self._names: set[str] = set()
        self._in_check: str | None = None

    # ------------------------------------------------------------------- reporting
    def _send(self, kind: str, *payload: Any) -> None:
        self._store.set(f"r{self.rank}/m{self._nmsg}", pickle.dumps((kind, *payload)))
        self._nmsg += 1
        self._store.add(f"r{self.rank}/n", 1)

    def record(self, key: str, value: Any) -> None:
        """Send a picklable value to the parent (``GroupResult.values[rank][key]``)."""
        self._send("record", key, value)

    # ---------------------------------------------------------------------- checks
    @contextlib.contextmanager
    def check(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Run the ``with`` body as the check ``name``; an exception fails only this check.

        Every rank must enter the same checks in the same order: at the end of each check the
        ranks synchronise (over the store, not over gloo) before starting the next one.
        ``timeout`` (seconds): the parent treats this rank as hung if the body takes longer,
        dumps its stacks and ends the group (the group-wide ``timeout`` still applies).
        """
        if self._in_check is not None:
            raise RuntimeError(f"check {name!r} nested inside check {self._in_check!r}")
        if name in self._names:
            raise ValueError(f"duplicate check name {name!r}")
        self._names.add(name)
        self._in_check = name
        self._send("start", name, timeout)
        t0 = time.perf_counter()
        status = OK
        try:
            yield
        except SkipCheck as e:
            status = _SKIPPED + str(e)
        except Exception:  # noqa: BLE001 - reported to the parent
            status = traceback.format_exc()
        finally:
            self._in_check = None
        self._send("end", name, status, time.perf_counter() - t0)
        failed = status != OK and not status.startswith(_SKIPPED)
        self._barrier(f"check:{name}", failed=failed)

    def run(self, name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``with self.check(name): return fn(*args, **kwargs)`` (None if the check failed)."""
        with self.check(name):
            return fn(*args, **kwargs)
        return None

    def _barrier(self, tag: str, failed: bool = False) -> None:
        """Store-based barrier; a failed rank whose peers do not arrive aborts the group."""
        key = f"sync{self._nsync}"
        self._nsync += 1
        if self._store.add(key, 1) == self.world_size:
            self._store.set(key + "/all", b"1")
        t0, delay = time.monotonic(), 0.001
        grace = self._options["stuck_grace"]
        while not self._store.check([key + "/all"]):
            if self._store.check([_ABORT_KEY]):  # set by the parent when a rank has failed
                self._send("stopped", f"rank {self.rank} stopped at {tag}: "
                           + self._store.get(_ABORT_KEY).decode())
                _hard_exit(0)
            if failed and time.monotonic() - t0 > grace:
                self._send(
                    "abort",
                    f"rank {self.rank} failed in {tag} and its peers did not finish it within "
                    f"{grace:g}s (probably blocked in a collective); aborting the group",
                )
                _hard_exit(3)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    # ------------------------------------------------------------------- megatron
    def init_model_parallel(self, tp: int = 1, pp: int = 1, ep: int = 1, *, seed: int | None = 1234,
                            **kwargs: Any) -> None:
        """(Re)initialise megatron's ``parallel_state`` and seed its RNG tracker.

        Warning: ``destroy_model_parallel`` does not destroy the gloo groups it created, and each
        keeps its threads; call this a few times per group (group checks by layout), not once
        per check — dozens of re-initialisations leave thousands of threads behind.

        ``tp``/``pp``/``ep`` are the tensor/pipeline/expert model-parallel sizes; other keyword
        arguments go to ``initialize_model_parallel`` (e.g. ``expert_tensor_parallel_size``,
        ``virtual_pipeline_model_parallel_size``). With ``seed`` set, calls
        ``torch.manual_seed(seed)`` and ``model_parallel_cuda_manual_seed(seed)``.
        """
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            **kwargs,
        )
        if seed is not None:
            torch.manual_seed(seed)
            model_parallel_cuda_manual_seed(seed)


def _hard_exit(code: int) -> None:
    """Stop our multiprocessing children (e.g. dist_checkpointing's Manager), then exit now.

    ``os._exit`` skips interpreter shutdown, which could block on a peer that is gone.
    """
    import multiprocessing

    with contextlib.suppress(Exception):
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join(timeout=1)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _resolve(ref: str) -> Callable:
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _watch_parent(parent_pid: int) -> None:
    """Exit if the parent dies (e.g. pytest was killed): never leave orphaned ranks behind."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)  # not getppid(): under forkserver our parent is the server
        except ProcessLookupError:
            _hard_exit(4)
        except PermissionError:
            pass


def _child_main(rank: int, spec: dict) -> None:
    """Entry point of a spawned rank."""
    import torch
    import torch.distributed as dist

    try:
        os.setpgid(0, 0)  # own process group: the parent can kill us with our descendants
        own_group = True
    except OSError:
        own_group = False
    log = open(os.path.join(spec["tmpdir"], f"rank{rank}.log"), "ab", buffering=0)
    if spec["capture_output"]:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    threading.Thread(target=_watch_parent, args=(spec["parent_pid"],), daemon=True).start()
    sys.path[:] = spec["sys_path"]  # resolve the rank function the way the parent would
    with contextlib.suppress(OSError):
        os.chdir(spec["cwd"])

    ws = spec["world_size"]
    os.environ.update(
        MASTER_ADDR=_HOST, MASTER_PORT=str(spec["port"]), RANK=str(rank), WORLD_SIZE=str(ws),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ws), **spec["env"],
    )
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(spec["threads"])
    store = dist.TCPStore(_HOST, spec["port"], None, False,
                          timeout=datetime.timedelta(seconds=spec["timeout"]))
    ctx = RankContext(rank, ws, store, spec["tmpdir"], spec)
    if own_group:
        ctx._send("pgid", os.getpgid(0))
    t0 = time.perf_counter()
    try:
        megatron = spec["megatron"]
        if megatron:
            import megatron.core  # noqa: F401

            if spec["cpu_compat"] is not False:
                from megatron_md.megatron import cpu_compat

                ctx.record("cpu_compat", cpu_compat.apply(**(spec["cpu_compat"] or {})))
                ctx.record("cpu_compat_skipped", cpu_compat.skipped())
        fn = _resolve(spec["fn"])
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=ws,
            timeout=datetime.timedelta(seconds=spec["collective_timeout"]),
        )
        if megatron and spec["parallel"] is not None:
            ctx.init_model_parallel(**spec["parallel"])
        ctx._send("ready", time.perf_counter() - t0)
        ret = fn(ctx, *spec["args"], **spec["kwargs"])
        ctx._send("return", ret)
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        with contextlib.suppress(Exception):
            ctx._send("error", traceback.format_exc())
        _hard_exit(1)  # closing our sockets makes peers' collectives fail fast
    try:
        ctx._barrier("the end of the rank function")
        if megatron:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        ctx._send("error", "tear-down failed:\n" + traceback.format_exc())
        _hard_exit(1)
    ctx._send("done")
    _hard_exit(0)


# ================================================================================= parent
@dataclasses.dataclass
class GroupResult:
    """What a spawned group reported.

    ``ranks[r]`` maps check name -> ``"ok"``, ``"skipped: <reason>"``, the traceback, or a
    ``"hung: ..."`` / ``"not finished: ..."`` text; ``errors[r]`` holds failures outside any
    check (start-up, the rank function's own code, a crash, a hang, an abort).
    """

    world_size: int
    ranks: list[dict[str, str]]
    errors: dict[int, str]
    values: list[dict[str, Any]]
    returns: list[Any]
    durations: list[dict[str, float]]
    startup_s: list[float | None]
    wall_s: float
    logs: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed_checks()

    def check_names(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.ranks:
            names.update(dict.fromkeys(r))
        return list(names)

    def failed_checks(self) -> list[str]:
        return [n for n in self.check_names() if self._failures(n)]

    def _failures(self, name: str) -> dict[int, str]:
        out = {}
        for rank, statuses in enumerate(self.ranks):
            status = statuses.get(name)
            if status is not None and status != OK and not status.startswith(_SKIPPED):
                out[rank] = status
        return out

    def status(self, name: str) -> dict[int, str | None]:
        """Per-rank status of check ``name`` (None where the rank never reached it)."""
        return {r: statuses.get(name) for r, statuses in enumerate(self.ranks)}

    def assert_ok(self, name: str) -> None:
        """Raise :class:`GroupError` unless every rank passed check ``name``.

        Under pytest, a check skipped on every rank (``SkipCheck``) skips the calling test.
        """
        statuses = self.status(name)
        failures = self._failures(name)
        missing = [r for r, s in statuses.items() if s is None]
        if failures or missing:
            parts = [f"check {name!r} failed"]
            for rank, status in failures.items():
                parts.append(f"--- rank {rank}:\n{status.rstrip()}")
            if missing:
                parts.append(f"--- not reported by rank(s) {missing}; checks seen: "
                             f"{self.check_names()}")
            parts.extend(self._error_report())
            raise GroupError("\n".join(parts))
        if all(s.startswith(_SKIPPED) for s in statuses.values()):
            reason = statuses[0][len(_SKIPPED):]
            if "pytest" in sys.modules:
                import pytest

                pytest.skip(reason)

    def raise_for_failures(self) -> None:
        """Raise :class:`GroupError` describing every failed check and rank error."""
        if self.ok:
            return
        parts = [f"spawned group of {self.world_size} failed"]
        for name in self.failed_checks():
            for rank, status in self._failures(name).items():
                parts.append(f"--- check {name!r}, rank {rank}:\n{status.rstrip()}")
        parts.extend(self._error_report())
        raise GroupError("\n".join(parts))

    def _error_report(self) -> list[str]:
        parts = []
        for rank, err in sorted(self.errors.items()):
            parts.append(f"--- rank {rank} error:\n{err.rstrip()}")
            tail = _tail(self.logs[rank], 30)
            if tail:
                parts.append(f"--- rank {rank} output (last lines):\n{tail}")
        return parts

    def summary(self) -> str:
        """One line per check: name, status on each rank, max duration."""
        lines = [f"group of {self.world_size}: wall {self.wall_s:.1f}s, "
                 f"startup {[None if s is None else round(s, 1) for s in self.startup_s]}"]
        for name in self.check_names():
            st = ["-" if s is None else ("ok" if s == OK else s.split("\n")[0][:20])
                  for s in self.status(name).values()]
            dur = max((d.get(name, 0.0) for d in self.durations), default=0.0)
            lines.append(f"  {name:40s} {' | '.join(st)}  {dur:.2f}s")
        for r, e in sorted(self.errors.items()):
            line = _tail(e, 1) if e.startswith("Traceback") else e.splitlines()[0]
            lines.append(f"  rank {r}: {line[:200]}")
        return "\n".join(lines)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _fn_ref(fn: Callable | str) -> str:
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"fn={fn!r}: expected 'package.module:function'")
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(
            f"fn={fn!r}: the children import the rank function by name, so it must be defined "
            "at module level (not a lambda or a nested function); or pass 'module:function'"
        )
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
    return f"{module}:{qualname}"


def _kill_tree(proc: Any, pgid: int | None) -> None:
    """SIGKILL the rank and, if it leads its own process group, everything left in it."""
    if proc.is_alive():
        with contextlib.suppress(Exception):
            proc.kill()
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class _RankState:
    def __init__(self) -> None:
        self.nread = 0
        self.current: str | None = None
        self.deadline: float | None = None  # of the current check, parent clock
        self.done = False
        self.failed = False  # error / abort / crash reported
        self.pgid: int | None = None  # the rank's own process group


def run_group(
    world_size: int,
    fn: Callable | str,
    *args: Any,
    timeout: float = 120.0,
    megatron: bool = False,
    cpu_compat: bool | Mapping[str, Any] | None = None,
    parallel: Mapping[str, Any] | None = None,
    collective_timeout: float | None = None,
    stuck_grace: float = 10.0,
    threads: int = 1,
    env: Mapping[str, str] | None = None,
    capture_output: bool = True,
    raise_on_failure: bool = True,
    start_method: str = "forkserver",
    preload: Sequence[str] = (),
    fn_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> GroupResult:
    """Spawn ``world_size`` gloo ranks on 127.0.0.1 and run ``fn(ctx, *args, **kwargs)`` on each.

    Args:
        world_size: number of ranks.
        fn: the rank function (module level) or ``"package.module:function"``; it receives a
            :class:`RankContext` and runs checks with ``ctx.check(name)``.
        timeout: hard wall-clock limit in seconds for the group, counted from the start of its
            ranks (their imports and initialisation included; not the fork server's one-time
            preload, during which starting a process blocks). On expiry every rank is killed
            and the ranks still busy are reported as hung, with the check they were in and
            their Python stacks.
        megatron: import megatron-core in the ranks and apply ``cpu_compat``.
        cpu_compat: with ``megatron``: False to not apply it, or a dict of ``apply()``
            arguments (``skip``, ``only``). Default: apply all patches.
        parallel: with ``megatron``: keyword arguments of
            :meth:`RankContext.init_model_parallel` (``tp``, ``pp``, ``ep``, ``seed``, ...),
            applied before ``fn`` runs. Default: not initialised.
        collective_timeout: gloo timeout in seconds (default: ``timeout``).
        stuck_grace: seconds a rank whose check failed waits for its peers to finish that
            check before aborting the group (peers blocked in a collective of that check).
        threads: ``torch.set_num_threads`` in each rank.
        env: extra environment variables for the ranks.
        capture_output: send each rank's stdout/stderr to a log (``GroupResult.logs``)
            instead of the parent's terminal.
        raise_on_failure: raise :class:`GroupError` if any check or rank failed; with False
            the caller inspects the returned :class:`GroupResult` (what pytest fixtures do).
        start_method: ``"forkserver"`` (default): ranks are forked from a server process that
            imported torch (and megatron-core, for ``megatron=True``) once per parent
            process, so later groups start in milliseconds instead of seconds; or
            ``"spawn"``: fresh interpreters.
        preload: extra modules for the fork server to import (forkserver only).
        fn_kwargs: keyword arguments of ``fn`` whose names collide with this function's.
        **kwargs: keyword arguments of ``fn``.
    """
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    if timeout <= 0:
        raise ValueError(f"timeout={timeout}: must be > 0")
    if parallel is not None and not megatron:
        raise ValueError("parallel=... needs megatron=True")
    t_start = time.monotonic()
    store = dist.TCPStore(_HOST, 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    tmpdir = tempfile.mkdtemp(prefix="megatron_md_group_")
    spec = dict(
        fn=_fn_ref(fn), args=args, kwargs={**(fn_kwargs or {}), **kwargs},
        world_size=world_size, port=store.port,
        tmpdir=tmpdir, megatron=megatron,
        cpu_compat=dict(cpu_compat) if isinstance(cpu_compat, Mapping) else cpu_compat,
        parallel=None if parallel is None else dict(parallel), timeout=timeout,
        collective_timeout=collective_timeout or timeout, stuck_grace=stuck_grace,
        threads=threads, env=dict(env or {}), capture_output=capture_output,
        parent_pid=os.getpid(), sys_path=list(sys.path), cwd=os.getcwd(),
    )
    ctx = _mp_context(start_method, [*_PRELOAD_TORCH, *(_PRELOAD_MEGATRON if megatron else ()),
                                     *preload])
    procs = []
    ranks: list[dict[str, str]] = [{} for _ in range(world_size)]
    errors: dict[int, str] = {}
    values: list[dict[str, Any]] = [{} for _ in range(world_size)]
    returns: list[Any] = [None] * world_size
    durations: list[dict[str, float]] = [{} for _ in range(world_size)]
    startup: list[float | None] = [None] * world_size
    states = [_RankState() for _ in range(world_size)]

    def poll() -> None:
        for rank, st in enumerate(states):
            n = store.add(f"r{rank}/n", 0)
            while st.nread < n:
                kind, *payload = pickle.loads(store.get(f"r{rank}/m{st.nread}"))
                st.nread += 1
                if kind == "start":
                    st.current = payload[0]
                    st.deadline = None if payload[1] is None else time.monotonic() + payload[1]
                elif kind == "end":
                    name, status, dt = payload
                    ranks[rank][name], durations[rank][name] = status, dt
                    st.current = st.deadline = None
                elif kind == "record":
                    values[rank][payload[0]] = payload[1]
                elif kind == "ready":
                    startup[rank] = payload[0]
                elif kind == "return":
                    returns[rank] = payload[0]
                elif kind in ("error", "abort", "stopped"):
                    errors[rank] = payload[0]
                    st.failed = True
                elif kind == "done":
                    st.done = True
                elif kind == "pgid":
                    st.pgid = payload[0]

    def log_text(rank: int) -> str:
        with contextlib.suppress(OSError):
            with open(os.path.join(tmpdir, f"rank{rank}.log"), "rb") as f:
                return f.read()[-200_000:].decode("utf-8", "replace")
        return ""

    def note_silent_deaths() -> None:
        for r, p in enumerate(procs):
            if not p.is_alive() and not states[r].done and not states[r].failed:
                poll()  # its last messages may have arrived after the previous poll
                if not states[r].done and not states[r].failed:
                    errors[r] = (
                        f"rank {r} exited with code {p.exitcode} without reporting (it failed "
                        "before the harness took over its output, e.g. while multiprocessing "
                        "unpickled its arguments or re-imported the parent's __main__ module; "
                        "see the parent's stderr)"
                    )
                    states[r].failed = True

    try:
        for rank in range(world_size):
            p = ctx.Process(target=_child_main, args=(rank, spec), name=f"rank{rank}")
            p.start()  # forkserver: blocks until the server has imported its preload
            procs.append(p)
        t_ranks = time.monotonic()
        first_failure: float | None = None
        while True:
            poll()
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            note_silent_deaths()
            if not alive:
                break
            now = time.monotonic()
            if first_failure is None and any(st.failed for st in states):
                first_failure = now
                failed = [r for r, st in enumerate(states) if st.failed]
                # Ranks waiting between checks stop now; the grace below covers the others.
                store.set(_ABORT_KEY, f"rank(s) {failed} failed outside a check or died")
            if first_failure is not None and now - first_failure > stuck_grace:
                _report_hung(procs, states, alive, ranks, errors, log_text,
                             f"after another rank failed (waited {stuck_grace:g}s)")
                break
            if now - t_ranks > timeout:
                _report_hung(procs, states, alive, ranks, errors, log_text,
                             f"within the group timeout of {timeout:g}s")
                break
            late = [r for r in alive if states[r].deadline is not None and now > states[r].deadline]
            if late:
                _report_hung(procs, states, alive, ranks, errors, log_text,
                             "within its check timeout", late=late)
                break
            time.sleep(0.05)
        for p in procs:
            p.join(timeout=5)
        poll()
        note_silent_deaths()
    finally:
        for r, p in enumerate(procs):  # live ranks, and what finished ranks left behind
            _kill_tree(p, states[r].pgid)
        for p in procs:
            p.join(timeout=5)
        logs = [log_text(r) for r in range(world_size)]
        shutil.rmtree(tmpdir, ignore_errors=True)
        del store
    for r, st in enumerate(states):
        if st.current is not None and st.current not in ranks[r]:
            ranks[r][st.current] = f"not finished: rank {r} stopped inside this check\n" + (
                errors.get(r, ""))
    result = GroupResult(world_size, ranks, errors, values, returns, durations, startup,
                         time.monotonic() - t_start, logs)
    if raise_on_failure:
        result.raise_for_failures()
    return result


_PRELOAD_TORCH = ("torch", "torch.distributed", __name__)
_PRELOAD_MEGATRON = (
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron_md.megatron.cpu_compat",
)
_server_preload: list[str] = []  # what the running fork server imported


def _mp_context(start_method: str, preload: list[str]) -> Any:
    """The multiprocessing context; for forkserver, a server that preloaded ``preload``.

    The fork server is shared by all groups of this process. If a group needs modules the
    running server lacks (a megatron group after plain ones), the server is restarted with
    the union, so each module set is imported once per parent process, not once per rank.
    """
    import multiprocessing as mp

    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method={start_method!r}: expected 'forkserver' or 'spawn'")
    if start_method == "spawn" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    import multiprocessing.forkserver as forkserver

    ctx = mp.get_context("forkserver")
    missing = [m for m in preload if m not in _server_preload]
    if missing:
        server = forkserver._forkserver
        running = getattr(server, "_forkserver_pid", None) is not None
        if running and hasattr(server, "_stop"):
            server._stop()
            running = False
        if not running:
            _server_preload[:] = [*_server_preload, *missing]
            ctx.set_forkserver_preload(list(_server_preload))
    return ctx


def _report_hung(procs, states, alive, ranks, errors, log_text, why: str, late=None) -> None:
    """Dump the stacks of the still-running ranks, record them as hung, and kill them.

    ``late``: the ranks that overran a check timeout; the other live ranks are then reported
    as stopped because of them rather than as hung themselves.
    """
    late = alive if late is None else late
    before = {r: len(log_text(r)) for r in alive}
    for r in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5)
    for r in alive:
        stacks = log_text(r)[before[r]:].strip()
        current = states[r].current
        outside = ("outside any check (start-up, the rank function's own code, or waiting for "
                   "the other ranks between checks)")
        if r in late:
            where = f"check {current!r}" if current else f"its work {outside}"
            msg = f"hung: rank {r} did not finish {where} {why}; killed"
        else:
            where = f"in check {current!r}" if current else outside
            msg = f"not finished: rank {r} was killed {where} because rank(s) {late} hung"
        if stacks:
            msg += f"\nPython stacks at the time:\n{stacks}"
        if states[r].current:
            ranks[r][states[r].current] = msg
        if r not in errors:
            errors[r] = msg
        states[r].failed = True
        _kill_tree(procs[r], states[r].pgid)


def group_fixture(world_size: int, fn: Callable | str, *args: Any, scope: str = "module",
                  **options: Any) -> Any:
    """A pytest fixture that runs :func:`run_group` once per ``scope`` and returns the result.

    Assign it to a module (or conftest) attribute; the attribute name is the fixture name::

        dist_group = group_fixture(2, _checks, timeout=60)

        def test_something(dist_group):
            dist_group.assert_ok("something")

    ``options`` are :func:`run_group` keyword arguments (including ``fn``'s own).
    The group runs once, when the first test of the scope requests the fixture; every test
    then reports its own check, so one failure does not hide the others.
    """
    import pytest

    options.setdefault("raise_on_failure", False)

    @pytest.fixture(scope=scope)
    def _group() -> GroupResult:
        return run_group(world_size, fn, *args, **options)

    return _group
