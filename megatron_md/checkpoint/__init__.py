"""Checkpoints: the two formats, their integrity, topology and resharding, and the converters.

One-way imports: this package builds on the optimizer and Megatron layers (a wrapper's sharded
optimizer state is :mod:`megatron_md.megatron.sharded_state`, the seam Megatron's own checkpoints
call) and never the other way; the driver (:mod:`megatron_md.training`) and the tools import it.

* :mod:`.integrity`: the directory layout, atomic writes, the sha256 manifest, verification,
  publishing (the same for both formats).
* :mod:`.topology`: the run's identity recorded in the manifest (layout, optimizer setup, model
  shape and recipe) and the checks a load makes against it, naming the flags.
* :mod:`.per_rank` (``--ckpt-format torch``) and :mod:`.dist` (``torch_dist``, any layout on
  load): the formats; :mod:`.rng`: every rank's RNG states.
* :mod:`.save_load`: :func:`save_checkpoint` / :func:`load_checkpoint`, the driver's entry points.
* :mod:`.megatron_lm_loop`: the same integrity around Megatron-LM's own save and load (the plugin,
  :mod:`megatron_md.megatron_lm`, calls it): a manifest after its save, verification before its load,
  a failed save removed and said in one line.
* Converters (``tools/convert_checkpoint.py``): :mod:`.reader` gives a checkpoint's unsharded model
  one tensor at a time from either format (torch_dist: one layer's slice per access);
  :mod:`.merge` merges per-rank model shards into one
  unsharded state dict (and cuts it for another layout; the writer of ``sf-to-x`` and ``to-md``);
  :mod:`.hf` maps it onto Hugging Face Llama / Mixtral / Qwen3 and :mod:`.hf_tokenizer` writes our
  sentencepiece model as a Hugging Face tokenizer; :mod:`.hf_import` maps such a folder back onto a
  built model's own shards (``--load-hf``; ``from-hf`` is that driver run, saving iteration 0); :mod:`.sf` (schedule-free → its averaged
  weights ``x``); :mod:`.md` (a plain checkpoint → one MD resumes unchanged); :mod:`.reshard` (a
  driver run that rewrites a checkpoint at another layout or format).
"""
from ..errors import CheckpointError
from .save_load import load_checkpoint, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]
