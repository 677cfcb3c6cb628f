"""Megatron-LM's own ``pretrain_gpt.py`` with megatron_md's optimizers: the lines a user adds.

    export MEGATRON_LM_PATH=/path/to/Megatron-LM        # a checkout at the release matching megatron-core
    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_gpt_md.py \\
        <your usual pretrain_gpt.py flags> --optimizer muon-md --lr 0.01 --weight-decay 0

Between the megatron_md lines runs Megatron-LM's unmodified script; ``--help``
lists Megatron-LM's flags and ours (group "megatron_md"). ``launch_megatron_lm.sh`` next to
this file is a complete tiny-GPT command line (mock data). Versions verified:
docs/compatibility.md.
"""
import os
import runpy
import sys

from megatron_md import megatron_lm  # (1) the plugin

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
if not MEGATRON_LM_PATH or not os.path.isfile(os.path.join(MEGATRON_LM_PATH, "pretrain_gpt.py")):
    sys.exit("set MEGATRON_LM_PATH to a Megatron-LM checkout (the directory holding pretrain_gpt.py)")
# Megatron-LM's modules (megatron.training, gpt_builders, model_provider); appended, so that an
# installed megatron-core wheel of the same release keeps providing megatron.core
sys.path.append(MEGATRON_LM_PATH)

megatron_lm.install()  # (2) our flags in its parser, our optimizers in its training loop

sys.argv[0] = os.path.join(MEGATRON_LM_PATH, "pretrain_gpt.py")
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:  # Megatron-LM's exit conditions (--exit-interval, signals) end this way
    if e.code not in (None, 0):
        raise
megatron_lm.shutdown()  # (3) destroy the process groups while the interpreter is whole (see its docstring)
