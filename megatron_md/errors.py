"""Errors the user can act on after start-up (a bad checkpoint, a diverged run).

A leaf module (no imports): every layer may raise them.

The driver's entry point (:func:`megatron_md.training.pretrain.main`, and ``tools/convert_checkpoint.py``) prints a :class:`RunError`
as one ``<prog>: error: <message>`` line from rank 0 and exits with code 1, without a traceback.
Every rank raises the same error at the same point (the checks agree across ranks first), so
no rank is left waiting in a collective.
"""
from __future__ import annotations

__all__ = ["RunError", "CheckpointError", "DivergenceError"]


class RunError(RuntimeError):
    """A problem with the run's inputs or its training, explained by the message."""


class CheckpointError(RunError):
    """A checkpoint that cannot be loaded (missing, incomplete, corrupted, or of another run);
    the message names the file and the mismatch."""


class DivergenceError(RunError):
    """The loss is non-finite or spiked over its recent mean; the run stops before saving."""
