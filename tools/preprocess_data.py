#!/usr/bin/env python3
"""Tokenize the real-text corpus into megatron-core indexed datasets (.bin/.idx).

    python tools/preprocess_data.py                                  # default prefix under data/
    python tools/preprocess_data.py --output-prefix data/megatron/gutenberg --vocab-size 4096
    python tools/preprocess_data.py --sources gutenberg,shakespeare --doc-tokens 0

Reuses :mod:`megatron_md.training.corpus`: the verified corpus (data/corpus/), its deterministic
per-book train/validation paragraph split and its sentencepiece BPE tokenizer (data/tokenizer/,
trained on the training split only). Each book's paragraphs, in order, are encoded and grouped
into documents of at most ``--doc-tokens`` tokens (whole paragraphs joined by the newline
token; ``0``: one document per book), and every document ends with the EOD (= EOS) token.
Writes, with ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` (uint16 tokens):

    <prefix>_train.bin/.idx   <prefix>_valid.bin/.idx   <prefix>.json (metadata, tokenizer path)

The defaults give ``data/megatron/<tokenizer key>-doc<N>_{train,valid}``; a second run with the
same inputs finds the files (matched by the metadata) and does nothing. Pass the prefix to the
training driver as ``--data-path <prefix>`` (it reads ``<prefix>.json`` for the tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_md.training import corpus  # noqa: E402

FORMAT_VERSION = 1
SPLITS = ("train", "valid")


def default_prefix(tokenizer_key: str, doc_tokens: int, data_dir: Path | None = None) -> Path:
    data_dir = Path(data_dir) if data_dir is not None else corpus.default_data_dir()
    return data_dir / "megatron" / f"{tokenizer_key}-doc{doc_tokens}"


def _documents(paras_ids, newline_id: int, eod_id: int, doc_tokens: int):
    """Group consecutive encoded paragraphs into documents (EOD appended to each)."""
    doc: list[int] = []
    for ids in paras_ids:
        if doc and doc_tokens and len(doc) + 1 + len(ids) > doc_tokens:
            yield doc + [eod_id]
            doc = []
        if doc:
            doc.append(newline_id)
        doc.extend(ids)
    if doc:
        yield doc + [eod_id]


def _write_split(prefix: str, docs, vocab_size: int) -> dict:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import (IndexedDatasetBuilder, get_bin_path,
                                                        get_idx_path)

    dtype = np.uint16 if vocab_size <= 65536 else np.int32
    final_bin, final_idx = get_bin_path(prefix), get_idx_path(prefix)
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    n_docs = n_tokens = 0
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
        n_docs += 1
        n_tokens += len(doc)
    builder.finalize(get_idx_path(tmp_prefix))
    for src, dst in ((get_bin_path(tmp_prefix), final_bin), (get_idx_path(tmp_prefix), final_idx)):
        with open(src, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(src, dst)
    return {"documents": n_docs, "tokens": n_tokens, "dtype": np.dtype(dtype).name}


def preprocess(sources=corpus.DEFAULT_SOURCES, *, vocab_size: int = 4096, val_fraction: float = 0.02,
               doc_tokens: int = 1024, output_prefix: str | Path | None = None,
               data_dir: Path | None = None, allow_network: bool = True, force: bool = False,
               num_threads: int = 2, verbose: bool = True) -> dict:
    """Build (or find cached) indexed datasets; returns the metadata dict (also ``<prefix>.json``)."""
    t0 = time.perf_counter()
    prepared = corpus.prepare_data(tuple(sources), vocab_size=vocab_size, val_fraction=val_fraction,
                                   data_dir=data_dir, allow_network=allow_network,
                                   num_threads=num_threads, verbose=verbose)
    tok = prepared.tokenizer
    prefix = Path(output_prefix) if output_prefix else default_prefix(prepared.key, doc_tokens, data_dir)
    meta_path = Path(f"{prefix}.json")
    ident = {"format": FORMAT_VERSION, "tokenizer_key": prepared.key, "doc_tokens": doc_tokens,
             "val_fraction": val_fraction, "sources": list(sources)}
    if not force and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        files = [Path(f"{prefix}_{s}.{ext}") for s in SPLITS for ext in ("bin", "idx")]
        if meta.get("ident") == ident and all(f.exists() for f in files):
            if verbose:
                print(f"[preprocess] cached: {prefix}_{{train,valid}} ({meta['splits']['train']['tokens']:,} "
                      f"train / {meta['splits']['valid']['tokens']:,} valid tokens)", flush=True)
            return meta
    prefix.parent.mkdir(parents=True, exist_ok=True)
    manifests = corpus.ensure_corpus(tuple(sources), data_dir, allow_network=allow_network, verbose=verbose)
    per_split: dict = {s: [] for s in SPLITS}
    for man in manifests:
        for book in man["books"]:
            paras = corpus.paragraphs(Path(book["path"]).read_text(encoding="utf-8"))
            train, valid = corpus.split_paragraphs(paras, val_fraction)
            for split, ps in (("train", train), ("valid", valid)):
                ids = tok.encode_batch(ps, num_threads=num_threads)
                per_split[split].extend(_documents(ids, tok.newline_id, tok.eos_id, doc_tokens))
    splits = {}
    with corpus._file_lock(prefix.parent / f".{prefix.name}.lock"):
        for split in SPLITS:
            splits[split] = _write_split(f"{prefix}_{split}", per_split[split], tok.vocab_size)
        meta = {"ident": ident, "prefix": str(prefix), "tokenizer_model": str(tok.model_path),
                "vocab_size": tok.vocab_size, "eod_id": tok.eos_id, "newline_id": tok.newline_id,
                "splits": splits, "corpus": prepared.meta.get("sources")}
        corpus._atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    if verbose:
        print(f"[preprocess] wrote {prefix}_{{train,valid}}: "
              + ", ".join(f"{s} {v['documents']:,} docs / {v['tokens']:,} tokens" for s, v in splits.items())
              + f" in {time.perf_counter() - t0:.1f}s", flush=True)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-prefix", default=None,
                   help="output prefix (writes <prefix>_train/_valid .bin/.idx and <prefix>.json); "
                        "default data/megatron/<tokenizer key>-doc<N>")
    p.add_argument("--vocab-size", type=int, default=4096, help="sentencepiece BPE vocabulary size")
    p.add_argument("--sources", default="gutenberg", help=f"comma list of {sorted(corpus.SOURCES)}")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--doc-tokens", type=int, default=1024,
                   help="max tokens per document (whole paragraphs); 0 = one document per book")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $MEGATRON_MD_DATA or <repo>/data")
    p.add_argument("--offline", action="store_true", help="never use the network")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    if args.doc_tokens < 0:
        p.error("--doc-tokens must be >= 0")
    try:
        meta = preprocess([s.strip() for s in args.sources.split(",") if s.strip()],
                          vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                          doc_tokens=args.doc_tokens, output_prefix=args.output_prefix,
                          data_dir=args.data_dir, allow_network=not args.offline, force=args.force)
    except corpus.CorpusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"--data-path {meta['prefix']}   (tokenizer {meta['tokenizer_model']}, vocab {meta['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
