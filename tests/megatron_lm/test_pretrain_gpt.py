"""Megatron-LM's own ``pretrain_gpt.py`` (its training loop, schedules, logging, checkpoints) with
megatron_md's optimizers, through ``examples/megatron_lm/pretrain_gpt_md.py`` — the launcher a
user runs — on CPU/gloo with Megatron's mock data and a tiny GPT.

Needs ``MEGATRON_LM_PATH`` (a Megatron-LM checkout at the release matching the installed
megatron-core, e.g. core_v0.16.1; read-only) and Megatron-LM's own import dependencies
(``six regex pyyaml pydantic triton``; see docs/compatibility.md); skipped without the variable.
The CPU start-up shims for ``megatron.training`` are test-only: ``cpu_megatron_lm.py``.

Each run is a ``torchrun --nproc-per-node 2`` subprocess; the checks read Megatron-LM's own log
lines (``iteration N/ M | ... lm loss: ... | grad norm: ...``, ``validation loss at iteration``,
its argument table).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(not MEGATRON_LM_PATH, reason="MEGATRON_LM_PATH is not set (a Megatron-LM checkout; "
                                                    "see docs/compatibility.md)"),
]

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "megatron_lm" / "pretrain_gpt_md.py"
SHIMS = Path(__file__).with_name("cpu_megatron_lm.py")
#: sitecustomize giving Python 3.11 typing.override in every interpreter, spawned children too
PY311 = Path(__file__).with_name("py311")
# --vocab-size 127 --make-vocab-size-divisible-by 64: the padded vocabulary is 128 at TP=1 and at
# TP=2 whether the tokenizer adds an EOD token (core_v0.16's NullTokenizer) or not (core_v0.19's). The
# padding multiple is (divisible-by × TP) and the padded rows take part in the softmax, so with a
# padded size that changes with TP a checkpoint resumed at another TP is another model.
TINY_GPT = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 6 "
    "--eval-interval 3 --eval-iters 2 --log-interval 1 --lr 0.01 --lr-decay-style constant --weight-decay 0 "
    "--clip-grad 1.0 --seed 1234 --mock-data --tokenizer-type NullTokenizer --vocab-size 127 --make-vocab-size-divisible-by 64 "
    "--distributed-backend gloo --transformer-impl local --use-cpu-initialization "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion "
    "--no-persist-layer-norm --no-rope-fusion --position-embedding-type learned_absolute "
    "--attention-dropout 0 --hidden-dropout 0").split()
ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|.*?grad norm: (\S+) \|")
VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: (\S+) \|")


def _run(*flags: str, probe: bool = False, timeout: int = 400, tiny=None):
    """One torchrun of the launcher with ``tiny`` (default :data:`TINY_GPT`) and ``flags``."""
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PY311), os.environ.get("PYTHONPATH")])))
    if probe:
        env["MEGATRON_MD_TEST_PROBE_EVAL"] = "1"
    # --standalone: torchrun's store binds a port the kernel picks (no probe-then-bind race)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SHIMS), str(LAUNCHER), *(TINY_GPT if tiny is None else tiny), *flags]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    iters = {int(m[1]): (float(m[2]), float(m[3])) for m in ITER.finditer(out)}
    valid = {int(m[1]): float(m[2]) for m in VALID.finditer(out)}
    return proc.returncode, out, iters, valid


def _trained(rc, out, iters, valid, name, its=range(1, 7)):
    assert rc == 0, out[-4000:]
    assert re.search(rf"^\s*optimizer \.+ {re.escape(name)}$", out, re.M), "argument table: " + name
    assert f"megatron_md: built --optimizer {name}" in out, out[-4000:]
    assert sorted(iters) == list(its), (sorted(iters), out[-3000:])
    losses = [iters[i][0] for i in its]
    assert all(x == x and x < 10 for x in losses), losses
    assert losses[-1] < losses[0] - 0.3 and valid[6] < valid[3], (losses, valid)
    # MD's defaults follow the model: a tied head (Megatron-LM's default) takes the embedding rule silently
    assert "md-head-gains" not in out, out[-3000:]


ZERO1 = ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"]


@pytest.mark.parametrize("name,flags", [
    ("muon-md", ["--tensor-model-parallel-size", "2"]),
    # TP=1 x DP=2: ZeRO-1 flat shards (FlatRange math) in Megatron's DistributedOptimizer; the per-block
    # methods with the default split QKV (Q, K, V flat-sharded per block)
    ("rmnp", ZERO1), ("muon-md", ZERO1), ("sf-normuon", ZERO1),
])
def test_pretrain_gpt_trains(name, flags):
    _trained(*_run("--optimizer", name, *flags), name)


def test_schedule_free_evaluates_and_saves_x_and_resumes_exactly(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    common = ["--optimizer", "sf-normuon", "--tensor-model-parallel-size", "2", "--ckpt-format", "torch"]
    rc, out, iters, valid = _run(*common, "--save", ckpt, "--save-interval", "3", probe=True)
    _trained(rc, out, iters, valid, "sf-normuon")
    probes = re.findall(r"MEGATRON_MD_PROBE evaluate train_mode=(\[.*?\])", out)
    assert probes and all("True" not in p and "False" in p for p in probes), probes  # x during every evaluation
    # the checkpoint at iteration 3 holds x; loading it turns the parameters back into y, so the
    # resumed run takes the same steps (grad norms, and the final validation loss at x)
    rc2, out2, iters2, valid2 = _run(*common, "--load", ckpt, "--ckpt-step", "3")
    assert rc2 == 0, out2[-4000:]
    assert "successfully loaded checkpoint" in out2
    assert sorted(iters2) == [4, 5, 6], out2[-3000:]
    assert [iters2[i][1] for i in (4, 5, 6)] == [iters[i][1] for i in (4, 5, 6)], (iters2, iters)
    assert iters2[4][0] == iters[4][0] and iters2[6][0] == iters[6][0], (iters2, iters)
    assert valid2[6] == valid[6], (valid2, valid)


def test_torch_dist_resumes_exactly_and_at_another_layout(tmp_path):
    """Megatron-LM's own torch_dist save/load of megatron_md's optimizer state (our wrappers'
    ``sharded_state_dict``): the same layout resumes with the logged losses and grad norms of the
    uninterrupted run; ZeRO-1 (TP=1 × DP=2) ↔ TP=2 resumes with them to the log's precision."""
    def close(a, b):
        return abs(a - b) <= 1e-4 * abs(a)

    for name, src, dst in (("muon-md", ["--tensor-model-parallel-size", "2"],
                            ["--tensor-model-parallel-size", "1"]),
                           ("sf-normuon", ZERO1, ["--tensor-model-parallel-size", "2"])):
        ckpt = str(tmp_path / name)
        common = ["--optimizer", name, "--ckpt-format", "torch_dist"]
        rc, out, iters, valid = _run(*common, *src, "--save", ckpt, "--save-interval", "3")
        _trained(rc, out, iters, valid, name)
        for flags, exact in ((src, True), (dst, False)):
            rc2, out2, iters2, valid2 = _run(*common, *flags, "--load", ckpt, "--ckpt-step", "3")
            assert rc2 == 0 and "successfully loaded checkpoint" in out2, out2[-4000:]
            assert sorted(iters2) == [4, 5, 6], out2[-3000:]
            # grad norms of 4..6 and the losses of 4 and 6 (Megatron-LM's logged loss of the
            # iteration after a resumed run's first one differs in the torch format as well)
            for i, what in ((4, 0), (6, 0), (4, 1), (5, 1), (6, 1)):
                a, b = iters2[i][what], iters[i][what]
                assert (a == b if exact else close(a, b)), (name, flags, i, iters2, iters)
            assert valid2[6] == valid[6] if exact else close(valid2[6], valid[6]), (valid2, valid)


