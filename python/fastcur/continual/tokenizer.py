"""Tokenizers of the continual benchmark: a built-in byte-level one, and an adapter that gives a
Hugging Face tokenizer (for `--model DIR`) the same five members.

Both expose `pad_token_id`, `bos_token_id`, `eos_token_id`, `vocab_size`, `encode(text, add_bos,
add_eos) -> list[int]` and `decode(ids) -> str` (special tokens dropped). `bos_token_id` may be
None for a Hugging Face tokenizer that has no BOS token; `encode(add_bos=True)` then adds nothing.
"""
from __future__ import annotations

import os
from collections.abc import Iterable


class ByteTokenizer:
    """UTF-8 bytes 0..255 are tokens 0..255; pad = 256, bos = 257, eos = 258; vocab_size = 259.

    Every string round-trips exactly: `decode(encode(s)) == s`.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in _as_list(ids) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad=256, bos=257, eos=258)"


class HFTokenizerAdapter:
    """A Hugging Face tokenizer seen through the ByteTokenizer interface.

    A tokenizer without a pad token pads with its EOS token (padded positions are masked anyway).
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(hf_tokenizer).__name__} has no EOS token; the benchmark "
                             "needs one to end answers")
        self.eos_token_id = int(hf_tokenizer.eos_token_id)
        self.bos_token_id = None if hf_tokenizer.bos_token_id is None else int(hf_tokenizer.bos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_id if pad is None else int(pad)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(_as_list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizerAdapter({type(self.hf).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(model_dir: str | os.PathLike | None):
    """The built-in ByteTokenizer for `model_dir=None`, else the directory's Hugging Face tokenizer
    wrapped in HFTokenizerAdapter (loaded offline: local files only)."""
    if model_dir is None:
        return ByteTokenizer()
    path = os.fspath(model_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_dir: no such directory: {path!r}")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError("load_tokenizer(model_dir) needs `transformers` (pip install fastcur[hf])") from exc
    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model_dir: could not load a tokenizer from {path!r}: {exc}") from exc
    return HFTokenizerAdapter(hf)


def _as_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
