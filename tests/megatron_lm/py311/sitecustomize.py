"""Test-only, Python 3.11: ``typing.override`` (3.12+) in every interpreter the Megatron-LM tests
start — the ranks, and the children Megatron-LM spawns itself (the torch_dist writer's
``multiprocessing`` manager re-imports ``pretrain_gpt.py`` in a fresh interpreter, where the
shims of ``cpu_megatron_lm.py`` have not run). Megatron-LM >= 0.19 declares Python 3.12 and
imports ``typing.override``; on 3.12 this file changes nothing. Put on ``PYTHONPATH`` by
``test_pretrain_gpt.py``; never product code."""
import sys

if sys.version_info < (3, 12):
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