def test_checkpoint_formats_it_cannot_hold_are_refused_before_training(tmp_path):
    rc, out, iters, _ = _run("--optimizer", "muon-md", "--tensor-model-parallel-size", "1",
                             "--use-distributed-optimizer", "--save", str(tmp_path / "c"), "--save-interval", "3",
                             "--ckpt-format", "torch")
    assert rc != 0 and not iters, out[-3000:]
    assert "--ckpt-format torch and --use-distributed-optimizer" in out and "pass --ckpt-format torch_dist" in out, \
        out[-3000:]

@pytest.mark.parametrize("flags,needles", [
    (["--optimizer", "muon-md", "--weight-decay", "0.1"], ["--optimizer muon-md", "--weight-decay"]),
    (["--optimizer", "sf-normuon", "--lr-decay-style", "cosine"], ["--optimizer sf-normuon", "--lr-decay-style"]),
    (["--optimizer", "muon-md", "--use-torch-fsdp2", "--untie-embeddings-and-output-weights"],
     ["--optimizer muon-md", "--use-torch-fsdp2", "examples/pretrain_gpt.py --use-torch-fsdp2"]),
])
def test_refusals_are_one_error_line_from_rank_0(flags, needles):
    """A flag combination we refuse stops before training with one ``error:`` line (rank 0 only)
    naming the flags, and no Python traceback from the ranks (torchrun's own failure summary remains)."""
    rc, out, iters, _ = _run(*flags, "--tensor-model-parallel-size", "2")
    assert rc != 0 and not iters, out[-3000:]
    lines = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), (lines, out[-3000:])
    ranks = out.split("failed (exitcode")[0]  # what the ranks printed, before torchrun's own failure report
    assert "ValueError" not in out and "Traceback" not in ranks, out[-3000:]


def test_compatibility_doc_rows_are_what_the_command_prints():
    """docs/compatibility.md's loss rows of this megatron-core version equal a fresh run of the
    documented command (``tools/compat_losses.py --check``)."""
    from megatron_md.testing.tools import load_tool
    assert load_tool("compat_losses").main(["--check"]) == 0
