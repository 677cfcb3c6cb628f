"""The quality table (megatron_md.experiments.results, tools/results_table.py) on a sweep
directory written here with known losses and curves."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_md.experiments import results as res

REPO = Path(__file__).resolve().parents[2]


def _run(root, opt, lr, seed, final, curve, iters=100, status="ok", hidden=64):
    rid = f"{opt}-N{hidden}-D{iters}-lr{lr:g}-s{seed}"
    d = root / "runs" / rid
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(dict(run_id=rid, optimizer=opt, lr=lr, seed=seed, train_iters=iters,
                                                   hidden_size=hidden, status=status, final_val_loss=final)))
    (d / "log.jsonl").write_text("".join(json.dumps({"event": "train", "iteration": it, "loss": loss}) + "\n"
                                         for it, loss in curve))


def _curve(scale, iters=100):
    # loss 8 - scale·log(1 + it/10): monotone; a larger scale reaches any target earlier
    return [(it, 8 - scale * math.log1p(it / 10)) for it in range(10, iters + 1, 10)]


@pytest.fixture
def sweep(tmp_path):
    for lr, loss in ((1e-3, 5.5), (2e-3, 5.2), (4e-3, 5.3)):
        _run(tmp_path, "adam", lr, 1, loss, _curve(1.0))
    _run(tmp_path, "adam", 2e-3, 2, 5.22, _curve(1.0))
    for lr, loss in ((5e-3, 5.0), (1e-2, 4.8), (2e-2, 4.9)):
        _run(tmp_path, "muon", lr, 1, loss, _curve(2.0))
    _run(tmp_path, "muon", 1e-2, 2, 4.84, _curve(2.0))
    for lr, loss in ((1e-3, 5.6), (2e-3, 5.4)):          # best at the edge
        _run(tmp_path, "rmnp", lr, 1, loss, _curve(0.5))
    _run(tmp_path, "rmnp", 4e-3, 1, float("nan"), [], status="failed")
    for lr, loss in ((1e-3, 5.24), (2e-3, 5.19), (4e-3, 5.3)):   # within noise of adam
        _run(tmp_path, "adamh", lr, 1, loss, _curve(1.0))
    _run(tmp_path, "adamh", 2e-3, 2, 5.25, _curve(1.0))
    return tmp_path


def test_steps_to_reach_interpolates():
    assert res.steps_to_reach([(10, 6.0), (20, 5.0), (30, 4.0)], 4.5) == pytest.approx(25.0)
    assert res.steps_to_reach([(10, 6.0), (20, 5.0)], 6.5) == 10.0
    assert res.steps_to_reach([(10, 6.0), (20, 5.0)], 4.0) is None


def test_quality_rows(sweep):
    rows = {r.optimizer: r for r in res.quality_rows(sweep, ["adam", "muon", "rmnp", "adamh", "absent"])}
    assert set(rows) == {"adam", "muon", "rmnp", "adamh"}
    a, m, r, h = rows["adam"], rows["muon"], rows["rmnp"], rows["adamh"]
    # the LR sweep is seed 1's; the best LR is an interior point; its row averages every seed
    assert a.lrs == [1e-3, 2e-3, 4e-3] and a.losses[1] == pytest.approx(5.2) and a.best_lr == 2e-3 and not a.edge
    assert a.seed_losses == [5.2, 5.22] and a.half_range == pytest.approx(0.01)
    assert a.fraction_of_baseline_steps == pytest.approx(1.0)  # its own seed-mean curve ends at the target
    # muon's curve (scale 2) reaches adam's final loss 8 - log(11) at 8 - 2 log1p(t/10): t = 10(√11 − 1)
    assert m.fraction_of_baseline_steps == pytest.approx(10 * (math.sqrt(11) - 1) / 100, rel=0.08)
    assert res.noise_verdict(m, a) == "better"
    assert r.edge and r.failed == ["rmnp-N64-D100-lr0.004-s1"] and r.reached == 0
    assert res.noise_verdict(r, a) == "one seed"
    assert res.noise_verdict(h, a) == "within seed noise"
    md = res.markdown_table(list(rows.values()))
    assert "extend the grid" in md and "1 failed run(s)" in md and "not reached" in md
    assert "within seed noise" in md and "better" in md


def test_results_table_tool(sweep, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "tools" / "results_table.py"), str(sweep), "--out", str(out),
                    "--optimizers", "adam,muon,rmnp"], check=True, capture_output=True, cwd=REPO)
    text = (out / "quality.md").read_text()
    assert "| muon | 0.005, 0.01, 0.02 | 0.01 |" in text
    assert (out / "plots" / "quality" / "loss_vs_step.png").stat().st_size > 1000
    assert (out / "plots" / "quality" / "loss_vs_lr.png").stat().st_size > 1000
    # --name: another sweep's table into its own block of the page (the quality block untouched)
    page = tmp_path / "page.md"
    page.write_text("<!-- BEGIN quality -->\nq\n<!-- END quality -->\n<!-- BEGIN moe -->\nold\n<!-- END moe -->\n")
    subprocess.run([sys.executable, str(REPO / "tools" / "results_table.py"), str(sweep), "--out", str(out),
                    "--optimizers", "adam,muon", "--name", "moe", "--fill", str(page)],
                   check=True, capture_output=True, cwd=REPO)
    filled = page.read_text()
    assert "\nq\n" in filled and "old" not in filled and "| muon | 0.005, 0.01, 0.02 | 0.01 |" in filled
    assert "plots/moe/loss_vs_lr.png" in filled and (out / "moe.md").exists()
    claims = tmp_path / "claims.toml"
    claims.write_text('[[claim]]\nid = "C1"\nclaim = "muon beats adam"\n'
                      'treatment = {dir = ".", optimizer = "muon"}\ncontrol = {dir = ".", optimizer = "adam"}\n')
    subprocess.run([sys.executable, str(REPO / "tools" / "results_table.py"), str(sweep), "--out", str(out),
                    "--claims", str(claims)], check=True, capture_output=True, cwd=REPO)
    assert "| C1 | muon beats adam |" in (out / "claims.md").read_text()
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "results_table.py"), str(tmp_path / "none"),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "not a sweep directory" in bad.stderr


def test_claim_verdicts(sweep):
    Side = res.Side
    v = res.claim_verdict(sweep, Side(".", "muon"), Side(".", "adam"))            # 4.82 vs 5.21, 2 seeds each
    assert v["verdict"] == "holds" and v["diff"] == pytest.approx(4.82 - 5.21) and "beyond seed noise" in v["why"]
    assert res.claim_verdict(sweep, Side(".", "adam"), Side(".", "muon"))["verdict"] == "does not hold"
    assert res.claim_verdict(sweep, Side(".", "adamh"), Side(".", "adam"))["verdict"] == "inconclusive"
    edge = res.claim_verdict(sweep, Side(".", "rmnp"), Side(".", "adam"))
    assert edge["verdict"] == "inconclusive" and "edge (rmnp)" in edge["why"]
    # a single-LR set of seeds is not an edge when declared fixed_lr
    fixed = res.claim_verdict(sweep, Side(".", "rmnp", fixed_lr=True), Side(".", "muon"))
    assert fixed["verdict"] == "does not hold (preliminary)" and "one seed" in fixed["why"]
    assert res.claim_verdict(sweep, Side("none", "muon"), Side(".", "adam"))["verdict"] == "pending"
    table = res.claims_table(sweep, [dict(id="X", claim="muon beats adam", treatment=dict(dir=".", optimizer="muon"),
                                          control=dict(dir=".", optimizer="adam"))])
    assert "| X | muon beats adam |" in table and "**holds**" in table


def test_claim_sides_select_one_width(tmp_path):
    """``where`` restricts a side to one width of a width sweep: the same optimizers at hidden 64
    and 256 give opposite verdicts, and the table names the width."""
    for hidden, (a_loss, m_loss) in ((64, (5.0, 5.3)), (256, (4.9, 4.6))):
        for opt, loss in (("adam", a_loss), ("muon", m_loss)):
            for lr, bump in ((1e-3, 0.1), (2e-3, 0.0), (4e-3, 0.1)):
                _run(tmp_path, opt, lr, 1, loss + bump, _curve(1.0), hidden=hidden)
            _run(tmp_path, opt, 2e-3, 2, loss + 0.01, _curve(1.0), hidden=hidden)
    Side = res.Side
    at = lambda h: {"hidden_size": h}  # noqa: E731
    assert res.claim_verdict(tmp_path, Side(".", "muon", where=at(64)), Side(".", "adam", where=at(64)))["verdict"] \
        == "does not hold"
    v = res.claim_verdict(tmp_path, Side(".", "muon", where=at(256)), Side(".", "adam", where=at(256)))
    assert v["verdict"] == "holds" and v["diff"] == pytest.approx(-0.3), v
    table = res.claims_table(tmp_path, [dict(id="W", claim="muon beats adam at 256",
                                             treatment=dict(dir=".", optimizer="muon", where=at(256)),
                                             control=dict(dir=".", optimizer="adam", where=at(256)))])
    assert "muon in `.` (hidden_size 256): 4.605" in table and "**holds**" in table


def test_fill_blocks_replaces_between_markers_and_keeps_them():
    page = "a\n<!-- BEGIN quality -->\nold\n<!-- END quality -->\nb\n"
    once = res.fill_blocks(page, {"quality": "new table\n"})
    assert once == "a\n<!-- BEGIN quality -->\nnew table\n<!-- END quality -->\nb\n"
    assert res.fill_blocks(once, {"quality": "again"}).count("again") == 1
    with pytest.raises(ValueError, match="claims"):
        res.fill_blocks(page, {"claims": "x"})


def test_best_lr_comes_from_the_sweep_seed(tmp_path):
    """More seeds at the best LR can raise its mean above a single-seed neighbour's value: the
    best LR stays the sweep's (seed 1) choice."""
    for lr, loss in ((1e-3, 5.3), (2e-3, 5.0), (4e-3, 5.05)):
        _run(tmp_path, "adam", lr, 1, loss, _curve(1.0))
    _run(tmp_path, "adam", 2e-3, 2, 5.2, _curve(1.0))
    (row,) = res.quality_rows(tmp_path, ["adam"])
    assert row.best_lr == 2e-3 and row.losses == [5.3, 5.0, 5.05] and row.mean == pytest.approx(5.1)



