"""A checkpoint's model, one unsharded tensor at a time, from either format and any layout.

:func:`open_model` verifies the checkpoint against its manifest (every file's size and sha256,
read in blocks) and returns a :class:`ModelReader`: a read-only mapping from the names of the
unsharded model (``decoder.layers.<global layer>.…``, experts
``mlp.experts.local_experts.<global expert>.…``: :mod:`.merge`'s naming) to tensors, loaded on
access.

* ``torch_dist``: megatron-core's directory is a ``torch.distributed.checkpoint`` one whose keys
  are the unsharded model's, with the layers (and a SequentialMLP's experts) as leading axes of one
  tensor per key. Each access reads exactly one layer's (one expert's) slice of one key through
  ``torch.distributed.checkpoint``'s planner — the chunks stored for that slice and nothing else,
  no process group needed — so a reader's memory is bounded by the largest such slice, whatever
  the model's size (``benchmarks/convert_memory.py``).
* ``torch`` (per-rank files): every rank file is read and the shards merged at open
  (:func:`.merge.load_full_model`): the whole model is in memory.

Both give the same tensors for the same model, bit for bit (``tests/megatron/test_convert.py``).
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Optional

import torch

from ..errors import CheckpointError
from .integrity import checkpoint_dir, read_manifest, verify_file
from .merge import latest_iteration, load_full_model

__all__ = ["ModelReader", "open_model", "TorchDistModel", "PerRankModel", "read_box", "merge_name"]

_LAYERS = "decoder.layers."
_EXPERTS = "mlp.experts.experts."          # a SequentialMLP's experts in megatron-core's sharded keys
_LOCAL_EXPERTS = "mlp.experts.local_experts."


class ModelReader(Mapping):
    """``name → tensor`` of a checkpoint's unsharded model; ``topology`` and ``iteration`` are the
    manifest's. :meth:`shape` and :meth:`dtype` need no tensor data."""

    topology: dict
    iteration: int
    root: str

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError


class PerRankModel(ModelReader):
    """``--ckpt-format torch``: the merged model of every (verified) rank file, in memory."""

    def __init__(self, root: str, iteration: Optional[int] = None):
        self.state, self.topology, self.iteration = load_full_model(root, iteration)
        self.root = root

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype


def merge_name(key: str, lead: tuple[int, ...]) -> str:
    """The unsharded model's name (:mod:`.merge`'s naming) of megatron-core's sharded key ``key`` at
    leading index ``lead``: ``()`` outside the layers, ``(layer,)``, or ``(layer, expert)`` for a
    SequentialMLP's experts."""
    if not lead:
        return key
    rest = key[len(_LAYERS):]
    if len(lead) == 2:
        return f"{_LAYERS}{lead[0]}.{_LOCAL_EXPERTS}{lead[1]}.{rest[len(_EXPERTS):]}"
    return f"{_LAYERS}{lead[0]}.{rest}"


def read_box(storage_reader, key: str, buf: torch.Tensor, offsets) -> torch.Tensor:
    """Fill ``buf`` with the box of ``key`` that starts at ``offsets`` (``buf``'s shape) through a
    ``torch.distributed.checkpoint`` storage reader (a torch_dist directory's ``FileSystemReader``, a
    Hugging Face folder's ``HuggingFaceStorageReader``), in this process alone; returns ``buf``."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: buf}, storage_reader=storage_reader,
                 planner=_slice_planner()({key: (tuple(offsets), tuple(buf.shape))}), no_dist=True)
    return buf


@functools.lru_cache(maxsize=None)
def _slice_planner():
    """A ``torch.distributed.checkpoint`` load planner that reads given boxes of given keys into
    plain tensors of the boxes' shapes (DCP's default reads whole tensors, or shards of a
    ShardedTensor/DTensor, which need a process group)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        def __init__(self, boxes: dict):
            super().__init__()
            self.boxes = boxes  # fqn -> (offsets, sizes)

        def create_local_plan(self) -> LoadPlan:
            items = []
            for fqn, (off, size) in self.boxes.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size))
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return SlicePlanner


class TorchDistModel(ModelReader):
    """``--ckpt-format torch_dist``: one layer's (expert's) slice of one key per access."""

    def __init__(self, root: str, iteration: int, manifest: dict):
        import torch.distributed.checkpoint as dcp
        self.root, self.iteration, self.topology = root, iteration, manifest["topology"]
        self.dir = checkpoint_dir(root, iteration)
        self._dcp = dcp
        meta = dcp.FileSystemReader(self.dir).read_metadata().state_dict_metadata
        # name -> (key, offsets of the slice's leading axes, number of leading axes)
        self._where: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._meta = {}
        for key, m in meta.items():
            if key.startswith(("optimizer.", "rng_state")) or not hasattr(m, "chunks"):
                continue   # optimizer state, RNG ShardedObjects, common (bytes) entries
            self._meta[key] = m
            if not key.startswith(_LAYERS):
                self._where[key] = (key, ())
                continue
            experts = key[len(_LAYERS):].startswith(_EXPERTS)
            for i in range(m.size[0]):
                for lead in ([(i, e) for e in range(m.size[1])] if experts else [(i,)]):
                    self._where[merge_name(key, lead)] = (key, lead)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        key, lead = self._where[name]
        return tuple(self._meta[key].size)[len(lead):]

    def dtype(self, name: str) -> torch.dtype:
        key, _ = self._where[name]
        return self._meta[key].properties.dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        key, lead = self._where[name]
        full = tuple(self._meta[key].size)
        size = (1,) * len(lead) + full[len(lead):]
        buf = torch.empty(size, dtype=self.dtype(name))
        off = lead + (0,) * (len(full) - len(lead))
        try:
            read_box(self._dcp.FileSystemReader(self.dir), key, buf, off)
        except Exception as exc:  # noqa: BLE001 - verified files that do not read are a bad checkpoint
            raise CheckpointError(f"{self.dir}: {key} cannot be read ({type(exc).__name__}: {exc})") from None
        return buf.reshape(full[len(lead):])


def open_model(root: str, iteration: Optional[int] = None) -> ModelReader:
    """The model of checkpoint ``root`` (latest, or ``iteration``), either format, after verifying
    every file of it against its manifest; a :class:`CheckpointError` naming the file otherwise."""
    iteration = latest_iteration(root, iteration)
    man = read_manifest(root, iteration)
    if man.get("ckpt_format") != "torch_dist":
        return PerRankModel(root, iteration)
    if "info" not in man["topology"]:
        raise CheckpointError(f"{root} (iteration {iteration}): written before conversion support; re-save it")
    # grouped-GEMM experts (legacy GroupedMLP) need nothing more: megatron-core saves them under
    # SequentialMLP's keys and shapes, and so does megatron_md their optimizer state
    d = checkpoint_dir(root, iteration)
    for name, entry in sorted(man["files"].items()):
        why = verify_file(os.path.join(d, name), entry)
        if why:
            raise CheckpointError(why)
    return TorchDistModel(root, iteration, man)
