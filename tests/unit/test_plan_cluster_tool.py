"""tools/plan_cluster.py and the cost model's invariants on cluster presets (no processes).

The exact check against real runs is tests/megatron/test_plan_cluster.py; here: the tool runs and
prints a row per optimizer, and the model keeps the owner-mode invariant that every matrix is
orthogonalized exactly once per model replica (ZeRO-1 / layer-wise), against once per data-parallel
rank under plain DDP — summed over the ranks of a stage, NS FLOPs equal one copy of the stage's.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_md.planning.cost import Layout, plan
from megatron_md.planning.model import PRESETS
from megatron_md.testing.tools import load_tool


def test_tool_prints_a_row_per_optimizer(capsys):
    rows = load_tool("plan_cluster").main(["--model", "llama3-8b", "--tp", "8", "--dp", "2",
                                           "--optimizers", "muon,rmnp"])
    out = capsys.readouterr().out
    assert [r["optimizer"] for r in rows] == ["muon", "rmnp"]
    assert out.count("\n| muon |") == 1 and "vs AdamW" in out
    muon, rmnp = rows
    assert muon["ns_tflop_max"] > 0 and rmnp["ns_tflop_max"] == 0
    assert 0 < rmnp["share"] < muon["share"] < 1


@pytest.mark.parametrize("mode, copies", [("zero1", 1), ("ddp", 2)])
def test_each_matrix_orthogonalized_once_per_replica(mode, copies):
    lay = Layout(tp=2, pp=2, dp=2, dp_mode=mode)
    p = plan(PRESETS["llama3-8b"], lay, "muon")
    for s in p.stages:
        assert s.unique_ns_flops > 0
        assert int(s.ns_flops.sum()) == copies * s.unique_ns_flops, (mode, s.stage)


def test_ns_split_lowers_the_busiest_rank_and_is_off_by_default():
    """Llama-3-70B at TP 8 × PP 4 × DP 128: with --ns-split the busiest rank's NS is fc1's split share,
    not the whole fc1; the cluster's NS work grows (each team member repeats the m³ term of A·A); the
    Gram all-reduces appear on the TP group. Off (the default): the plan is that of the owners."""
    spec = PRESETS["llama3-70b"]
    assert Layout().ns_split is False
    lay = Layout(tp=8, pp=4, dp=128, dp_mode="zero1", global_batch=2048, seq=8192)
    off, on = plan(spec, lay, "muon"), plan(spec, replace(lay, ns_split=True), "muon")
    off_ns, on_ns = off.per_rank("ns_flops"), on.per_rank("ns_flops")
    assert on_ns.max() < off_ns.max() / 4 and on_ns.sum() > off_ns.sum()
    assert on_ns.max() >= on_ns.mean()
    ar = lambda p: sum(int(v.sum()) for (t, k, g), v in p.stages[0].traffic.sent.items()  # noqa: E731
                       if k == "all_reduce" and g == "tp")
    assert ar(on) > ar(off)
