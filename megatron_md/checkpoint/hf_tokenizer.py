"""Our sentencepiece BPE model as a Hugging Face tokenizer that encodes text to the same ids.

The corpus tokenizer (:func:`megatron_md.training.corpus._train_tokenizer`) is a sentencepiece BPE
model with byte fallback, identity normalization, a dummy ``▁`` prefix and whitespace kept as it
is. :func:`write_tokenizer` rebuilds it as a ``tokenizers`` BPE model — the same pieces and ids;
merges are every split of a piece into two pieces, ranked by the merged piece's id (sentencepiece's
BPE merges higher-scored, i.e. lower-id, pieces first); ``▁`` prepended and spaces replaced by
``▁`` as sentencepiece's normalizer does; unknown characters fall back to ``<0xNN>`` bytes — and
writes ``tokenizer.json``, ``tokenizer_config.json`` and the original ``tokenizer.model``, which
``transformers.AutoTokenizer.from_pretrained`` loads. The ids are checked against sentencepiece's
on probe strings (whitespace runs, tabs, newlines, digits, accents, emoji, every piece) before
anything is written: a model this rebuild does not reproduce is refused, naming the flag. One
difference remains by design: the literal text of the special tokens (``<s>``, ``</s>``, ``<unk>``)
is that token for Hugging Face, as in every Llama tokenizer, and characters for sentencepiece. On the
corpus's validation text the ids equal our indexed dataset's (``tests/unit/test_hf_tokenizer.py``).
Needs ``sentencepiece`` and ``tokenizers`` (both come with ``transformers``), not ``protobuf``.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from .integrity import atomic_write_text

__all__ = ["build_tokenizer", "write_tokenizer", "PROBES"]

#: strings whose ids must agree before a tokenizer is written (plus every piece of the vocabulary)
PROBES = ["Hello world.", "  two  spaces,\ttab and\nnewline ", "\n\nleading newlines", "trailing space ",
          "digits 0123456789 and 3.14159", "Ünïcödé — “quotes” «guillemets» 😀 中文", "", " ", "a\u00a0b",
          "CamelCase snake_case kebab-case", "!!!???...", "x" * 50]


def _sp(model_path: str):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(model_path))


def build_tokenizer(model_path: str):
    """``(tokenizers.Tokenizer, SentencePieceProcessor)`` of the sentencepiece model at ``model_path``;
    a ``ValueError`` naming ``--tokenizer-model`` when the rebuild does not give sentencepiece's ids."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    if not os.path.isfile(model_path):
        raise ValueError(f"--tokenizer-model {model_path}: no such file")
    try:
        sp = _sp(model_path)
    except Exception as exc:  # noqa: BLE001 - not a sentencepiece model
        raise ValueError(f"--tokenizer-model {model_path}: not a sentencepiece model ({exc})") from None
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = sorted((pid, piece[:k], piece[k:]) for piece, pid in vocab.items()
                    if not (sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid))
                    for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab)
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], unk_token=unk, byte_fallback=True,
                        fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    pieces = [p.replace("▁", " ") for p, i in vocab.items() if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))]
    for text in PROBES + pieces:
        want, got = sp.encode(text), tok.encode(text, add_special_tokens=False).ids
        if want != got:
            raise ValueError(f"--tokenizer-model {model_path}: rebuilt as a Hugging Face BPE tokenizer it encodes "
                             f"{text[:40]!r} to {got[:8]}…, sentencepiece to {want[:8]}… (a model other than our "
                             "corpus tokenizer's kind: BPE, byte fallback, identity normalization)")
    return tok, sp


def write_tokenizer(model_path: str, out_dir: str, model_max_length: int, vocab_size: Optional[int] = None) -> dict:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``tokenizer.model`` into ``out_dir``;
    returns the special ids (``bos_token_id``, ``eos_token_id``, ``unk_token_id``). ``vocab_size``:
    the model's (unpadded) vocabulary, which must be the tokenizer's."""
    tok, sp = build_tokenizer(model_path)
    if vocab_size is not None and sp.get_piece_size() != vocab_size:
        raise ValueError(f"--tokenizer-model {model_path}: {sp.get_piece_size()} pieces, the model's vocabulary "
                         f"has {vocab_size} (another tokenizer than the run's --data-path was made with)")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f"tokenizer.json.tmp{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    name = {i: sp.id_to_piece(i) if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name[sp.bos_id()],
              "eos_token": name[sp.eos_id()], "unk_token": name[sp.unk_id()],
              "pad_token": name[sp.pad_id()], "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": int(model_max_length)}
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=1) + "\n")
    return {k: v for k, v in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()),
                              ("unk_token_id", sp.unk_id())) if v >= 0}
