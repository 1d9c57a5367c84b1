"""The CLIP tokenizer, built offline from the BPE vocabulary shipped in ``trainer/data/clip``.

Every Stable Diffusion text encoder (CLIP ViT-L/14 for SD 1.x and SDXL's first encoder, OpenCLIP
ViT-H/14 for SD 2.x, OpenCLIP ViT-bigG/14 for SDXL's second) reads the same 49,408-token byte-level
BPE vocabulary. The hub copies of it are ``vocab.json`` + ``merges.txt``; we derive both from
open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, see ``data/clip/NOTICE.md``) exactly the way
open_clip's ``SimpleTokenizer`` does, so a single-file checkpoint loads without any download.

The folder is loaded with ``transformers.CLIPTokenizer.from_pretrained(folder)``: in transformers 5,
``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores both files.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

BPE_PATH = Path(__file__).resolve().parents[1] / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 49_408
MERGE_COUNT = 48_894
MODEL_MAX_LENGTH = 77
# open_clip keeps 49152 - 256 - 2 merges, skipping the file's header line (its SimpleTokenizer slice).
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, as CLIP's byte-level BPE does (open_clip, GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(code) for code in characters)))


def read_merges(bpe_path: str | os.PathLike[str] = BPE_PATH) -> list[tuple[str, str]]:
    """The BPE merge rules in rank order, the first 48,894 of the file (those CLIP was trained with)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as stream:
        lines = stream.read().split("\n")[_MERGE_LINES]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != MERGE_COUNT or any(len(pair) != 2 for pair in merges):
        raise ValueError(
            f"{bpe_path}: expected {MERGE_COUNT} merge lines of two symbols each; the file is not CLIP's BPE vocabulary"
        )
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token → id: the 256 byte symbols, the same with ``</w>``, every merged pair, then the two specials."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a CLIP vocabulary of {len(vocab)} tokens; expected {VOCAB_SIZE}")
    return vocab


def write_tokenizer_folder(folder: str | os.PathLike[str], pad_token: str = END_OF_TEXT) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt and the two token configs) into ``folder``.

    ``pad_token`` differs between the real models: OpenAI's CLIP-L tokenizer (SD 1.x, SDXL's first)
    pads with ``<|endoftext|>``, the OpenCLIP ones (SD 2.x, SDXL's second) pad with ``!`` (id 0).
    Padding changes the ids a prompt encodes to, so it must match the text encoder's training.
    """
    merges = read_merges()
    vocab = build_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; expected {END_OF_TEXT!r} or '!'")
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    special_tokens = {
        "bos_token": START_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": pad_token,
        "unk_token": END_OF_TEXT,
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        **special_tokens,
    }
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{first} {second}\n" for first, second in merges)
    (target / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    (target / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n", encoding="utf-8")
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return target
