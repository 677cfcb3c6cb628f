"""Training and validation data through megatron-core's ``GPTDataset``.

``BlendedMegatronDatasetBuilder`` builds one ``GPTDataset`` per split from the indexed datasets
written by ``tools/preprocess_data.py`` (``<prefix>_train``, ``<prefix>_valid``; one blend per
split) — or ``MockGPTDataset`` with ``--mock-data``. Its document/sample/shuffle indices are
cached as .npy files (``--dataloader-cache``, default ``<data dir>/cache``); rank 0 builds
them, the other ranks load them (the builder synchronises).

Sampling follows Megatron-LM's ``MegatronPretrainingSampler`` without a DataLoader: global
batch ``i`` is samples ``[i*G, (i+1)*G)`` of the (already shuffled) training dataset; micro-batch
``m`` of it is the next ``micro*dp`` samples, of which data-parallel rank ``r`` takes
``micro`` consecutive ones. The position is a pure function of the iteration, so a resumed
run reads exactly the batches an uninterrupted run would. Validation always uses the first
``--eval-iters`` global batches of the validation dataset (the same batches at every
evaluation, so the numbers are comparable over time; Megatron-LM instead moves on).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch

__all__ = ["TokenizerInfo", "build_datasets", "batch_iterator"]


class TokenizerInfo:
    """What ``GPTDataset`` needs from a tokenizer: vocabulary size and the EOD id (no pad id)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.eos = eod

    @property
    def pad(self):  # GPTDataset then uses -1, a value that never occurs in the data
        raise AttributeError("no pad token")

    @property
    def unique_identifiers(self):  # part of GPTDataset's cache key
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def _gpt_config(args, tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    kw = dict(random_seed=args.seed, sequence_length=args.seq_length, tokenizer=tokenizer,
              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=args.eod_mask_loss,
              create_attention_mask=False, mid_level_dataset_surplus=0.005)
    if args.data_path is not None:
        cache = args.dataloader_cache or os.path.join(os.path.dirname(os.path.abspath(args.data_path)), "cache")
        kw.update(blend_per_split=[([f"{args.data_path}_train"], None), ([f"{args.data_path}_valid"], None), None],
                  path_to_cache=cache)
    else:
        kw.update(path_to_cache=args.dataloader_cache)
    return GPTDatasetConfig(**kw)


def build_datasets(args):
    """(train_dataset, valid_dataset or None) with enough samples for the whole run."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    tokenizer = TokenizerInfo(args.vocab_size, args.eod_id)
    config = _gpt_config(args, tokenizer)
    train_samples = max(1, args.train_iters) * args.global_batch_size  # --train-iters 0: nothing is read
    valid_samples = args.eval_iters * args.global_batch_size if args.eval_iters else None
    cls = MockGPTDataset if args.mock_data else GPTDataset
    sizes = [train_samples, valid_samples or 1, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    if len(train) < train_samples:
        raise RuntimeError(f"training dataset has {len(train)} samples, the run needs {train_samples}")
    return train, (valid if args.eval_iters else None)


def _collate(samples) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}


def batch_iterator(dataset, args, start_iteration: int = 0, num_iterations: Optional[int] = None) -> Iterator[dict]:
    """Micro-batches of this data-parallel rank, from global batch ``start_iteration`` on.

    Yields ``num_microbatches`` dicts per global batch (``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``; each ``[micro, seq]``) on the current device.
    """
    from megatron.core import parallel_state as ps
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    it = start_iteration
    while num_iterations is None or it < start_iteration + num_iterations:
        for m in range(args.num_microbatches):
            first = it * gbs + m * mbs * dp + dp_rank * mbs
            batch = _collate([dataset[(first + j) % len(dataset)] for j in range(mbs)])
            if device is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch
        it += 1
