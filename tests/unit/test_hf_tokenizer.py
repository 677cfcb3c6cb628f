"""to-hf's tokenizer (megatron_md.checkpoint.hf_tokenizer): ``AutoTokenizer`` loads what it writes
and encodes text to sentencepiece's ids — on a model trained here with the corpus tokenizer's
settings, and, when the corpus is prepared on this machine, on its whole validation split against
the indexed dataset the driver trains on."""
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from megatron_md.checkpoint.hf_tokenizer import PROBES, build_tokenizer, write_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEXT = ("It was the best of times, it was the worst of times; in 1775 there were 2 kings and 3.5 queens.\n"
        "Ünïcödé façade — naïve “quotes”, tabs\tand  double  spaces; emoji 😀 and 中文 fall back to bytes.")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A sentencepiece BPE model trained as the corpus tokenizer is (byte fallback, identity normalization)."""
    from megatron_md.training.corpus import _train_tokenizer
    path = tmp_path_factory.mktemp("spm") / "bpe.model"
    paras = [f"Paragraph {i}: " + TEXT.split("\n")[i % 2] * (1 + i % 3) for i in range(200)]
    _train_tokenizer(iter(paras), path, vocab_size=400, num_threads=1)
    return path


def test_auto_tokenizer_encodes_to_sentencepiece_ids(small_model, tmp_path):
    import sentencepiece as spm
    special = write_tokenizer(str(small_model), str(tmp_path), model_max_length=128, vocab_size=400)
    assert special == {"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0}
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= set(os.listdir(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=str(small_model))
    for text in PROBES + TEXT.split("\n") + [TEXT, "unseen words: xylophone quixotic 42"]:
        ids = tok.encode(text)   # no BOS/EOS added: our preprocessing adds none inside a paragraph
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 2 and tok.model_max_length == 128


def test_bad_tokenizer_models_are_refused(small_model, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model .*no such file"):
        build_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="--tokenizer-model .*not a sentencepiece model"):
        build_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(ValueError, match="--tokenizer-model .*400 pieces, the model's vocabulary has 512"):
        write_tokenizer(str(small_model), str(tmp_path / "out"), 128, vocab_size=512)


def _prepared():
    metas = sorted((REPO / "data" / "megatron").glob("*.json")) if (REPO / "data" / "megatron").is_dir() else []
    for m in metas:
        meta = json.loads(m.read_text())
        if Path(meta.get("tokenizer_model", "")).exists() and Path(meta["prefix"] + "_valid.bin").exists():
            return meta
    return None


@pytest.mark.skipif(_prepared() is None, reason="the corpus is not prepared here (tools/preprocess_data.py)")
def test_validation_split_encodes_to_the_indexed_dataset(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_md.testing.tools import load_tool
    from megatron_md.training import corpus
    meta = _prepared()
    write_tokenizer(meta["tokenizer_model"], str(tmp_path), 1024, vocab_size=meta["vocab_size"])
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    pre = load_tool("preprocess_data")
    ident = meta["ident"]
    docs = []
    for man in corpus.ensure_corpus(tuple(ident["sources"]), REPO / "data", allow_network=False, verbose=False):
        for book in man["books"]:
            paras = corpus.paragraphs(Path(book["path"]).read_text(encoding="utf-8"))
            _, valid = corpus.split_paragraphs(paras, ident["val_fraction"])
            ids = [tok.encode(p) for p in valid]
            docs.extend(pre._documents(ids, meta["newline_id"], meta["eod_id"], ident["doc_tokens"]))
    stored = IndexedDataset(meta["prefix"] + "_valid")
    assert len(docs) == len(stored) == meta["splits"]["valid"]["documents"]
    assert all(list(map(int, stored[i])) == d for i, d in enumerate(docs))
