"""The only place where optimizer math talks to torch.distributed, and its byte meter.

Every collective used by ``megatron_md.shard`` goes through the wrappers below, which count
the bytes each rank sends and receives, per collective kind and per *tag* (the optimizer
name, set with :func:`metered`). Counting model (exact for the sizes involved, under the
textbook algorithm of each collective, which is what NCCL/gloo use for large messages):

* ``all_reduce`` of N bytes over w ranks (ring: reduce-scatter + all-gather):
  sent = received = 2·(w−1)/w·N per rank.
* ``all_gather`` of a local piece of N bytes (ring): sent = received = (w−1)·N per rank.
* ``gather`` to one destination of N bytes per rank: every other rank sends N, the
  destination receives (w−1)·N.  ``scatter`` is the mirror image.

Nothing is counted for a group of size 1 (no collective is issued).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ByteMeter:
    """Bytes sent/received by this rank, keyed by (tag, kind)."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    received: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, tag: str, kind: str, sent: float, received: float) -> None:
        key = (tag, kind)
        self.sent[key] += int(round(sent))
        self.received[key] += int(round(received))
        self.calls[key] += 1

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.calls.clear()

    def total(self, tag: str | None = None) -> tuple[int, int]:
        """(sent, received) over all kinds, for one tag or all."""
        s = sum(v for (t, _), v in self.sent.items() if tag is None or t == tag)
        r = sum(v for (t, _), v in self.received.items() if tag is None or t == tag)
        return s, r

    def table(self) -> list[tuple[str, str, int, int, int]]:
        return sorted((t, k, self.calls[(t, k)], self.sent[(t, k)], self.received[(t, k)])
                      for (t, k) in self.calls)


METER = ByteMeter()
_TAG = ["untagged"]


@contextlib.contextmanager
def metered(tag: str):
    """Attribute the collectives issued inside the block to ``tag``."""
    _TAG.append(tag)
    try:
        yield METER
    finally:
        _TAG.pop()


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def check_member(group, what: str) -> None:
    """Raise unless this process belongs to ``group``."""
    if group is None:
        return
    if not dist.is_initialized():
        raise ValueError(f"{what}: a process group was given but torch.distributed is not initialized")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{what}: this rank ({dist.get_rank()}) is not a member of the given process group")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op for a trivial group."""
    w = group_size(group)
    if w == 1:
        return t
    n = _nbytes(t)
    METER.add(_TAG[-1], "all_reduce", 2 * (w - 1) / w * n, 2 * (w - 1) / w * n)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """All-gather equally sized tensors; returns the list of every rank's tensor."""
    w = group_size(group)
    if w == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(w)]
    n = _nbytes(t)
    METER.add(_TAG[-1], "all_gather", (w - 1) * n, (w - 1) * n)
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def gather_to(t: torch.Tensor, dst: int, group) -> list[torch.Tensor] | None:
    """Gather equally sized tensors to group rank ``dst``; the list there, None elsewhere."""
    w = group_size(group)
    if w == 1:
        return [t]
    me = group_rank(group)
    n = _nbytes(t)
    out = [torch.empty_like(t) for _ in range(w)] if me == dst else None
    METER.add(_TAG[-1], "gather", 0 if me == dst else n, (w - 1) * n if me == dst else 0)
    dist.gather(t.contiguous(), out, dst=dist.get_global_rank(group, dst), group=group)
    return out


def scatter_from(pieces: list[torch.Tensor] | None, like: torch.Tensor, src: int, group) -> torch.Tensor:
    """Scatter equally sized ``pieces`` from group rank ``src``; returns this rank's piece."""
    w = group_size(group)
    if w == 1:
        return pieces[0]
    me = group_rank(group)
    out = torch.empty_like(like)
    n = _nbytes(like)
    METER.add(_TAG[-1], "scatter", (w - 1) * n if me == src else 0, 0 if me == src else n)
    dist.scatter(out, [p.contiguous() for p in pieces] if me == src else None,
                 src=dist.get_global_rank(group, src), group=group)
    return out


def broadcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """In-place broadcast from group rank ``src`` (tree/ring: the source sends N to each of
    the w−1 others in the counting model's worst case, every other rank receives N)."""
    w = group_size(group)
    if w == 1:
        return t
    n = _nbytes(t)
    me = group_rank(group)
    METER.add(_TAG[-1], "broadcast", (w - 1) * n if me == src else 0, 0 if me == src else n)
    dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
    return t


def gather_pieces(piece: torch.Tensor, numels: list[int], dst: int, group) -> list[torch.Tensor] | None:
    """Gather pieces of *different* sizes (``numels[r]`` elements from group rank r) to ``dst``
    with point-to-point messages of exactly those sizes (empty pieces send nothing).
    Returns the flat pieces in rank order on ``dst``, None elsewhere."""
    w = group_size(group)
    flat = piece.reshape(-1)
    if w == 1:
        return [flat]
    me = group_rank(group)
    es = flat.element_size()
    if me != dst:
        if numels[me]:
            METER.add(_TAG[-1], "gather", numels[me] * es, 0)
            dist.send(flat.contiguous(), dst=dist.get_global_rank(group, dst), group=group)
        else:
            METER.add(_TAG[-1], "gather", 0, 0)
        return None
    out = [flat if r == me else flat.new_empty(numels[r]) for r in range(w)]
    reqs = [dist.irecv(out[r], src=dist.get_global_rank(group, r), group=group)
            for r in range(w) if r != me and numels[r]]
    for q in reqs:
        q.wait()
    METER.add(_TAG[-1], "gather", 0, sum(numels[r] for r in range(w) if r != me) * es)
    return out


