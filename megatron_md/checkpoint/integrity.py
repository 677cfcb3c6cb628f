"""The checkpoint directory and its integrity: names, atomic writes, the manifest, verification.

Layout (Megatron-LM's names), the same for both formats::

    <save>/iter_0000100/...                     # rank_<r>.pt (torch) or *.distcp + metadata (torch_dist)
    <save>/iter_0000100/manifest.json           # sha256 + size of every file, the run's topology
    <save>/latest_checkpointed_iteration.txt    # "100", written last

A save writes into a staging directory ``iter_0000100.tmp<pid>`` (:func:`new_staging`), hashes
what is on disk (:func:`hash_tree`, in parallel over the ranks), and :func:`publish` writes the
manifest, renames the staging directory to ``iter_0000100`` and only then the tracker (each step
atomic, directories fsynced): a crash at any point leaves the previous checkpoint as the latest,
and the ``*.tmp<pid>`` leftovers are removed at the start of the next save (:func:`clean_stale`).
A load checks every file against the manifest (:func:`verify_file`: present, size, sha256) and the
ranks :func:`agree` before anything is restored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["TRACKER", "MANIFEST", "FORMAT", "MEGATRON_LM_WRITER", "checkpoint_dir", "rank_name", "rank_file",
           "atomic_torch_save", "atomic_write_text", "sha256", "read_latest", "complete_iterations", "clean_stale",
           "agree", "verify_file", "verify_files", "load_verified", "read_manifest", "new_staging",
           "describe_save_failure", "save_step", "hash_tree", "publish"]

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
FORMAT = 2
#: the manifest's ``"writer"`` when Megatron-LM's loop saved the checkpoint (megatron_md's plugin,
#: :mod:`.megatron_lm_loop`): its files, no run topology
MEGATRON_LM_WRITER = "megatron-lm"
_TMP = re.compile(r"\.tmp\d+$")
_ITER = re.compile(r"^iter_(\d{7})$")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rank_file(root: str, iteration: int, rank: int) -> str:
    return os.path.join(checkpoint_dir(root, iteration), rank_name(rank))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_latest(root: str) -> Optional[int]:
    """Iteration named by ``<root>/latest_checkpointed_iteration.txt`` (None if absent)."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def complete_iterations(root: str) -> list[int]:
    """Iterations under ``root`` whose directory has a manifest (their save completed)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _ITER.match(name)
        if m and os.path.exists(os.path.join(root, name, MANIFEST)):
            out.append(int(m.group(1)))
    return sorted(out)


def clean_stale(root: str) -> list[str]:
    """Remove ``*.tmp<pid>`` files and staging directories an interrupted save left behind."""
    removed = []
    for d in [root] + [os.path.join(root, n) for n in os.listdir(root) if _ITER.match(n)]:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if _TMP.search(name):
                p = os.path.join(d, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------------- verification
def agree(error: Optional[str]) -> None:
    """Every rank raises the same CheckpointError if any rank has one (lowest rank's message)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        others = sum(1 for _, e in bad[1:] if e != bad[0][1])  # the same message everywhere: said once
        raise CheckpointError(bad[0][1] + (f" (and {others} other rank(s) with other problems)" if others else ""))


def load_verified(path: str, entry: dict) -> dict:
    """``torch.load`` of a rank file after checking it against its manifest ``entry``; a
    :class:`CheckpointError` naming the file when it does not match (offline tools' reader)."""
    why = verify_file(path, entry)
    if why:
        raise CheckpointError(why)
    return torch.load(path, map_location="cpu", weights_only=False)


def verify_file(path: str, entry: dict) -> Optional[str]:
    """Why ``path`` does not match its manifest ``entry`` ({"bytes", "sha256"}); None if it does."""
    if not os.path.exists(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return (f"{path} is truncated or was rewritten: {size} bytes, the manifest records {entry['bytes']}")
    digest = sha256(path)
    if digest != entry["sha256"]:
        return (f"{path} is corrupted: its sha256 is {digest[:16]}…, the manifest records "
                f"{entry['sha256'][:16]}… (same size; bytes were overwritten)")
    return None


def verify_files(directory: str, files: dict) -> Optional[str]:
    """Why this rank's share of ``files`` (``{relative path: manifest entry}``; the i-th in sorted
    order ≡ rank mod world size) does not match under ``directory`` (:func:`verify_file`'s reason
    for the first file that does not); None if every one does. The ranks then :func:`agree`."""
    w, r = dist.get_world_size(), dist.get_rank()
    for i, (name, entry) in enumerate(sorted(files.items())):
        if i % w == r:
            why = verify_file(os.path.join(directory, name), entry)
            if why is not None:
                return why
    return None


def read_manifest(root: str, iteration: int) -> dict:
    """The manifest of iteration ``iteration`` of a megatron_md driver checkpoint under ``root``;
    a :class:`CheckpointError` naming the file when it is missing, invalid, or written by
    Megatron-LM's loop (:data:`MEGATRON_LM_WRITER`: files only, no run topology)."""
    d = checkpoint_dir(root, iteration)
    path = os.path.join(d, MANIFEST)
    others = [i for i in complete_iterations(root) if i != iteration]
    hint = f"; complete checkpoints there: iterations {others} (--ckpt-step N)" if others else ""
    if not os.path.isdir(d):
        raise CheckpointError(f"--load {root}: {d} does not exist{hint}")
    if not os.path.exists(path):
        raise CheckpointError(f"--load {root}: {path} is missing — the save of iteration {iteration} did not "
                              f"complete, or it was written by a megatron_md without integrity manifests{hint}")
    try:
        with open(path) as fh:
            man = json.load(fh)
        if man.get("format") != FORMAT or man.get("iteration") != iteration:
            raise ValueError(f"format {man.get('format')!r} / iteration {man.get('iteration')!r}, "
                             f"expected {FORMAT} / {iteration}")
        if man.get("writer") == MEGATRON_LM_WRITER:
            raise CheckpointError(f"{path}: a checkpoint saved by Megatron-LM's own training loop (through "
                                  f"megatron_md's plugin); megatron_md's driver and tools read checkpoints of "
                                  f"its driver (examples/pretrain_gpt.py)")
        man["files"], man["topology"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc})") from None
    return man


# --------------------------------------------------------------------------------------- saving
def _os_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` behind ``exc``: itself, its cause/context chain, or one of the per-rank
    failures a ``torch.distributed.checkpoint`` ``CheckpointException`` carries."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        failures = getattr(exc, "failures", None)
        for f in (failures.values() if isinstance(failures, dict) else ()):
            found = _os_error(f[0] if isinstance(f, tuple) else f)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None


def describe_save_failure(root: str, iteration: int, exc: BaseException, latest: Any) -> tuple[str, bool]:
    """The one-line message for a save of iteration ``iteration`` under ``--save root`` that raised
    ``exc`` — naming ``--save``, the cause (the ``OSError``'s, else the exception's, and the free
    space when under 1 MiB) and the file when known, and ``latest`` (an iteration, ``"release"``, or
    None), the checkpoint that stays the latest — and whether it is a storage failure (an
    ``OSError`` behind it, or under 1 MiB free on ``root``'s filesystem: a full disk)."""
    cause = _os_error(exc)
    if cause is not None:
        what = f"{cause.strerror or cause}" + (f": {cause.filename}" if cause.filename else "")
    else:   # e.g. torch.save to a path reports a full disk as "RuntimeError: ... iostream error"
        what = f"{type(exc).__name__}: {exc}"
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    full = free is not None and free < (1 << 20)
    if full:
        what += f"; {free} bytes free on its filesystem"
    what = " ".join(what.split())  # one line, whatever the exception's text
    kept = (f"iteration {latest}" if isinstance(latest, int) else str(latest)) if latest is not None else None
    message = (f"--save {root}: the checkpoint of iteration {iteration} could not be written ({what}); "
               "nothing of it was kept, and " + (f"the latest checkpoint is still {kept}" if kept is not None
                                                  else "there is no earlier checkpoint"))
    return message, cause is not None or full


def save_step(root: str, iteration: int, staging: Optional[str], write: Callable[[], Any]) -> Any:
    """This rank's part ``write()`` of saving iteration ``iteration`` (into ``staging``), then the
    ranks agree (collective). When a write failed on any rank — a full disk, a quota, a vanished
    mount — rank 0 removes ``staging`` and every rank raises the same :class:`CheckpointError`
    (:func:`describe_save_failure`'s message): nothing of the failed save is left, and the previous
    checkpoint stays the latest (the tracker is written last). Returns ``write()``'s result."""
    error, out = None, None
    try:
        out = write()
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
        try:
            prev = read_latest(root)
        except (CheckpointError, OSError):
            prev = None
        error, _ = describe_save_failure(root, iteration, exc, prev)
        logger.debug("checkpoint save of iteration %d failed on this rank", iteration, exc_info=True)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = [e for e in errors if e is not None]
    if bad:
        if dist.get_rank() == 0 and staging is not None and os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(bad[0])
    return out


def new_staging(root: str, iteration: int) -> str:
    """Rank 0 removes an interrupted save's leftovers and creates ``iter_N.tmp<pid>``; every rank gets its name."""
    def make() -> Optional[str]:
        if dist.get_rank() != 0:
            return None
        os.makedirs(root, exist_ok=True)
        clean_stale(root)
        path = f"{checkpoint_dir(root, iteration)}.tmp{os.getpid()}"
        os.makedirs(path)
        return path

    name = [save_step(root, iteration, None, make)]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def hash_tree(directory: str, names: Optional[list] = None) -> dict:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``directory`` (or of ``names``),
    each rank hashing its share (files i ≡ rank mod world), gathered on every rank."""
    if names is None:
        lst = [None]
        if dist.get_rank() == 0:
            lst[0] = sorted(os.path.relpath(os.path.join(d, f), directory)
                            for d, _, fs in os.walk(directory) for f in fs if f != MANIFEST)
        dist.broadcast_object_list(lst, src=0)
        names = lst[0]
    w, r = dist.get_world_size(), dist.get_rank()
    mine = {}
    for i, n in enumerate(names):
        if i % w == r:
            path = os.path.join(directory, n)
            mine[n] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
    parts = [None] * w
    dist.all_gather_object(parts, mine)
    return dict(sorted((k, v) for part in parts for k, v in part.items()))


def publish(root: str, iteration: int, staging: str, final: str, manifest: dict) -> None:
    """Manifest into the staging directory, staging → ``iter_N`` (replacing an older save of the
    same iteration), then the tracker: a crash before the tracker keeps the previous latest."""
    atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    replaced = None
    if os.path.exists(final):
        replaced = f"{final}.replaced.tmp{os.getpid()}"
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, TRACKER), f"{iteration}\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
