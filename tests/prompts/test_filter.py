"""The greedy filter keeps exactly what SELMA's released loop over rouge-score keeps, and says why it drops."""

from __future__ import annotations

import math
import random

import pytest
from rouge_score import rouge_scorer

from comfyui_selma.trainer.prompts.filter import REJECTION_REASONS, PromptFilter, check_threshold, filter_prompts
from comfyui_selma.trainer.backends.templates import template_prompts

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _reference_greedy(candidates: list[str], threshold: float) -> tuple[list[str], list[float]]:
    """SELMA's released loop: rouge-score against every kept prompt, drop when the max is above the threshold."""
    kept, kept_tokens, scores = [], [], []
    for candidate in candidates:
        tokens = SCORER._tokenizer.tokenize(candidate)
        values = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in kept_tokens]
        best = max(values, default=0.0)
        if best > threshold:
            continue
        kept.append(candidate)
        kept_tokens.append(tokens)
        scores.append(best)
    return kept, scores


def _candidates(count: int, seed: int) -> list[str]:
    """Template prompts plus near-copies of earlier ones, so many land near the threshold."""
    rng = random.Random(seed)
    prompts: list[str] = []
    request = 0
    while len(prompts) < count:
        for prompt in template_prompts("everyday_objects", seed, request, 20):
            prompts.append(prompt)
            if prompts and rng.random() < 0.4:
                words = rng.choice(prompts).split()
                position = rng.randrange(len(words))
                words[position] = rng.choice(("green", "old", "tiny", "the", "two"))
                prompts.append(" ".join(words))
        request += 1
    return prompts[:count]


@pytest.mark.slow
def test_greedy_filter_keeps_the_same_prompts_as_the_released_rouge_score_loop():
    candidates = _candidates(400, seed=1)
    verdicts, rejected = filter_prompts(candidates, threshold=0.8)
    kept = [verdict.prompt for verdict in verdicts if verdict.accepted]
    reference_kept, reference_scores = _reference_greedy(candidates, 0.8)
    assert kept == reference_kept
    assert [verdict.max_rouge_l for verdict in verdicts if verdict.accepted] == reference_scores
    assert rejected["similar"] + rejected["duplicate"] == len(candidates) - len(kept) > 30


def test_a_candidate_at_exactly_the_threshold_is_kept_and_one_a_last_bit_above_is_dropped():
    above = PromptFilter(0.8)
    above.keep("a red cat on mat")
    verdict = above.consider("a red dog on mat")  # LCS 4 of 5 and 5 tokens
    assert verdict.reason == "similar" and verdict.max_rouge_l == 0.8000000000000002
    at = PromptFilter(0.8)
    at.keep("red cat on mat")
    verdict = at.consider("a red cat sits on mat")  # LCS 4 of 4 and 6 tokens
    assert verdict.accepted and verdict.max_rouge_l == 0.8


def test_judging_a_batch_gives_the_verdicts_of_judging_one_by_one():
    candidates = _candidates(300, seed=2)  # crosses the pool's re-encoding points and chunk borders
    one_by_one = PromptFilter(0.7)
    batched = PromptFilter(0.7)
    singles = [one_by_one.consider(candidate) for candidate in candidates]
    assert batched.consider_many(candidates) == singles
    assert batched.kept == one_by_one.kept and batched.rejected == one_by_one.rejected


def test_every_rejection_is_counted_under_its_reason():
    prompt_filter = PromptFilter(0.8, blocklist=["A photo of three green apples on a white plate."], max_words=10)
    prompt_filter.keep("A yellow kayak on a pebble beach.")
    verdicts = prompt_filter.consider_many([
        "   ",  # empty
        "One two three four five six seven eight nine words here.",  # too long
        "a YELLOW kayak, on a pebble beach",  # duplicate: same tokens
        "A photo of three green apples on a plate.",  # close to the blocklist
        "A yellow kayak on a pebble beach today.",  # similar to a kept prompt
        "Two dogs chase a frisbee in a park.",  # kept
    ])
    assert [verdict.reason for verdict in verdicts] == ["empty", "too_long", "duplicate", "blocklisted", "similar",
                                                        None]
    assert dict(prompt_filter.rejected) == {reason: 1 for reason in REJECTION_REASONS}
    assert verdicts[3].closest == "A photo of three green apples on a white plate."
    assert prompt_filter.kept == ["A yellow kayak on a pebble beach.", "Two dogs chase a frisbee in a park."]


def test_exact_copies_are_dropped_even_at_threshold_one():
    prompt_filter = PromptFilter(1.0, blocklist=["a benchmark prompt"])
    prompt_filter.keep("a kept prompt")
    assert prompt_filter.consider("A kept prompt.").reason == "duplicate"
    assert prompt_filter.consider("a benchmark prompt!").reason == "blocklisted"
    assert prompt_filter.consider("a kept prompt here").accepted


def test_prompts_without_latin_words_compare_by_text():
    prompt_filter = PromptFilter(0.8)
    assert prompt_filter.consider("一只猫坐在垫子上").accepted
    assert prompt_filter.consider("一只猫坐在垫子上").reason == "duplicate"
    assert prompt_filter.consider("两只狗在公园里").accepted


def test_accepting_stops_exactly_at_the_limit_and_later_candidates_are_not_counted():
    prompt_filter = PromptFilter(0.8)
    candidates = template_prompts("counting", 0, 0, 20)
    verdicts = prompt_filter.consider_many(candidates, accept_at_most=5)
    assert prompt_filter.kept_count == 5
    assert sum(verdict.accepted for verdict in verdicts) == 5 and verdicts[-1].accepted
    assert sum(prompt_filter.rejected.values()) == len(verdicts) - 5


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, 1.01, 2, math.nan, True, "0.8"])
def test_threshold_outside_zero_to_one_is_refused_with_the_field_named(threshold):
    with pytest.raises(ValueError, match=r"threshold: .* outside \(0, 1\]"):
        check_threshold(threshold)
    with pytest.raises(ValueError, match="threshold"):
        PromptFilter(threshold)


def test_threshold_one_and_small_positive_thresholds_are_accepted():
    assert PromptFilter(1.0).threshold == 1.0
    assert PromptFilter(0.01).threshold == 0.01