def test_scaling_rows_sweep_each_width_on_its_own(tmp_path):
    """Along width: each (optimizer, width) has its own LR sweep and best LR, with runs taken from
    several directories (the width sweep and the base width's quality sweep); the tool writes the
    table, the plot and the page block."""
    widths, base = tmp_path / "width", tmp_path / "quality"
    for lr, loss in ((1e-3, 5.5), (2e-3, 5.2), (4e-3, 5.3)):       # base width 64: best 2e-3
        _run(base, "adam", lr, 1, loss, _curve(1.0))
    _run(base, "adam", 2e-3, 2, 5.3, _curve(1.0))
    _run(base, "muon", 1e-2, 1, 5.0, _curve(1.0))                  # not asked for
    for lr, loss in ((1e-3, 5.0), (2e-3, 5.1), (4e-3, 5.2)):       # width 256: best at the low edge
        _run(widths, "adam", lr, 1, loss, _curve(1.0), hidden=256)
    for lr, loss in ((1e-3, 5.9), (2e-3, 5.7), (4e-3, 5.6), (8e-3, 5.8)):  # width 32: best 4e-3
        _run(widths, "adam", lr, 1, loss, _curve(1.0), hidden=32)
    rows = res.scaling_rows([widths, base], ["adam"], "hidden_size")
    assert sorted(rows) == [("adam", 32), ("adam", 64), ("adam", 256)]
    assert rows[("adam", 32)].best_lr == 4e-3 and not rows[("adam", 32)].edge
    assert rows[("adam", 64)].best_lr == 2e-3 and rows[("adam", 64)].seed_losses == [5.2, 5.3]
    assert rows[("adam", 256)].best_lr == 1e-3 and rows[("adam", 256)].edge
    table = res.scaling_table(rows, "hidden_size")
    assert "| adam | 64 | 0.001, 0.002, 0.004 | 0.002 | 5.2500 ± 0.0500 (2 seeds) |" in table
    assert "| adam | 256 | 0.001, 0.002, 0.004 | 0.001 [edge] | 5.0000 (1 seed) |" in table
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- BEGIN width -->\nold\n<!-- END width -->\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "tools" / "results_table.py"), str(widths), "--also", str(base),
                    "--by", "hidden_size", "--optimizers", "adam", "--out", str(out), "--name", "width",
                    "--fill", str(page)], check=True, capture_output=True, cwd=REPO)
    assert table in (out / "width.md").read_text() and table in page.read_text() and "old" not in page.read_text()
    assert (out / "plots" / "width" / "loss_vs_lr.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="by='seed'"):
        res.scaling_rows([widths], ["adam"], "seed")


def test_seed_mean_best_lr_over_the_lrs_with_every_seed(tmp_path):
    """Seeds 2 and 3 at the best LR and its neighbours: the seed-mean curve gives a second best LR
    (here another one than seed 1's), shown as a column of the scaling table; LRs missing a seed
    stay out of it."""
    seed1 = {1e-3: 5.30, 2e-3: 5.00, 4e-3: 5.02, 8e-3: 5.40}
    more = {2: {1e-3: 5.31, 2e-3: 5.10, 4e-3: 5.00}, 3: {1e-3: 5.29, 2e-3: 5.08, 4e-3: 5.01}}
    for lr, loss in seed1.items():
        _run(tmp_path, "adam", lr, 1, loss, _curve(1.0))
    for seed, losses in more.items():
        for lr, loss in losses.items():
            _run(tmp_path, "adam", lr, seed, loss, _curve(1.0))
    _run(tmp_path, "muon", 1e-2, 1, 5.0, _curve(1.0))              # one seed: no second opinion
    _run(tmp_path, "muon", 2e-2, 1, 4.9, _curve(1.0))
    _run(tmp_path, "muon", 4e-2, 1, 5.1, _curve(1.0))
    rows = res.scaling_rows([tmp_path], ["adam", "muon"], "hidden_size")
    adam, muon = rows[("adam", 64)], rows[("muon", 64)]
    assert adam.best_lr == 2e-3 and adam.mean_lrs == [1e-3, 2e-3, 4e-3] and adam.mean_best_lr == 4e-3
    assert adam.mean_losses == pytest.approx([5.30, 5.06, 5.01])
    assert muon.mean_best_lr is None and muon.mean_lrs == []
    table = res.scaling_table(rows, "hidden_size")
    assert "| adam | 64 | 0.001, 0.002, 0.004, 0.008 | 0.002 | 5.0600 ± 0.0500 (3 seeds) | " \
           "0.001: 5.3000, 0.002: 5.0600, 0.004: 5.0100* |" in table
    assert "| muon | 64 | 0.01, 0.02, 0.04 | 0.02 | 4.9000 (1 seed) | — |" in table
    # without any second opinion the column is not there
    assert "seed-mean" not in res.scaling_table({("muon", 64): muon}, "hidden_size")


def test_quality_rows_same_from_compressed_logs(sweep):
    from megatron_md.experiments.sweep import compress_logs
    names = ["adam", "muon", "rmnp", "adamh"]
    before = res.quality_rows(sweep, names)
    assert any(r.fraction_of_baseline_steps is not None for r in before)   # the curves were read
    n = len(list(sweep.glob("runs/*/log.jsonl")))
    assert n == 15 and len(compress_logs(sweep)) == n and not list(sweep.glob("runs/*/log.jsonl"))
    assert res.quality_rows(sweep, names) == before


def test_best_and_edge_lrs_of_one_width(tmp_path):
    """``--where hidden_size=N``: a width sweep's best and edge LRs per width (the queue tunes each
    width on its own); without it the widths' runs would be pooled."""
    widths = tmp_path / "width"
    for lr, loss in ((1e-3, 5.0), (2e-3, 5.1), (4e-3, 5.2)):       # width 256: best at the low edge
        _run(widths, "adam", lr, 1, loss, _curve(1.0), hidden=256)
    for lr, loss in ((1e-3, 5.9), (2e-3, 5.7), (4e-3, 5.6), (8e-3, 5.8)):  # width 32: best 4e-3
        _run(widths, "adam", lr, 1, loss, _curve(1.0), hidden=32)
    assert res.quality_rows(widths, ["adam"], where={"hidden_size": 32})[0].best_lr == 4e-3
    row = res.quality_rows(widths, ["adam"], where={"hidden_size": 256})[0]
    assert row.best_lr == 1e-3 and row.edge and row.lrs == [1e-3, 2e-3, 4e-3]

    def tool(*flags):
        return subprocess.run([sys.executable, str(REPO / "tools" / "results_table.py"), str(widths), "--out",
                               str(tmp_path / "out"), "--optimizers", "adam", *flags],
                              check=True, capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert tool("--best-lrs", "--where", "hidden_size=32") == "adam=0.004"
    assert tool("--edge-lrs", "--where", "hidden_size=256") == "adam=0.0005,0.00025"
    assert tool("--best-lrs", "--where", "hidden_size=256") == ""   # an edge is no best yet
