"""Learn a CLIP-style byte-level BPE tokenizer (vocab.json + merges.txt) from captions.

The files follow OpenAI CLIP's conventions, so paddlenlp's stock ``CLIPTokenizer`` loads them:
every byte has a symbol (``bytes_to_unicode``) with and without the end-of-word marker ``</w>``, then
one vocabulary entry per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (the highest
id, as CLIP's pooling expects). Words seen in training become single tokens; any other text still
tokenizes, byte by byte at worst.
"""

from __future__ import annotations

import collections
import gzip
import importlib.util
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Same split as CLIP's tokenizer (letters runs, single digits, punctuation runs), on lowercased text.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


def bytes_to_unicode() -> Dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(captions: Iterable[str], max_merges: int = 2000) -> List[Tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent symbol pair (ties: smallest pair).

    Stops when no pair occurs or after ``max_merges``; returns the merges in order.
    """
    byte_map = bytes_to_unicode()
    freq = collections.Counter(w for c in captions for w in _WORD.findall(" ".join(c.lower().split())))
    words = {}
    for w, n in freq.items():
        sym = [byte_map[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        words[tuple(sym)] = n
    merges = []
    for _ in range(max_merges):
        pairs = collections.Counter()
        for sym, n in words.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for sym, n in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def save_tokenizer(folder: str, merges: List[Tuple[str, str]], model_max_length: int = 77) -> int:
    """Write vocab.json, merges.txt and the tokenizer configs; returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    encoder = {}
    for tok in vocab:  # a merge can reproduce an existing symbol only in theory; keep ids unique
        encoder.setdefault(tok, len(encoder))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "max_len": model_max_length,
              "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}
    for name in ("tokenizer_config.json",):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f, indent=2)
    return len(encoder)


# OpenAI CLIP's BPE merges, the list SD v1's tokenizer (openai/clip-vit-large-patch14's) is built from; open_clip ships
# it inside its package (requirements-kit.txt)
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary of 49 408 = 2 × 256 byte symbols + these merges + 2 specials


def find_clip_bpe() -> Optional[str]:
    """The path of open_clip's ``bpe_simple_vocab_16e6.txt.gz``, or None when open_clip is not installed.

    Found through the package's location alone: importing open_clip would import PyTorch.
    """
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, CLIP_BPE_FILE)
        if os.path.isfile(path):
            return path
    return None


def clip_merges(path: str) -> List[Tuple[str, str]]:
    """CLIP's merges from ``bpe_simple_vocab_16e6.txt.gz``: lines 1 … 48 894 (line 0 is a version header).

    ``save_tokenizer(folder, clip_merges(path))`` then writes the vocab.json and merges.txt of HF's
    ``openai/clip-vit-large-patch14`` (49 408 tokens; ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407).
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [n for n, m in enumerate(merges, 2) if len(m) != 2]
    if len(merges) != CLIP_NUM_MERGES or bad:
        raise ValueError(f"{path}: not CLIP's BPE file ({len(merges)} merges of {CLIP_NUM_MERGES}, "
                         f"{len(bad)} lines not a pair, e.g. line {bad[:1]}); reinstall open_clip_torch")
    return merges
