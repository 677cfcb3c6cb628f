"""Resumable grids of short driver runs: learning rate × train iterations D × width N × optimizer × seed.

A sweep directory holds one folder per run, named by its grid point
(``runs/adam-N64-D200-lr0.003-s1/``), with ``command.json`` (the exact command, grid point
and git commit), the driver's log (``--log-jsonl``: train/valid/optimizer-stats events; the
driver appends to ``log.jsonl`` while it runs, and when the run ends the sweep replaces it by
``log.jsonl.gz``, the same bytes gzip-compressed, about 4× smaller), its ``stdout.txt``, and —
written atomically when the run ends, after the compressed log — ``result.json`` (``status``
``"ok"`` or ``"failed"`` with the return code and the tail of its output). Readers
(:func:`read_log`, :func:`log_path`) take either form, so older sweeps with plain logs read as
before. A run
with a ``result.json`` is never run again (``retry_failed`` reruns failed ones); a folder
without one (an interrupted run) is cleared and rerun. After every finished run the tables
``results.jsonl`` and ``results.csv`` are rewritten from all ``result.json`` files: final
validation and train loss, mean effective LR over the last 10% of iterations, tokens, wall
time and the command. Extending a grid (more LRs, another D) reuses every finished run.

The driver runs as ``examples/pretrain_gpt.py`` (one process) or under ``torchrun`` with
``nproc`` ranks; ``jobs`` runs go at once (each gets ``cores // jobs`` threads).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
RESULT_COLUMNS = ("run_id", "optimizer", "hidden_size", "train_iters", "lr", "seed", "status", "final_val_loss",
                  "final_train_loss", "eta_eff_last10", "tokens", "wall_s", "skipped_steps", "error", "command")
#: the driver, relative to the repository (runs have cwd = the repository: commands stay portable)
SCRIPT = "examples/pretrain_gpt.py"
#: fraction of the run whose telemetry records give ``eta_eff_last10``
LAST_FRACTION = 0.1
#: the driver's log in a run folder, as it writes it, and as a finished run keeps it
LOG = "log.jsonl"
LOG_GZ = LOG + ".gz"


@dataclass(frozen=True)
class RunSpec:
    """One grid point."""

    optimizer: str
    lr: float
    train_iters: int
    hidden_size: int
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.optimizer}-N{self.hidden_size}-D{self.train_iters}-lr{self.lr:.4g}-s{self.seed}"


@dataclass
class SweepConfig:
    """The grid and how to run it (a TOML file's ``[sweep]``, ``[lrs]`` and
    ``[optimizer_args]`` tables, or flags of ``tools/sweep.py``)."""

    optimizers: list[str]
    lrs: dict[str, list[float]]
    train_iters: list[int]
    hidden_sizes: list[int]
    seeds: list[int] = field(default_factory=lambda: [1])
    #: driver flags shared by every run (model depth, heads, batch, eval, ...)
    base_args: list[str] = field(default_factory=list)
    #: extra driver flags per optimizer (weight decay, warmup, partner LR, ...)
    optimizer_args: dict[str, list[str]] = field(default_factory=dict)
    nproc: int = 1
    jobs: int = 1
    #: telemetry interval (default: train_iters // 40, at least 1)
    stats_interval: Optional[int] = None
    #: "corpus" (tools/preprocess_data.py's default real-text dataset), "mock", or a --data-path prefix
    data: str = "corpus"
    #: run the driver inside this process, one run after another (nproc 1, jobs 1): megatron-core is
    #: imported once instead of once per run; the recorded command is the equivalent command line
    in_process: bool = False
    #: torch threads per run (default: cores // jobs); 1 leaves a core free on a 2-core machine
    threads: Optional[int] = None

    def validate(self) -> None:
        if not self.optimizers:
            raise ValueError("sweep: no optimizers (--optimizers / [sweep] optimizers)")
        missing = [o for o in self.optimizers if not self.lrs.get(o)]
        if missing:
            raise ValueError(f"sweep: no learning rates for {missing} (--lrs 'opt=lr1,lr2;...' / [lrs] table)")
        for name, vals in (("train_iters", self.train_iters), ("hidden_sizes", self.hidden_sizes),
                           ("seeds", self.seeds)):
            if not vals:
                raise ValueError(f"sweep: {name} is empty")
        if any(lr <= 0 for v in self.lrs.values() for lr in v):
            raise ValueError("sweep: learning rates must be > 0")
        if self.jobs < 1 or self.nproc < 1:
            raise ValueError("sweep: jobs and nproc must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("sweep: threads must be >= 1")
        if self.in_process and (self.jobs != 1 or self.nproc != 1):
            raise ValueError("sweep: in_process runs need jobs = 1 and nproc = 1")
        for flag in ("--lr", "--train-iters", "--hidden-size", "--seed", "--optimizer", "--log-jsonl"):
            if flag in self.base_args or any(flag in a for a in self.optimizer_args.values()):
                raise ValueError(f"sweep: {flag} is set per run by the sweep; remove it from the base/optimizer args")

    def grid(self) -> list[RunSpec]:
        # shortest runs and narrowest models first, every optimizer at each (N, D): a sweep cut
        # short still has complete points to fit
        return [RunSpec(o, float(lr), int(d), int(n), int(s)) for n in sorted(self.hidden_sizes)
                for d in sorted(self.train_iters) for s in self.seeds for o in self.optimizers for lr in self.lrs[o]]


def load_config(path: str) -> dict:
    """The keyword arguments of :class:`SweepConfig` from a TOML file."""
    import tomllib
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    out = dict(doc.get("sweep", {}))
    if "lrs" in doc:
        out["lrs"] = {k: [float(x) for x in v] for k, v in doc["lrs"].items()}
    if "optimizer_args" in doc:
        out["optimizer_args"] = {k: shlex.split(v) if isinstance(v, str) else list(v)
                                 for k, v in doc["optimizer_args"].items()}
    if isinstance(out.get("base_args"), str):
        out["base_args"] = shlex.split(out["base_args"])
    return out


# ----------------------------------------------------------------------------- one run
def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return None


def data_flags(cfg: SweepConfig) -> list[str]:
    if cfg.data == "mock":
        return ["--mock-data"]
    if cfg.data == "corpus":
        sys.path.insert(0, str(REPO / "tools"))
        import preprocess_data  # tools/preprocess_data.py: cached after the first call
        return ["--data-path", _rel(Path(preprocess_data.preprocess()["prefix"]))]
    return ["--data-path", cfg.data]


def _rel(path: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def driver_command(cfg: SweepConfig, spec: RunSpec, run_dir: Path, data: Sequence[str]) -> list[str]:
    interval = cfg.stats_interval or max(1, spec.train_iters // 40)
    flags = [*cfg.base_args, *data, *cfg.optimizer_args.get(spec.optimizer, []),
             "--optimizer", spec.optimizer, "--lr", repr(spec.lr), "--train-iters", str(spec.train_iters),
             "--hidden-size", str(spec.hidden_size), "--seed", str(spec.seed),
             "--log-optimizer-stats-interval", str(interval), "--log-jsonl", _rel(run_dir / LOG)]
    script = SCRIPT
    if cfg.nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg.nproc),
            script, *flags]


def log_path(run_dir: Path) -> Path:
    """The log of a run folder: ``log.jsonl.gz`` when there is one (a finished run), else
    ``log.jsonl`` (a running or killed run, or a sweep written before logs were compressed)."""
    gz = Path(run_dir) / LOG_GZ
    return gz if gz.exists() else Path(run_dir) / LOG


def read_log(path: Path) -> list[dict]:
    """Events of a ``--log-jsonl`` file, plain or gzip-compressed (a name ending in ``.gz``); a
    plain path that does not exist is read from its ``.gz`` beside it when that exists. A torn
    last line of a killed run is ignored; no file gives ``[]``; a damaged ``.gz`` raises
    ``ValueError`` naming the file."""
    path = Path(path)
    if not path.exists() and path.suffix != ".gz" and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    if not path.exists():
        return []
    if path.suffix == ".gz":
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a complete gzip-compressed log ({exc})") from exc
    else:
        text = path.read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def compress_log(path: Path) -> Path:
    """Replace the plain log ``path`` by ``path.gz`` and return that.

    The ``.gz`` holds exactly the plain file's bytes (checked by decompressing before the plain
    file is removed) and is deterministic (no file name or time in its header: the same log
    always compresses to the same bytes); it appears complete or not at all (written beside,
    fsynced, renamed), and the plain file is removed only after that."""
    path = Path(path)
    raw = path.read_bytes()
    gz = path.with_name(path.name + ".gz")
    tmp = gz.with_name(gz.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    data = gzip.compress(raw, compresslevel=9, mtime=0)
    if hashlib.sha256(gzip.decompress(data)).digest() != hashlib.sha256(raw).digest():
        raise RuntimeError(f"{path}: gzip round trip changed the log")  # never expected; keep the plain file
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, gz)
    path.unlink()
    return gz


def compress_logs(root: Path) -> list[Path]:
    """Compress the plain log of every finished run (one with a ``result.json``) under
    ``root/runs``; running or interrupted runs are left alone. Returns the ``.gz`` files written."""
    return [compress_log(p / LOG) for p in sorted((Path(root) / "runs").glob("*/"))
            if (p / "result.json").exists() and (p / LOG).exists()]


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def eta_eff_last(events: list[dict], train_iters: int, fraction: float = LAST_FRACTION) -> tuple[Optional[float], dict]:
    """Mean overall η_eff (and per layer type) of the telemetry records in the last ``fraction``
    of the run (at least the last record)."""
    recs = [e for e in events if e.get("event") == "optimizer_stats"]
    if not recs:
        return None, {}
    tail = [e for e in recs if e["iteration"] > (1 - fraction) * train_iters] or recs[-1:]
    mean = _mean
    by_type: dict[str, list] = {}
    for e in tail:
        for t, d in e["by_type"].items():
            if "eta_eff" in d:
                by_type.setdefault(t, []).append(d["eta_eff"])
    return mean([e["overall"]["eta_eff"] for e in tail]), {t: mean(v) for t, v in sorted(by_type.items())}


def _tokens(cmd_flags: Sequence[str], nproc: int) -> Optional[int]:
    from ..training.arguments import build_parser
    try:
        a, _ = build_parser().parse_known_args(list(cmd_flags))
    except Exception:  # noqa: BLE001 - the driver reports bad flags itself
        return None
    if a.micro_batch_size is None or a.seq_length is None or a.train_iters is None:
        return None
    dp = max(1, nproc // (a.tensor_model_parallel_size * a.pipeline_model_parallel_size))
    gbs = a.global_batch_size or a.micro_batch_size * dp
    return a.train_iters * gbs * a.seq_length


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True))
    os.replace(tmp, path)


def _run_in_process(flags: list[str], out, threads: int) -> int:
    import contextlib
    import traceback

    import torch

    from ..training.pretrain import main as driver_main
    torch.set_num_threads(threads)
    cwd = os.getcwd()
    os.chdir(REPO)  # relative paths in the command resolve as they would for the command line
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                return int(driver_main(flags) or 0)
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
                traceback.print_exc(file=out)
                return 1
    finally:
        os.chdir(cwd)


def run_one(cfg: SweepConfig, spec: RunSpec, root: Path, data: Sequence[str], threads: int) -> dict:
    run_dir = root / "runs" / spec.run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it over
    run_dir.mkdir(parents=True)
    cmd = driver_command(cfg, spec, run_dir, data)
    flags = cmd[cmd.index(SCRIPT) + 1:]
    _atomic_json(run_dir / "command.json", {"command": cmd, "shell": shlex.join(cmd), "spec": asdict(spec),
                                            "commit": _git_commit(), "nproc": cfg.nproc})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(run_dir / "stdout.txt", "w", encoding="utf-8") as out:
        if cfg.in_process:
            rc = _run_in_process(flags, out, threads)
        else:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)).returncode
    wall = time.perf_counter() - t0
    events = read_log(run_dir / LOG)
    if (run_dir / LOG).exists():
        compress_log(run_dir / LOG)   # before result.json: a finished run's log is always the .gz
    summary = next((e for e in reversed(events) if e.get("event") == "summary"), None)
    result = {"run_id": spec.run_id, **asdict(spec), "command": shlex.join(cmd), "wall_s": round(wall, 1),
              "tokens": _tokens(flags, cfg.nproc)}
    if rc == 0 and summary is not None and summary.get("final_val_loss") is not None:
        eta, by_type = eta_eff_last(events, spec.train_iters)
        result.update(status="ok", final_val_loss=summary["final_val_loss"],
                      final_train_loss=summary["final_train_loss"], skipped_steps=summary["skipped_steps"],
                      eta_eff_last10=eta, eta_eff_last10_by_type=by_type,
                      eta_eff_mean=_mean([e["overall"]["eta_eff"] for e in events if e.get("event") == "optimizer_stats"]),
                      val_loss_history=summary["val_loss_history"])
    else:
        tail = (run_dir / "stdout.txt").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        why = "no final validation loss in the run's log" if rc == 0 else f"exit code {rc}"
        result.update(status="failed", returncode=rc, error=why + ": " + " / ".join(t.strip() for t in tail[-3:]),
                      output_tail=tail)
    _atomic_json(run_dir / "result.json", result)
    return result


# ----------------------------------------------------------------------------- the sweep
def collect(root: Path) -> list[dict]:
    """Every finished run's ``result.json`` under ``root/runs`` (sorted by run id)."""
    out = []
    for p in sorted((Path(root) / "runs").glob("*/result.json")):
        try:
            out.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            continue
    return out


