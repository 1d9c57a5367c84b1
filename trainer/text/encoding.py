"""Captions to text-encoder outputs, the way ComfyUI encodes a prompt at inference.

SELMA's paragraph-style captions run past CLIP's 77 tokens. diffusers' training scripts cut them
at 77; ComfyUI, where the expert is used, does not: it splits the prompt's tokens into pieces of
75, gives each piece its own start and end token, pads it to 77, encodes each piece and
concatenates the outputs along the sequence (``comfy/sd1_clip.py``, ``SDTokenizer``). Training on
the same encoding teaches the expert what it will be asked. The modes (``caption_encoding``):

- ``chunks`` — ComfyUI's encoding, exactly (for captions without ComfyUI's ``(word:1.2)`` emphasis
  syntax, which is not interpreted here).
- ``sentences`` — each sentence encoded as its own piece(s), concatenated: at inference, the same
  is ComfyUI's Conditioning (Concat) of one CLIP Text Encode per sentence. Each piece keeps its end
  token and padding, so this is not LongAlign's segment encoding (which drops them). Its first
  name was ``segments``, still read from config files, flags and saved workflows.
- ``truncate`` — the first 75 tokens only, as diffusers' scripts train.

Which hidden state each family uses, as in both ComfyUI and diffusers: SD 1.x the last layer
(after the final layer norm); SD 2.x the last layer of diffusers' 23-layer encoder (= ComfyUI's
penultimate of 24, normed); SDXL the penultimate layer of both encoders, un-normed, concatenated
along features, and the projected pooled output of the second encoder's first piece.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHUNK_LENGTH = 77
TOKENS_PER_CHUNK = CHUNK_LENGTH - 2
MODES = ("chunks", "sentences", "truncate")
RENAMED_MODES = {"segments": "sentences"}  # old name -> current name
# The name a mode's cached encodings are keyed by: a renamed mode keeps its first name, so the caches
# written before the rename are found (the encoding did not change).
_CACHE_NAMES = {current: old for old, current in RENAMED_MODES.items()}
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(caption: str) -> list[str]:
    """The caption's sentences (split after ``.``, ``!``, ``?`` or ``;`` followed by white space)."""
    return [part.strip() for part in _SENTENCE_END.split(caption.strip()) if part.strip()] or [""]


def chunk_token_ids(token_ids: Sequence[int], tokens_per_chunk: int = TOKENS_PER_CHUNK) -> list[list[int]]:
    """Token ids (no specials) → consecutive chunks of at most ``tokens_per_chunk``; empty → one empty chunk.

    ComfyUI (``SDTokenizer.tokenize_with_weights``) tokenizes an unweighted prompt as one group and
    cuts it every 75 tokens, wherever a word ends (checked against ComfyUI's own tokenizers in the
    integration tier).
    """
    return [list(token_ids[offset:offset + tokens_per_chunk])
            for offset in range(0, len(token_ids), tokens_per_chunk)] or [[]]


def caption_token_ids(tokenizer, text: str) -> list[int]:
    """``text``'s token ids without start/end tokens."""
    # split_special_tokens: OpenCLIP tokenizers register their pad token "!" as special, so a caption's
    # "!" would become the pad id 0; ComfyUI's tokenizer (and CLIP's BPE) reads it as "!</w>" (256).
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                     split_special_tokens=True)["input_ids"]


def cache_name(mode: str) -> str:
    """The name caches of ``mode``'s encodings are keyed by; a mode's old and current names give the same."""
    current = RENAMED_MODES.get(mode, mode)
    return _CACHE_NAMES.get(current, current)


def caption_pieces(tokenizer, caption: str, mode: str = "chunks") -> list[list[int]]:
    """The pieces ``caption`` is encoded as, each ``[start, tokens..., end]`` and not yet padded."""
    if mode == "sentences":
        chunks = [chunk for sentence in split_sentences(caption)
                  for chunk in chunk_token_ids(caption_token_ids(tokenizer, sentence))]
    elif mode in ("chunks", "truncate"):
        chunks = chunk_token_ids(caption_token_ids(tokenizer, caption))
        chunks = chunks[:1] if mode == "truncate" else chunks
    else:
        raise ValueError(f"caption_encoding: {mode!r}; expected one of {', '.join(MODES)}")
    return [[tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] for chunk in chunks]


