"""ROUGE-L F-measure, equal bit for bit to ``rouge_score``'s, computed with a bit-parallel LCS.

SELMA keeps a candidate prompt only if its ROUGE-L F-measure against every kept prompt is at most
0.8, using ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``. Its LCS is a
pure-Python dynamic programme: 140 s to filter 500 paragraph prompts on a laptop-class CPU. Here
the same score comes from:

- rouge-score's own tokenizer (``rouge_score.tokenize.tokenize`` without a stemmer: lowercase,
  non-alphanumerics become spaces, tokens must match ``[a-z0-9]+``);
- each distinct token mapped to one character, so a prompt becomes a short string and rapidfuzz's
  bit-parallel LCS (``LCSseq.similarity``) compares whole token sequences in C++;
- exactly rouge-score's float arithmetic: ``precision = lcs / len(prediction)``,
  ``recall = lcs / len(target)``, ``F = 2 * precision * recall / (precision + recall)``, 0 when
  either side has no tokens or nothing matches. That is not ``2 * lcs / (m + n)``: the two differ
  in the last bit, and at the 0.8 boundary that decides whether a prompt is kept.

``F`` is symmetric bit for bit (swapping target and prediction swaps precision and recall; the
products and the sum are the same floats), so callers need not care which side is which.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Union

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as _rouge_tokenize

# One token is one character of a Python string; beyond the last code point a sequence is a list
# of integer ids instead (rapidfuzz compares both kinds by value, so they mix).
_LAST_CODE_POINT = 0x10FFFF
EncodedTokens = Union[str, list[int]]


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokens of ``text`` with no stemming: what ROUGE-L compares."""
    return _rouge_tokenize.tokenize(text, None)


def fmeasure_from_lcs(lcs_length: int, target_length: int, prediction_length: int) -> float:
    """rouge-score's ``_score_lcs`` F-measure from an LCS length, with its exact arithmetic."""
    if target_length == 0 or prediction_length == 0:
        return 0.0
    precision = lcs_length / prediction_length
    recall = lcs_length / target_length
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_fmeasure(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of two texts, as ``RougeScorer(["rougeL"]).score(target, prediction)``."""
    encoder = TokenEncoder()
    target_encoded = encoder.encode(rouge_tokens(target))
    prediction_encoded = encoder.encode(rouge_tokens(prediction))
    lcs_length = LCSseq.similarity(target_encoded, prediction_encoded) if target_encoded and prediction_encoded else 0
    return fmeasure_from_lcs(lcs_length, len(target_encoded), len(prediction_encoded))


def fmeasures_from_lcs(lcs_lengths: np.ndarray, target_length: int, prediction_lengths: np.ndarray) -> np.ndarray:
    """Vectorised :func:`fmeasure_from_lcs`: one target against many predictions.

    numpy's float64 division, multiplication and addition are IEEE-754 correctly rounded, like
    Python's, and the operations run in rouge-score's order, so every element equals the scalar
    function's result bit for bit.
    """
    scores = np.zeros(len(lcs_lengths), dtype=np.float64)
    if target_length == 0 or len(lcs_lengths) == 0:
        return scores
    lcs_float = lcs_lengths.astype(np.float64)
    matched = lcs_lengths > 0  # lcs > 0 implies both lengths > 0, so precision + recall > 0
    precision = lcs_float[matched] / prediction_lengths[matched].astype(np.float64)
    recall = lcs_float[matched] / float(target_length)
    scores[matched] = 2.0 * precision * recall / (precision + recall)
    return scores


class TokenEncoder:
    """Maps token strings to integer ids and token sequences to strings of one character per token.

    Ids only need to be consistent within one pool; which token gets which id changes the speed,
    not the result. rapidfuzz looks characters below 256 up in a flat table and the rest in a hash
    map (about 6x slower on paragraphs), so :meth:`ranked_by_frequency` gives the most frequent
    tokens the smallest ids.
    """

    def __init__(self, ids: dict[str, int] | None = None) -> None:
        self.ids: dict[str, int] = dict(ids or {})

    def token_id(self, token: str) -> int:
        token_id = self.ids.get(token)
        if token_id is None:
            token_id = self.ids[token] = len(self.ids)
        return token_id

    def encode(self, tokens: Sequence[str]) -> EncodedTokens:
        ids = self.ids
        try:
            token_ids = [ids[token] for token in tokens]
        except KeyError:
            token_ids = [self.token_id(token) for token in tokens]
        if not token_ids or max(token_ids) <= _LAST_CODE_POINT:
            return "".join(map(chr, token_ids))
        return token_ids

    @classmethod
    def ranked_by_frequency(cls, token_lists: Iterable[Sequence[str]]) -> "TokenEncoder":
        """An encoder whose ids follow token frequency in ``token_lists`` (ties: first seen first)."""
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        # Counter.most_common keeps first-insertion order among equal counts: deterministic.
        return cls({token: rank for rank, (token, _) in enumerate(counts.most_common())})


def lcs_lengths(queries: Sequence[EncodedTokens], choices: Sequence[EncodedTokens], workers: int = 1) -> np.ndarray:
    """LCS length of every query against every choice, as an ``int32`` matrix [queries, choices]."""
    if not queries or not choices:
        return np.zeros((len(queries), len(choices)), dtype=np.int32)
    return process.cdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)
