"""Texts -> token ids with the model's tokenizer, cached on disk.

Tokenization uses the model's fast tokenizer (the same Rust tokenizer as transformers' BertTokenizerFast) with
truncation (``longest_first`` for pairs), or cuts the untruncated encodings (flaxclf.data.long_text), and is
cached as .npz keyed by a hash of the tokenized texts, of the tokenizer files and of the length settings. Every
split also keeps each text's untruncated length, for the report of how many texts are cut.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from flaxclf import assets
from flaxclf.data import long_text
from flaxclf.data.long_text import LongText
from flaxclf.data.types import DataError
from flaxclf.runtime.outputs import apply_umask

# A SentencePiece model alone (DeBERTa-v3's spm.model, ALBERT's spiece.model, XLM-R's sentencepiece.bpe.model) is
# converted to a fast tokenizer by transformers, which needs the sentencepiece and protobuf packages for it.
SENTENCEPIECE_FILES = ("spm.model", "spiece.model", "sentencepiece.bpe.model")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                    *SENTENCEPIECE_FILES)
_CACHE_VERSION = "2"
_ARRAYS = ("input_ids", "token_type_ids", "offsets", "full_lengths", "doc")
# BertTokenizerFast's arguments (with its defaults) and the normalizer fields it rebuilds them into.
_BERT_NORMALIZER = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                    "tokenize_chinese_chars": ("handle_chinese_chars", True)}


def require_tokenizer(model_dir: Path) -> None:
    """Refuses a model folder saved without its tokenizer, or with a SentencePiece model alone where this
    environment can't convert it (cheap: no file is parsed)."""
    if any((model_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        return
    spm = [n for n in SENTENCEPIECE_FILES if (model_dir / n).is_file()]
    if not spm:
        raise DataError(f"model folder {model_dir} has no tokenizer.json, vocab.txt or SentencePiece model; save "
                        f"the tokenizer with the model (tokenizer.save_pretrained)")
    if not (_importable("sentencepiece") and _importable("google.protobuf")):
        raise DataError(f"model folder {model_dir} has only {spm[0]} (a SentencePiece model), and converting it to "
                        f"a fast tokenizer needs pip install sentencepiece protobuf; or save tokenizer.json with "
                        f"the model (tokenizer.save_pretrained where those are installed)")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (google) is missing
        return False


def load_tokenizer(model_dir: Path, max_length: int):
    """The model's fast tokenizer (a `tokenizers.Tokenizer`) set to truncate to max_length, never pad."""
    require_tokenizer(model_dir)
    tok = _bert_tokenizer_json(model_dir)
    if tok is None:  # no tokenizer.json, or one that BertTokenizerFast would adjust: let transformers build it
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok


def _bert_tokenizer_json(model_dir: Path):
    """tokenizer.json loaded directly (fast: no transformers import) when it is a BERT tokenizer that
    BertTokenizerFast would use unchanged; otherwise None."""
    from tokenizers import Tokenizer

    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not (model_dir / "tokenizer.json").is_file() or cfg.get("tokenizer_class", "BertTokenizer") not in (
            "BertTokenizer", "BertTokenizerFast"):
        return None
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    norm = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else {}
    for arg, (key, default) in _BERT_NORMALIZER.items():
        if norm.get(key, cfg.get(arg, default)) != cfg.get(arg, default):
            return None
    return tok


def encode(tok, texts: list[str], pairs: list[str] | None) -> dict[str, np.ndarray]:
    """Encodes rows in chunks; returns the concatenated ids, type ids and row offsets."""
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets (tokenizers>=0.21)
    encs = []
    for start in range(0, len(texts), 4096):
        chunk = texts[start:start + 4096]
        encs += encode_batch(list(zip(chunk, pairs[start:start + 4096], strict=True)) if pairs is not None else chunk)
    ids = [e.ids for e in encs]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    total = int(offsets[-1])
    flat = itertools.chain.from_iterable
    return {"input_ids": np.fromiter(flat(ids), np.int32, count=total),
            "token_type_ids": np.fromiter(flat(e.type_ids for e in encs), np.int8, count=total),
            "offsets": offsets}


def _untruncated(tok):
    full = type(tok).from_str(tok.to_str())
    full.no_truncation()
    return full


def tokenize(tok, texts: list[str], pairs: list[str] | None, spec: LongText) -> dict[str, np.ndarray]:
    """The rows as the settings ask: input_ids, token_type_ids and offsets of each row (a window, under
    chunks), full_lengths (each text's untruncated length, specials included) and doc (each row's text)."""
    full_tok = _untruncated(tok)
    full = encode(full_tok, texts, pairs)
    if spec.mode == "truncate":
        out = encode(tok, texts, pairs) if (np.diff(full["offsets"]) > spec.max_length).any() else dict(full)
        doc = np.arange(len(texts), dtype=np.int64)
    else:
        prefix, suffix = long_text.special_counts(full_tok)
        if spec.mode == "head_tail":
            out = long_text.head_tail(full, prefix, suffix, spec.max_length, spec.head_tokens)
            doc = np.arange(len(texts), dtype=np.int64)
        else:
            out, doc = long_text.chunks(full, prefix, suffix, spec.max_length, spec.stride)
    return {**out, "full_lengths": np.diff(full["offsets"]), "doc": doc}


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over the tokenizer files the model folder has."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + b"\0" + assets.sha256_file(model_dir / name).encode())
    return h.hexdigest()


def _content_hash(texts: list[str], pairs: list[str] | None, tok_hash: str, spec: LongText) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{tok_hash}|{spec.key()}|{pairs is not None}|{len(texts)}".encode())
    for i, t in enumerate(texts):
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        if pairs is not None:
            h.update(pairs[i].encode("utf-8", "surrogatepass") + b"\x01")
    return h.hexdigest()


def _cache_load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in _ARRAYS}
    except (OSError, KeyError, ValueError):
        return None  # absent or damaged: tokenize again


def _cache_save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes to a temporary file in the same folder, then renames: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        apply_umask(Path(tmp))  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize_cached(tok, tok_hash: str, texts: list[str], pairs: list[str] | None, spec: LongText,
                    cache_dir: Path, split: str) -> tuple[dict[str, np.ndarray], bool]:
    """tokenize()'s arrays, and whether they came from the .npz cache."""
    key = _content_hash(texts, pairs, tok_hash, spec)
    path = cache_dir / f"{split}-{key[:40]}.npz"
    hit = _cache_load(path)
    if hit is not None and len(hit["full_lengths"]) == len(texts):
        return hit, True
    try:
        arrays = tokenize(tok, texts, pairs, spec)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises plain Exception
        raise DataError(f"could not tokenize the {split} rows with max_length {spec.max_length} ({e}); raise "
                        f"data.max_length") from None
    _cache_save(path, arrays)
    return arrays, False