def caption_chunks(tokenizer, caption: str, mode: str = "chunks") -> list[list[int]]:
    """The 77-token pieces ``caption`` is encoded as, for one CLIP tokenizer, in ``mode`` (padded).

    An empty caption is one piece ``[start, end, pad...]``, as ComfyUI encodes an empty prompt.
    """
    return [piece + [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(piece))
            for piece in caption_pieces(tokenizer, caption, mode)]


@dataclass
class EncodedCaption:
    """One caption's conditioning: ``hidden`` ``[pieces * 77, features]``; ``pooled`` for SDXL."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


class CaptionEncoder:
    """Encodes captions with a model's text encoder(s), piece by piece, in the chosen mode.

    ``text_encoders`` and ``tokenizers`` are the pipeline's, in order (SDXL: CLIP-L then OpenCLIP
    bigG). Both SDXL tokenizers share CLIP's vocabulary, so a caption has the same number of pieces
    for both.
    """

    def __init__(self, architecture: str, tokenizers: list, text_encoders: list, mode: str = "chunks",
                 device=None) -> None:
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("CaptionEncoder: expected one tokenizer per text encoder")
        self.architecture = architecture
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders  # may be wrapped for data-parallel training, hence ``device``
        self.mode = mode
        self.device = device

    def token_pieces(self, captions: list[str]) -> list[list[list[list[int]]]]:
        """``[encoder][caption][piece]`` → 77 token ids."""
        pieces = [[caption_chunks(tokenizer, caption, self.mode) for caption in captions]
                  for tokenizer in self.tokenizers]
        for caption_index in range(len(captions)):
            counts = {len(per_encoder[caption_index]) for per_encoder in pieces}
            if len(counts) != 1:
                raise ValueError(f"caption {caption_index}: the tokenizers split it into {sorted(counts)} pieces; "
                                 "expected the same count (they share CLIP's vocabulary)")
        return pieces

    def encode(self, captions: list[str]) -> list[EncodedCaption]:
        """Encode ``captions``; gradients flow when the encoders are trainable (text-encoder LoRA)."""
        import torch

        pieces = self.token_pieces(captions)
        counts = [len(per_caption) for per_caption in pieces[0]]
        per_encoder_hidden = []
        pooled = None
        for encoder_index, (encoder, encoder_pieces) in enumerate(zip(self.text_encoders, pieces)):
            ids = torch.tensor([piece for per_caption in encoder_pieces for piece in per_caption],
                               dtype=torch.long, device=self.device or encoder.device)
            if self.architecture == "sdxl":
                output = encoder(ids, output_hidden_states=True)
                hidden = output.hidden_states[-2]
                if encoder_index == len(self.text_encoders) - 1:
                    pooled = output[0]  # text_embeds: the projected pooled output
            else:
                hidden = encoder(ids)[0]  # last_hidden_state, after the final layer norm
            per_encoder_hidden.append(hidden)
        hidden = torch.cat(per_encoder_hidden, dim=-1) if len(per_encoder_hidden) > 1 else per_encoder_hidden[0]
        encoded = []
        offset = 0
        for count in counts:
            caption_hidden = hidden[offset:offset + count].reshape(count * CHUNK_LENGTH, hidden.shape[-1])
            caption_pooled = pooled[offset] if pooled is not None else None  # the first piece's, as ComfyUI
            encoded.append(EncodedCaption(caption_hidden, caption_pooled))
            offset += count
        return encoded


def stack_conditioning(hidden_states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch captions of different lengths: ``(hidden [batch, longest, features], mask or None)``.

    Equal lengths stack as they are. Otherwise each is zero-padded to the longest and a cross-attention
    mask (True = attend) hides the padding, so each image attends to exactly its own caption's tokens
    — the same attention ComfyUI computes for that caption alone.
    """
    import torch

    lengths = [hidden.shape[0] for hidden in hidden_states]
    if len(set(lengths)) == 1:
        return torch.stack(hidden_states), None
    longest = max(lengths)
    batch = hidden_states[0].new_zeros((len(hidden_states), longest, hidden_states[0].shape[-1]))
    mask = torch.zeros((len(hidden_states), longest), dtype=torch.bool, device=batch.device)
    for index, hidden in enumerate(hidden_states):
        batch[index, :hidden.shape[0]] = hidden
        mask[index, :hidden.shape[0]] = True
    return batch, mask
