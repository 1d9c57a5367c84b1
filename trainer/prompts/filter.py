"""SELMA's greedy diversity filter: keep a prompt only if nothing kept so far is too close to it.

Candidates are judged one at a time, in order, against every prompt kept before them (SELMA §3.1,
as released: drop a candidate whose ROUGE-L F-measure against any kept prompt is above 0.8), and
against an optional blocklist (e.g. a benchmark's test prompts, so generated training prompts do
not leak the evaluation). A rejected candidate is counted under one reason, checked in this order:

- ``empty``: nothing but white space;
- ``too_long``: more words (white-space separated) than ``max_words`` (0: no limit);
- ``duplicate``: the same rouge-score tokens as a kept prompt (``"A cat."`` = ``"a cat"``);
- ``blocklisted``: ROUGE-L F above the threshold against a blocklisted prompt;
- ``similar``: ROUGE-L F above the threshold against a kept prompt.

The kept pool is tokenised and encoded once (:mod:`.rouge`), so each candidate costs one
bit-parallel LCS per kept prompt. :meth:`PromptFilter.consider_many` judges a whole LLM reply with
one call into rapidfuzz and gives exactly the verdicts of calling :meth:`consider` in a loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .rouge import EncodedTokens, TokenEncoder, fmeasures_from_lcs, lcs_lengths, rouge_tokens

REJECTION_REASONS = ("empty", "too_long", "duplicate", "blocklisted", "similar")
DEFAULT_THRESHOLD = 0.8
PARALLEL_PAIRS = 100_000  # from this many candidate-pool pairs in one call, compare on every core


def check_threshold(threshold: float, field: str = "threshold") -> float:
    """Return ``threshold`` if it lies in (0, 1]; raise a message naming ``field`` otherwise."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"{field}: {threshold!r} is outside (0, 1]; expected a ROUGE-L F-measure such as 0.8 "
                         "(a candidate is dropped when its score against a kept prompt is above it)")
    return float(threshold)


@dataclass(frozen=True)
class Verdict:
    """What the filter decided about one candidate.

    ``max_rouge_l`` is the highest ROUGE-L F against the kept prompts (for a kept candidate: against
    those kept before it; 0.0 when there were none); for a blocklisted one it is the highest score
    against the blocklist. ``closest`` is the prompt that score was reached against, if any.
    """

    prompt: str
    accepted: bool
    reason: str | None
    max_rouge_l: float
    closest: str | None = None


