"""Tests of megatron_md.testing.spawn itself (plain torch.distributed, no megatron import)."""

import time

import pytest

from megatron_md.testing.spawn import GroupError, SkipCheck, group_fixture, run_group


def _checks(ctx):
    import torch
    import torch.distributed as dist

    with ctx.check("all_reduce"):
        t = torch.full((3,), float(ctx.rank + 1))
        dist.all_reduce(t)
        assert t.tolist() == [3.0] * 3, t
    with ctx.check("fails_on_rank1"):
        if ctx.rank == 1:
            raise ValueError("intentional failure on rank 1")
    with ctx.check("skipped"):
        raise SkipCheck("not applicable here")
    with ctx.check("after_failure_still_runs"):  # a failed check does not stop the others
        t = torch.tensor([float(ctx.rank)])
        dist.broadcast(t, src=1)
        assert t.item() == 1.0
    ctx.record("rank_squared", ctx.rank**2)
    return f"rank {ctx.rank} done"


group = group_fixture(2, _checks, timeout=60)


def test_passing_check(group):
    group.assert_ok("all_reduce")
    assert group.status("all_reduce") == {0: "ok", 1: "ok"}


def test_failure_carries_the_child_traceback(group):
    assert group.status("fails_on_rank1")[0] == "ok"
    with pytest.raises(GroupError) as info:
        group.assert_ok("fails_on_rank1")
    msg = str(info.value)
    assert "rank 1" in msg and "Traceback" in msg
    assert "ValueError: intentional failure on rank 1" in msg
    assert "in _checks" in msg  # the frame of the failing line


def test_skip(group):
    assert group.status("skipped") == {0: "skipped: not applicable here"} | {
        1: "skipped: not applicable here"}
    with pytest.raises(pytest.skip.Exception):
        group.assert_ok("skipped")


def test_checks_after_a_failure_run_and_values_return(group):
    group.assert_ok("after_failure_still_runs")
    assert [v["rank_squared"] for v in group.values] == [0, 1]
    assert group.returns == ["rank 0 done", "rank 1 done"]
    assert group.failed_checks() == ["fails_on_rank1"] and not group.errors
    with pytest.raises(GroupError, match="fails_on_rank1"):
        group.raise_for_failures()


def test_unknown_check_name(group):
    with pytest.raises(GroupError, match="not reported by rank"):
        group.assert_ok("no_such_check")


def _hangs(ctx):
    import torch.distributed as dist

    with ctx.check("quick"):
        dist.barrier()
    with ctx.check("hangs", timeout=1.0):
        if ctx.rank == 1:
            time.sleep(3600)
    with ctx.check("never_reached"):
        pass


def test_hang_is_killed_and_reported():
    t0 = time.monotonic()
    res = run_group(2, _hangs, timeout=60, raise_on_failure=False)
    assert time.monotonic() - t0 < 30
    assert res.status("quick") == {0: "ok", 1: "ok"}
    hung = res.status("hangs")[1]
    assert hung.startswith("hung: rank 1 did not finish check 'hangs'"), hung
    assert "time.sleep" in hung or "_hangs" in hung  # the dumped stack of the hung rank
    assert 1 in res.errors and not res.ok
    assert res.status("never_reached") == {0: None, 1: None}


def _error_outside_checks(ctx):
    if ctx.rank == 0:
        raise RuntimeError("boom outside any check")
    with ctx.check("waits_for_rank0"):
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))  # rank 0 is gone: fails fast, does not hang


def test_error_outside_checks_surfaces_and_group_timeout_ends():
    with pytest.raises(GroupError) as info:
        run_group(2, _error_outside_checks, timeout=60, stuck_grace=2.0)
    msg = str(info.value)
    assert "rank 0 error" in msg and "RuntimeError: boom outside any check" in msg


def _sleeps(ctx):
    time.sleep(3600)


def test_group_timeout():
    # The whole group, start-up included, must end within `timeout`.
    res = run_group(1, _sleeps, timeout=2, raise_on_failure=False)
    assert "hung: rank 0" in res.errors[0] and "group timeout of 2s" in res.errors[0]


def test_rejects_nested_function():
    def local(ctx):
        pass

    with pytest.raises(ValueError, match="module level"):
        run_group(1, local)
