"""Offline checkpoint conversion (``tools/convert_checkpoint.py``).

* :mod:`.megatron_ckpt` reads every rank file of a driver checkpoint (verified against its
  manifest) and merges the model shards — tensor-parallel (column/row/vocab), pipeline stages
  (and virtual stages) and expert-parallel experts — into one unsharded state dict with global
  layer and expert numbers.
* :mod:`.hf` maps that state dict onto Hugging Face Llama (dense) / Mixtral (MoE) and writes
  ``model.safetensors`` + ``config.json``.
"""
from .megatron_ckpt import load_full_model  # noqa: F401