def write_tables(root: Path) -> list[dict]:
    rows = collect(root)
    root = Path(root)
    tmp = root / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
    os.replace(tmp, root / "results.jsonl")
    tmp = root / "results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in RESULT_COLUMNS})
    os.replace(tmp, root / "results.csv")
    return rows


def pending(cfg: SweepConfig, root: Path, retry_failed: bool = False) -> tuple[list[RunSpec], int]:
    """Grid points still to run, and how many are finished (ok, or failed and not retried)."""
    todo, done = [], 0
    for spec in cfg.grid():
        res = Path(root) / "runs" / spec.run_id / "result.json"
        if res.exists():
            status = json.loads(res.read_text()).get("status")
            if status == "ok" or not retry_failed:
                done += 1
                continue
        todo.append(spec)
    return todo, done


def run_sweep(cfg: SweepConfig, root: str, *, retry_failed: bool = False, progress: bool = True) -> dict:
    """Run every pending grid point; returns counts ``{"ok", "failed", "skipped"}``."""
    cfg.validate()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    todo, done = pending(cfg, root, retry_failed)
    counts = {"ok": 0, "failed": 0, "skipped": done}
    if not todo:   # nothing to run: the directory (sweep.json included) stays as the runs left it
        write_tables(root)
        return counts
    # the invocation that runs something (each run's own commit: its command.json)
    _atomic_json(root / "sweep.json", {"config": asdict(cfg), "commit": _git_commit(),
                                       "grid_size": len(cfg.grid())})
    data = data_flags(cfg)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.jobs)
    lock = threading.Lock()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(cfg.grid()), initial=done, unit="run", dynamic_ncols=True)

    def finish(res: dict) -> None:
        with lock:
            counts[res["status"]] += 1
            write_tables(root)
            if bar is not None:
                bar.set_postfix_str(f"{res['run_id']}: {res['status']}"
                                    + (f" val {res['final_val_loss']:.4f}" if res["status"] == "ok" else ""))
                bar.update(1)

    try:
        if cfg.jobs == 1:
            for spec in todo:
                finish(run_one(cfg, spec, root, data, threads))
        else:
            with ThreadPoolExecutor(cfg.jobs) as pool:
                for fut in as_completed([pool.submit(run_one, cfg, s, root, data, threads) for s in todo]):
                    finish(fut.result())
    finally:
        if bar is not None:
            bar.close()
    return counts
