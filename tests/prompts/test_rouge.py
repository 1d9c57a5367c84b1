"""ROUGE-L from the bit-parallel LCS equals rouge-score's, bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from comfyui_selma.trainer.prompts.rouge import (
    TokenEncoder,
    fmeasure_from_lcs,
    fmeasures_from_lcs,
    lcs_lengths,
    rouge_l_fmeasure,
    rouge_tokens,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = ("a", "the", "red", "blue", "cat", "cats", "dog", "on", "under", "mat", "table", "of", "two", "3", "in",
         "running", "runs", "Cat", "DOG", "sky", "x1", "über", "naïve", "café")
PUNCTUATION = ("", "", "", ",", ".", "!", " -", "'s", "?", ";")


def _random_text(rng: random.Random, max_words: int) -> str:
    words = [rng.choice(WORDS) + rng.choice(PUNCTUATION) for _ in range(rng.randint(0, max_words))]
    return " ".join(words)


def _mutated(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randint(0, 3)):
        operation = rng.randrange(3)
        if operation == 0 and words:
            words.pop(rng.randrange(len(words)))
        elif operation == 1:
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        elif words:
            words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)


def _random_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        kind = index % 4
        if kind == 0:  # unrelated short texts, empty ones included
            pairs.append((_random_text(rng, 12), _random_text(rng, 12)))
        elif kind == 1:  # near-duplicates: scores crowd around the 0.8 boundary
            base = _random_text(rng, 15)
            pairs.append((base, _mutated(rng, base)))
        elif kind == 2:  # paragraphs longer than one 64-bit word of the bit-parallel LCS
            base = _random_text(rng, 100)
            pairs.append((base, _mutated(rng, base) if rng.random() < 0.5 else _random_text(rng, 100)))
        else:  # punctuation only, digits, odd spacing
            pairs.append((rng.choice(("", "!!!", "...", " ", "3 3 3", "A  b\tc\nd")), _random_text(rng, 6)))
    return pairs


def test_tokens_are_rouge_scores_own_without_stemming():
    for text in ("Two CATS, running on the mat!", "naïve café über-cool x1", "", "!!!", "It's 3-D"):
        assert rouge_tokens(text) == SCORER._tokenizer.tokenize(text)
    assert rouge_tokens("running cats") == ["running", "cats"]  # a stemmer would give "run", "cat"


@pytest.mark.slow
def test_fmeasure_equals_rouge_score_bit_for_bit_on_thousands_of_random_pairs():
    pairs = _random_pairs(4000, seed=7)
    differing = []
    for target, prediction in pairs:
        expected = SCORER.score(target, prediction)["rougeL"].fmeasure
        ours = rouge_l_fmeasure(target, prediction)
        if float(ours).hex() != float(expected).hex():
            differing.append((target, prediction, ours, expected))
    assert not differing, differing[:5]
    boundary = sum(abs(SCORER.score(t, p)["rougeL"].fmeasure - 0.8) < 1e-9 for t, p in pairs)
    assert boundary > 20, "the random pairs should reach the 0.8 boundary often"


@pytest.mark.slow
def test_vectorised_scores_against_a_pool_equal_rouge_score_bit_for_bit():
    rng = random.Random(11)
    pool = [_random_text(rng, 40) for _ in range(200)]
    pool += [_mutated(rng, text) for text in pool[:100]]
    encoder = TokenEncoder.ranked_by_frequency(rouge_tokens(text) for text in pool)
    encoded_pool = [encoder.encode(rouge_tokens(text)) for text in pool]
    lengths = np.array([len(rouge_tokens(text)) for text in pool])
    for candidate in [_mutated(rng, text) for text in pool[:30]] + ["", "!!!"]:
        tokens = rouge_tokens(candidate)
        lcs = lcs_lengths([encoder.encode(tokens)], encoded_pool)[0]
        scores = fmeasures_from_lcs(lcs, len(tokens), lengths)
        expected = [SCORER.score(candidate, text)["rougeL"].fmeasure for text in pool]
        assert [float(score).hex() for score in scores] == [float(value).hex() for value in expected]


def test_fmeasure_follows_rouge_score_not_two_lcs_over_total_length():
    # LCS 4 of 5 and 5 tokens: 2PR/(P+R) is 0.8000000000000002, 2*LCS/(m+n) is exactly 0.8
    target, prediction = "a red cat on mat", "a red dog on mat"
    assert rouge_l_fmeasure(target, prediction) == SCORER.score(target, prediction)["rougeL"].fmeasure
    assert rouge_l_fmeasure(target, prediction) == 0.8000000000000002 != 2 * 4 / 10
    # LCS 4 of 4 and 6 tokens: exactly 0.8 both ways
    assert rouge_l_fmeasure("red cat on mat", "a red cat sits on mat") == 0.8


def test_vectorised_arithmetic_equals_the_scalar_formula_for_every_small_length():
    for target_length in range(0, 41):
        prediction_lengths = np.repeat(np.arange(0, 41), 41)
        lcs = np.tile(np.arange(0, 41), 41)
        valid = lcs <= np.minimum(prediction_lengths, target_length)
        lcs, prediction_lengths = lcs[valid], prediction_lengths[valid]
        vectorised = fmeasures_from_lcs(lcs, target_length, prediction_lengths)
        scalar = [fmeasure_from_lcs(int(l), target_length, int(n)) for l, n in zip(lcs, prediction_lengths)]
        assert [float(value).hex() for value in vectorised] == [float(value).hex() for value in scalar]


def test_score_is_symmetric_bit_for_bit():
    for target, prediction in _random_pairs(500, seed=3):
        assert rouge_l_fmeasure(target, prediction).hex() == rouge_l_fmeasure(prediction, target).hex()


def test_token_ids_beyond_the_last_code_point_still_compare_correctly():
    encoder = TokenEncoder({"red": 0x10FFFF, "cat": 0x10FFFF + 5, "on": 3, "mat": 0x110000 + 70})
    first = encoder.encode(["red", "cat", "on", "mat"])
    second = encoder.encode(["red", "on", "mat"])
    third = encoder.encode(["red", "on"])  # only small ids: a string
    assert isinstance(first, list) and isinstance(third, str)
    assert lcs_lengths([first], [second, third]).tolist() == [[3, 2]]


def test_frequency_ranking_gives_common_tokens_the_smallest_ids():
    encoder = TokenEncoder.ranked_by_frequency([["x", "the", "cat"], ["the", "dog"], ["the", "cat"]])
    assert encoder.ids["the"] == 0 and encoder.ids["cat"] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_lcs_matrix_matches_rouge_score_for_several_queries(workers):
    rng = random.Random(5)
    texts = [_random_text(rng, 30) for _ in range(40)]
    encoder = TokenEncoder()
    encoded = [encoder.encode(rouge_tokens(text)) for text in texts]
    matrix = lcs_lengths(encoded[:7], encoded, workers=workers)
    for row, query in zip(matrix, texts[:7]):
        for lcs, text in zip(row, texts):
            expected = SCORER.score(query, text)["rougeL"].fmeasure
            assert fmeasure_from_lcs(int(lcs), len(rouge_tokens(query)), len(rouge_tokens(text))) == expected
