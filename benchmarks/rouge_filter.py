"""Benchmark: SELMA's greedy ROUGE-L filter, ours (bit-parallel LCS) against the same loop on rouge-score.

Run from the repository root:  .venv/bin/python benchmarks/rouge_filter.py [--quick]

Candidates are generated deterministically: paragraph captions of about 80 words and short
captions, a fifth of them near-copies of earlier candidates (a few words changed, dropped or
added) so that many scores fall near the 0.8 threshold. Both filters run in this process on the
same lists; the kept lists must be identical. The reference is SELMA's released loop with the
prompts pre-tokenised once and ``rouge_scorer._score_lcs`` per pair, on one process.
Results go to ``benchmarks/results/rouge_filter.json`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
try:
    from comfyui_selma.trainer.prompts.filter import filter_prompts
    from comfyui_selma.trainer.backends.templates import (ANIMALS, COLORS, MATERIALS, OBJECTS, PEOPLE,
                                                        PERSON_ACTIONS, PLACES)
except ModuleNotFoundError:
    sys.exit("install the package first (pip install -e .), then run: .venv/bin/python benchmarks/rouge_filter.py")

THRESHOLD = 0.8
RESULTS_PATH = REPOSITORY_ROOT / "benchmarks" / "results" / "rouge_filter.json"
_OPENINGS = ("In this picture I can see", "This image shows", "Here we can see", "In this image there is",
             "We can see")
_POSITIONS = ("In the front", "On the left side", "On the right side", "In the middle", "Behind it", "At the top",
              "At the bottom", "In the background", "Beside it", "Near the wall", "On the floor")


def _sentence(rng: random.Random) -> str:
    frame = rng.randrange(4)
    if frame == 0:
        return (f"{rng.choice(_POSITIONS)} there is a {rng.choice(COLORS)} {rng.choice(MATERIALS)} "
                f"{rng.choice(OBJECTS)[0]} {rng.choice(PLACES)}.")
    if frame == 1:
        return f"{rng.choice(_POSITIONS)} a {rng.choice(PEOPLE)} is {rng.choice(PERSON_ACTIONS)}."
    if frame == 2:
        return (f"{rng.choice(_POSITIONS)} we can see {rng.choice(('two', 'three', 'a few', 'many'))} "
                f"{rng.choice(ANIMALS)[1]} and some {rng.choice(OBJECTS)[1]}.")
    return (f"{rng.choice(_POSITIONS)} I can see {rng.choice(OBJECTS)[1]}, {rng.choice(OBJECTS)[1]} and a "
            f"{rng.choice(COLORS)} wall.")


def _paragraph(rng: random.Random, words: int = 80) -> str:
    text = f"{rng.choice(_OPENINGS)} a {rng.choice(COLORS)} {rng.choice(OBJECTS)[0]} {rng.choice(PLACES)}."
    while len(text.split()) < words - 6:
        text += " " + _sentence(rng)
    return text


def _short(rng: random.Random) -> str:
    frame = rng.randrange(3)
    if frame == 0:
        return f"A {rng.choice(COLORS)} {rng.choice(OBJECTS)[0]} {rng.choice(PLACES)}."
    if frame == 1:
        return f"A {rng.choice(PEOPLE)} {rng.choice(PERSON_ACTIONS)} {rng.choice(PLACES)}."
    return f"Two {rng.choice(ANIMALS)[1]} next to a {rng.choice(MATERIALS)} {rng.choice(OBJECTS)[0]}."


def _near_copy(rng: random.Random, text: str, changes: int) -> str:
    words = text.split()
    for _ in range(changes):
        operation = rng.randrange(3)
        position = rng.randrange(len(words))
        if operation == 0 and len(words) > 3:
            words.pop(position)
        elif operation == 1:
            words.insert(position, rng.choice(COLORS))
        else:
            words[position] = rng.choice(MATERIALS)
    return " ".join(words)


def candidates(kind: str, count: int, seed: int = 0) -> list[str]:
    """``count`` deterministic candidates of ``kind`` (paragraph or short), a fifth of them near-copies."""
    rng = random.Random(f"selma-benchmark/{kind}/{seed}")
    made: list[str] = []
    for _ in range(count):
        if made and rng.random() < 0.2:
            original = rng.choice(made)
            changes = max(1, round(len(original.split()) * rng.choice((0.05, 0.1, 0.15, 0.2, 0.3))))
            made.append(_near_copy(rng, original, changes))
        else:
            made.append(_paragraph(rng) if kind == "paragraph" else _short(rng))
    return made


def rouge_score_greedy(prompts: list[str], threshold: float) -> list[str]:
    """SELMA's released loop on rouge-score: pre-tokenised pool, ``_score_lcs`` against every kept prompt."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[str] = []
    kept_tokens: list[list[str]] = []
    for prompt in prompts:
        tokens = scorer._tokenizer.tokenize(prompt)
        if kept_tokens and max(rouge_scorer._score_lcs(tokens, other).fmeasure for other in kept_tokens) > threshold:
            continue
        kept.append(prompt)
        kept_tokens.append(tokens)
    return kept


def ours_greedy(prompts: list[str], threshold: float) -> list[str]:
    verdicts, _ = filter_prompts(prompts, threshold)
    return [verdict.prompt for verdict in verdicts if verdict.accepted]


def _timed(function, *arguments):
    start = time.perf_counter()
    result = function(*arguments)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes (a smoke run of a few seconds).")
    arguments = parser.parse_args(argv)
    scale = 10 if arguments.quick else 1
    rows = []
    for kind, count, compare in (("paragraph", 500 // scale, True), ("short", 2000 // scale, True),
                                 ("paragraph", 10_000 // scale, False)):
        prompts = candidates(kind, count)
        words = sum(len(prompt.split()) for prompt in prompts) / len(prompts)
        ours, ours_seconds = _timed(ours_greedy, prompts, THRESHOLD)
        row = {"candidates": count, "kind": kind, "mean_words": round(words, 1), "kept": len(ours),
               "ours_s": round(ours_seconds, 3), "rouge_score_s": None, "speedup": None, "identical": None}
        if compare:
            reference, reference_seconds = _timed(rouge_score_greedy, prompts, THRESHOLD)
            row.update(rouge_score_s=round(reference_seconds, 2), speedup=round(reference_seconds / ours_seconds, 1),
                       identical=ours == reference)
            assert ours == reference, f"kept lists differ on {count} {kind} candidates"
        rows.append(row)
        print(f"done: {count} {kind} candidates", file=sys.stderr, flush=True)

    header = (f"{'candidates':>10}  {'kind':<9} {'words':>5} {'kept':>6} {'ours s':>8} {'rouge-score s':>13} "
              f"{'ratio':>7}  identical")
    print(header)
    for row in rows:
        reference = f"{row['rouge_score_s']:.1f}" if row["rouge_score_s"] is not None else "-"
        ratio = f"{row['speedup']:.0f}x" if row["speedup"] is not None else "-"
        identical = {True: "yes", False: "NO", None: "-"}[row["identical"]]
        print(f"{row['candidates']:>10}  {row['kind']:<9} {row['mean_words']:>5} {row['kept']:>6} "
              f"{row['ours_s']:>8.2f} {reference:>13} {ratio:>7}  {identical}")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({"threshold": THRESHOLD, "quick": arguments.quick,
                                        "python": platform.python_version(), "machine": platform.machine(),
                                        "rows": rows}, indent=2) + "\n")
    print(f"results: {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