def scatter_pieces(pieces: list[torch.Tensor] | None, numels: list[int], like: torch.Tensor, src: int,
                   group) -> torch.Tensor:
    """The mirror of :func:`gather_pieces`: returns this rank's flat piece (``numels[me]``)."""
    w = group_size(group)
    if w == 1:
        return pieces[0].reshape(-1)
    me = group_rank(group)
    es = like.element_size()
    if me == src:
        reqs = [dist.isend(pieces[r].reshape(-1).contiguous(), dst=dist.get_global_rank(group, r), group=group)
                for r in range(w) if r != me and numels[r]]
        for q in reqs:
            q.wait()
        METER.add(_TAG[-1], "scatter", sum(numels[r] for r in range(w) if r != me) * es, 0)
        return pieces[me].reshape(-1)
    out = like.new_empty(numels[me])
    if numels[me]:
        dist.recv(out, src=dist.get_global_rank(group, src), group=group)
    METER.add(_TAG[-1], "scatter", 0, numels[me] * es)
    return out


class PieceExchange:
    """Point-to-point pieces of many matrices at once: every :meth:`gather` / :meth:`scatter`
    of one round is posted, then :meth:`run` issues them as one ``batch_isend_irecv`` per process
    group (all groups posted before any is waited on, so their order cannot deadlock) and waits.

    Sends and receives between a pair of ranks match in posting order, so every rank must post
    the matrices of a round in the same order (the caller's matrix order). Metered like
    :func:`gather_pieces` / :func:`scatter_pieces`: one record per matrix, its exact bytes.
    """

    def __init__(self, tag: int = 0):
        self._ops: dict = {}       # id(group) -> (group, [P2POp])
        self._done: list = []      # callbacks after the wait (assembling received pieces)
        self._works: list = []     # posted, not yet waited on (post / finish)
        self.tag = tag             # the P2P tag of every message: exchanges with distinct tags never cross

    def _op(self, group, fn, t, peer):
        g = self._ops.setdefault(id(group), (group, []))
        g[1].append(dist.P2POp(fn, t, dist.get_global_rank(group, peer), group, self.tag))

    def gather(self, piece: torch.Tensor, numels: list[int], dst: int, group, done) -> None:
        """Post the pieces of one matrix to ``dst``; there, after :meth:`run`, ``done(pieces)``
        receives the flat pieces in rank order (``done`` is not called elsewhere)."""
        flat = piece.reshape(-1)
        me, es = group_rank(group), flat.element_size()
        if me != dst:
            if numels[me]:
                self._op(group, dist.isend, flat.contiguous(), dst)
            METER.add(_TAG[-1], "gather", numels[me] * es, 0)
            return
        out = [flat if r == me else flat.new_empty(numels[r]) for r in range(len(numels))]
        for r in range(len(numels)):
            if r != me and numels[r]:
                self._op(group, dist.irecv, out[r], r)
        METER.add(_TAG[-1], "gather", 0, sum(n for r, n in enumerate(numels) if r != me) * es)
        self._done.append(lambda: done(out))

    def scatter(self, pieces: list[torch.Tensor] | None, numels: list[int], like: torch.Tensor, src: int, group,
                done) -> None:
        """The mirror of :meth:`gather`: ``done(flat piece of this rank)`` after :meth:`run`."""
        me, es = group_rank(group), like.element_size()
        if me == src:
            for r in range(len(numels)):
                if r != me and numels[r]:
                    self._op(group, dist.isend, pieces[r].reshape(-1).contiguous(), r)
            METER.add(_TAG[-1], "scatter", sum(n for r, n in enumerate(numels) if r != me) * es, 0)
            mine = pieces[me].reshape(-1)
            self._done.append(lambda: done(mine))
            return
        out = like.new_empty(numels[me])
        if numels[me]:
            self._op(group, dist.irecv, out, src)
        METER.add(_TAG[-1], "scatter", 0, numels[me] * es)
        self._done.append(lambda: done(out))

    def run(self) -> None:
        self.post()
        self.finish()

    def post(self) -> None:
        """Issue every posted transfer without waiting (:meth:`finish` waits and calls back): the
        caller computes while they are in flight."""
        for group, ops in self._ops.values():
            if ops:
                self._works.extend(dist.batch_isend_irecv(ops))
        self._ops.clear()

    def finish(self) -> None:
        """Wait for the transfers :meth:`post` issued, then run the callbacks (in posting order)."""
        for w in self._works:
            w.wait()
        for cb in self._done:
            cb()
        self._works.clear()
        self._done.clear()