class _Pool:
    """Prompts with their rouge-score tokens, encoded for rapidfuzz, growing by appends."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.tokens: list[list[str]] = []
        self.encoded: list[EncodedTokens] = []
        self._lengths = np.zeros(64, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths[: len(self.prompts)]

    def append(self, prompt: str, tokens: list[str], encoded: EncodedTokens) -> None:
        if len(self.prompts) == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros(len(self._lengths), dtype=np.int64)])
        self._lengths[len(self.prompts)] = len(tokens)
        self.prompts.append(prompt)
        self.tokens.append(tokens)
        self.encoded.append(encoded)

    def reencode(self, encoder: TokenEncoder) -> None:
        self.encoded = [encoder.encode(tokens) for tokens in self.tokens]


def _duplicate_key(prompt: str, tokens: list[str]) -> str:
    # Prompts without a single [a-z0-9] token (e.g. in another script) compare by their text.
    return " ".join(tokens) if tokens else " ".join(prompt.casefold().split())


class PromptFilter:
    """Greedy keep/reject of candidates against the kept pool and a blocklist.

    ``workers`` is rapidfuzz's thread count for comparing a chunk of candidates with the pool; the
    default (None) uses one thread for small comparisons, where threads cost more than they save,
    and every core (``-1``) from :data:`PARALLEL_PAIRS` pairs up (1.4x on 2 cores at 3,000
    paragraphs).
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, blocklist: Iterable[str] = (), max_words: int = 0,
                 workers: int | None = None) -> None:
        self.threshold = check_threshold(threshold)
        if max_words < 0:
            raise ValueError(f"max_words: {max_words!r} is negative; expected 0 (no limit) or a word count")
        self.max_words = max_words
        self.workers = workers
        self.rejected: Counter[str] = Counter({reason: 0 for reason in REJECTION_REASONS})
        self._encoder = TokenEncoder()
        self._kept = _Pool()
        self._blocklist = _Pool()
        self._kept_keys: dict[str, str] = {}  # duplicate key -> the kept prompt that has it
        self._blocklist_keys: dict[str, str] = {}
        self._next_rebalance = 64
        for prompt in blocklist:
            if prompt.strip():
                tokens = rouge_tokens(prompt)
                self._blocklist.append(prompt, tokens, self._encoder.encode(tokens))
                self._blocklist_keys.setdefault(_duplicate_key(prompt, tokens), prompt)
        self._rebalance()

    @property
    def kept(self) -> list[str]:
        return list(self._kept.prompts)

    @property
    def kept_count(self) -> int:
        return len(self._kept)

    @property
    def blocklist_size(self) -> int:
        return len(self._blocklist)

    def keep(self, prompt: str) -> None:
        """Add ``prompt`` to the kept pool unjudged (seed prompts, a resumed file)."""
        tokens = rouge_tokens(prompt)
        self._add(prompt, tokens)

    def blocklist_score(self, prompt: str) -> tuple[float, str | None]:
        """Highest ROUGE-L F of ``prompt`` against the blocklist, and the prompt reaching it."""
        return self._best_match(prompt, self._blocklist)

    def kept_score(self, prompt: str) -> tuple[float, str | None]:
        """Highest ROUGE-L F of ``prompt`` against the kept pool, and the prompt reaching it (not judged)."""
        return self._best_match(prompt, self._kept)

    def _best_match(self, prompt: str, pool: _Pool) -> tuple[float, str | None]:
        tokens = rouge_tokens(prompt)
        if not len(pool):
            return 0.0, None
        lcs = lcs_lengths([self._encoder.encode(tokens)], pool.encoded, 1)[0]
        return self._best(fmeasures_from_lcs(lcs, len(tokens), pool.lengths), pool)

    def consider(self, prompt: str) -> Verdict:
        """Judge one candidate; a kept one joins the pool at once."""
        return self.consider_many([prompt])[0]

    def consider_many(self, prompts: Sequence[str], accept_at_most: int | None = None) -> list[Verdict]:
        """Judge candidates in order, each against the pool as it stands after the ones before it.

        With ``accept_at_most``, judging stops once that many were kept: the candidates after that
        get no verdict and are not counted. Candidates go in chunks: the LCS of a whole chunk against
        the pool as it was on entry is one call into rapidfuzz; each candidate then only adds the
        comparisons with the candidates kept before it in its chunk. The verdicts are those of
        calling :meth:`consider` one by one.
        """
        verdicts: list[Verdict] = []
        accepted = 0
        start = 0
        while start < len(prompts) and (accept_at_most is None or accepted < accept_at_most):
            size = self.CHUNK
            if accept_at_most is not None:  # judging k candidates keeps at most k: the cut lands exactly
                size = min(size, accept_at_most - accepted)
            chunk = prompts[start:start + size]
            chunk_verdicts = self._consider_chunk(chunk)
            verdicts += chunk_verdicts
            accepted += sum(verdict.accepted for verdict in chunk_verdicts)
            start += len(chunk)
            if len(self._kept) >= self._next_rebalance:
                self._rebalance()
        return verdicts

    CHUNK = 32

    def _consider_chunk(self, prompts: Sequence[str]) -> list[Verdict]:
        # No rebalancing inside a chunk: candidates and pool share one encoding throughout.
        prepared = []
        for prompt in prompts:
            reason = None
            tokens: list[str] = []
            if not prompt.strip():
                reason = "empty"
            elif self.max_words and len(prompt.split()) > self.max_words:
                reason = "too_long"
            else:
                tokens = rouge_tokens(prompt)
            prepared.append((prompt, reason, tokens, self._encoder.encode(tokens)))

        judged_indices = [index for index, item in enumerate(prepared) if item[1] is None]
        judged_encoded = [prepared[index][3] for index in judged_indices]
        pool_size_on_entry = len(self._kept)
        against_pool = dict(zip(judged_indices, lcs_lengths(judged_encoded, self._kept.encoded,
                                                            self._workers_for(len(judged_encoded), len(self._kept)))))
        against_blocklist = dict(zip(judged_indices, lcs_lengths(
            judged_encoded, self._blocklist.encoded, self._workers_for(len(judged_encoded), len(self._blocklist)))))
        verdicts = []
        for index, (prompt, reason, tokens, encoded) in enumerate(prepared):
            if reason is not None:
                self.rejected[reason] += 1
                verdicts.append(Verdict(prompt, False, reason, 0.0))
                continue
            key = _duplicate_key(prompt, tokens)
            if key in self._kept_keys:
                self.rejected["duplicate"] += 1
                verdicts.append(Verdict(prompt, False, "duplicate", 1.0, self._kept_keys[key]))
                continue
            if key in self._blocklist_keys:
                self.rejected["blocklisted"] += 1
                verdicts.append(Verdict(prompt, False, "blocklisted", 1.0, self._blocklist_keys[key]))
                continue
            if len(self._blocklist):
                scores = fmeasures_from_lcs(against_blocklist[index], len(tokens), self._blocklist.lengths)
                best_score, closest = self._best(scores, self._blocklist)
                if best_score > self.threshold:
                    self.rejected["blocklisted"] += 1
                    verdicts.append(Verdict(prompt, False, "blocklisted", best_score, closest))
                    continue
            lcs = against_pool[index] if pool_size_on_entry else np.zeros(0, dtype=np.int32)
            if len(self._kept) > pool_size_on_entry:  # candidates kept earlier in this chunk
                newer = lcs_lengths([encoded], self._kept.encoded[pool_size_on_entry:], 1)[0]
                lcs = np.concatenate([lcs, newer])
            scores = fmeasures_from_lcs(lcs, len(tokens), self._kept.lengths)
            best_score, closest = self._best(scores, self._kept)
            if best_score > self.threshold:
                self.rejected["similar"] += 1
                verdicts.append(Verdict(prompt, False, "similar", best_score, closest))
                continue
            self._kept.append(prompt, tokens, encoded)
            self._kept_keys.setdefault(key, prompt)
            verdicts.append(Verdict(prompt, True, None, best_score, closest))
        return verdicts

    def _workers_for(self, queries: int, choices: int) -> int:
        if self.workers is not None:
            return self.workers
        return -1 if queries * choices >= PARALLEL_PAIRS else 1

    def _add(self, prompt: str, tokens: list[str]) -> None:
        self._kept.append(prompt, tokens, self._encoder.encode(tokens))
        self._kept_keys.setdefault(_duplicate_key(prompt, tokens), prompt)
        if len(self._kept) >= self._next_rebalance:
            self._rebalance()

    def _rebalance(self) -> None:
        """Give the most frequent tokens the smallest ids (rapidfuzz's fast path); results unchanged."""
        self._encoder = TokenEncoder.ranked_by_frequency(self._kept.tokens + self._blocklist.tokens)
        self._kept.reencode(self._encoder)
        self._blocklist.reencode(self._encoder)
        self._next_rebalance = max(64, 2 * len(self._kept))

    @staticmethod
    def _best(scores: np.ndarray, pool: _Pool) -> tuple[float, str | None]:
        if not len(scores):
            return 0.0, None
        best = int(np.argmax(scores))
        return float(scores[best]), pool.prompts[best] if scores[best] > 0 else None


def filter_prompts(prompts: Iterable[str], threshold: float = DEFAULT_THRESHOLD, blocklist: Iterable[str] = (),
                   max_words: int = 0) -> tuple[list[Verdict], Counter[str]]:
    """The greedy filter alone, in the given order: every verdict, and the rejections by reason."""
    prompt_filter = PromptFilter(threshold, blocklist, max_words)
    verdicts = prompt_filter.consider_many(list(prompts))
    return verdicts, prompt_filter.rejected
