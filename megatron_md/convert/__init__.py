"""Offline checkpoint conversion (``tools/convert_checkpoint.py``).

* :mod:`.megatron_ckpt` reads every rank file of a driver checkpoint (verified against its
  manifest) and merges the model shards — tensor-parallel (column/row/vocab), pipeline stages
  (and virtual stages) and expert-parallel experts — into one unsharded state dict with global
  layer and expert numbers; :func:`~.megatron_ckpt.rewrite_checkpoint` writes a new checkpoint
  of the same layout from edited rank files (the writer of ``sf-to-x`` and ``to-md``).
* :mod:`.hf` maps that state dict onto Hugging Face Llama (dense) / Mixtral (MoE) and writes
  ``model.safetensors`` + ``config.json``.
* :mod:`.sf`: a schedule-free checkpoint → its averaged weights ``x``.
* :mod:`.md`: a plain/AdamW checkpoint → one that MD resumes with the model unchanged
  (``--md-init factor``), and the driver-side check that it is resumed with the right flags.
"""
from .megatron_ckpt import load_full_model  # noqa: F401
