"""CLIP BPE tokenization from a checkpoint's ``tokenizer/`` folder, offline, padded to the model length."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class Tokenizer:
    """Prompts -> int32 ids [B, max_length]: BOS, BPE tokens, EOS, then padding.

    Prompts longer than the model's context are truncated (keeping the EOS) with a warning that
    says what was dropped, as diffusers' pipelines do.
    """

    def __init__(self, folder, max_length: int | None = None):

        folder = Path(folder)
        if not (folder / "vocab.json").exists() and not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{folder}: not a CLIP tokenizer folder (no vocab.json or tokenizer.json)"
            )
        self._tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_length = int(max_length or min(self._tok.model_max_length, 10_000))
        self.pad_id = self._tok.pad_token_id
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        full = self._tok(prompts, add_special_tokens=True)["input_ids"]
        for ids in full:
            if len(ids) > self.max_length:
                dropped = self._tok.decode(ids[self.max_length - 1 : -1])
                warnings.warn(
                    f"prompt truncated to {self.max_length} tokens; dropped: {dropped!r}",
                    stacklevel=2,
                )
        out = self._tok(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="np",
        )["input_ids"]
        return out.astype(np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode(
            [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        )


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: printable bytes map to themselves, the rest to code points >= 256.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def default_bpe_path() -> Path:
    """The OpenAI CLIP merges file shipped inside the open-clip-torch wheel (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "bpe_simple_vocab_16e6.txt.gz not found: install open-clip-torch "
            "(pip install --no-deps open-clip-torch) or pass bpe_path"
        )
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def _openai_merges(bpe_path=None) -> list[str]:
    lines = gzip.open(bpe_path or default_bpe_path()).read().decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


def _write_folder(folder, merges: list[str], max_length: int, pad_token: str) -> Path:
    """A transformers CLIPTokenizer folder: byte tokens, their end-of-word forms, the merges, BOS, EOS."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": pad_token,
                "do_lower_case": True,
            }
        ),
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
        ),
    }
    for name, text in files.items():
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return folder


def write_clip_tokenizer(folder, bpe_path=None, max_length: int = 77, pad_token: str = EOS) -> Path:
    """Write a transformers CLIP tokenizer folder (vocab.json, merges.txt, configs) from OpenAI's BPE
    merges: the 49,408-token vocabulary of every SD 1.x/2.x checkpoint. SD 2.x pads with '!'."""
    return _write_folder(folder, _openai_merges(bpe_path), max_length, pad_token)


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one lower-case word (end-of-word marked as ``</w>``)."""
    parts, used = list(word[:-1]) + [word[-1] + "</w>"], []
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        first, second = parts[i], parts[i + 1]
        used.append((first, second))
        merged, j = [], 0
        while j < len(parts):  # merge every occurrence of the pair, left to right
            if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return used


def write_small_clip_tokenizer(folder, words, bpe_path=None, max_length: int = 77) -> Path:
    """A CLIP BPE tokenizer whose vocabulary is the 512 byte tokens plus only the merges ``words`` need.

    Every listed word tokenizes exactly as OpenAI's 49,408-token vocabulary splits it (BPE applies
    the lowest-ranked merge present; keeping every merge a word uses, in rank order, replays the same
    sequence), under ids that stop at a few hundred: a small model's embedding table stays small.
    Any other text still tokenizes, into smaller pieces (down to single bytes).
    """
    merges = _openai_merges(bpe_path)
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    used = set()
    for w in words:
        if not w or not w.isascii() or w.lower() != w or not w.isalpha():
            raise ValueError(f"write_small_clip_tokenizer: {w!r} is not a lower-case ASCII word")
        used.update(_bpe_merges_used(w, ranks))
    return _write_folder(folder, [m for m in merges if tuple(m.split()) in used], max_length, EOS)
