"""Skill presets: what the LLM is asked to write for each skill, and the 3 prompts the pool starts from.

SELMA's five skills follow five prompt sources (SELMA §3.1): COCO captions (everyday objects),
Localized Narratives (paragraph captions), DiffusionDB (detailed real-user prompts), CountBench
(counting, counts up to 3 as in the release) and Whoops (commonsense-defying scenes). Three more
cover abilities the paper's evaluation (DSG, TIFA) scores separately: spatial relations, attribute
binding and text rendering. Instructions and seed prompts are written for this project.

A custom skill is a description (the rules the LLM follows) and at least 3 seed prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CUSTOM = "custom"
MIN_SEEDS = 3


@dataclass(frozen=True)
class Skill:
    """One skill: a name, the rules the LLM is given, its seed prompts and a word limit (0: none)."""

    name: str
    title: str
    rules: str
    seeds: tuple[str, ...]
    max_words: int = 0

    def instruction(self, count: int) -> str:
        """The request text before the examples: what to write, how many, and the reply format."""
        lines = [f"Write {count} new, diverse image descriptions for testing a text-to-image model.",
                 "Rules:", *(f"- {rule}" for rule in self.rules.strip().splitlines() if rule.strip())]
        if self.max_words:
            lines.append(f"- Each description has at most {self.max_words} words.")
        lines += ["- Vary the wording and sentence structure from one description to the next.",
                  "- Reply with a numbered list only, one description per line, continuing the numbering "
                  "of the examples.",
                  "",
                  "Examples:"]
        return "\n".join(lines)


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill(
            name="everyday_objects",
            title="Everyday objects (COCO-style short captions)",
            rules="Describe an ordinary photograph in one plain sentence, like a caption a person would write.\n"
                  "Mention everyday objects, people, animals, food, vehicles and places, with their colours, "
                  "materials, shapes, positions and activities.",
            seeds=("A yellow kayak resting on a pebble beach next to a coiled rope.",
                   "Two people share a pizza at a small table by a rainy window.",
                   "A tabby cat sleeps inside an open suitcase on a bedroom floor."),
            max_words=30,
        ),
        Skill(
            name="paragraph_captions",
            title="Paragraph captions (Localized Narratives style)",
            rules="Describe an image in a short spoken-style paragraph that walks through what is in front, "
                  "behind and around, as a person would narrate while pointing at the image.\n"
                  "Name many everyday objects and where they are.",
            seeds=("In this picture I can see a wooden bench in front of a brick wall. On the bench there is a red "
                   "backpack and a bottle. At the top I can see a window with white curtains.",
                   "This image shows a small market stall. In the front there are baskets full of oranges and "
                   "lemons, and behind them a man in a blue apron is holding a paper bag.",
                   "Here we can see a lake with a few boats on it. In the background there are trees and hills, "
                   "and the sky is cloudy."),
            max_words=50,
        ),
        Skill(
            name="detailed_prompts",
            title="Detailed real-user prompts (DiffusionDB style)",
            rules="Write the kind of prompt people type into an image generator: a subject and a scene followed "
                  "by comma-separated details about medium, style, lighting, camera and quality.\n"
                  "Describe the image in rich detail; do not name living artists.",
            seeds=("a lighthouse on a cliff during a thunderstorm, dramatic lighting, crashing waves, oil painting, "
                   "highly detailed, muted colors, wide angle",
                   "portrait of an old fisherman with a knitted hat, soft window light, 85mm photo, shallow depth "
                   "of field, film grain",
                   "a cozy reading nook inside a giant hollow tree, warm lanterns, fantasy concept art, intricate "
                   "details, volumetric light, 4k"),
            max_words=50,
        ),
        Skill(
            name="counting",
            title="Counting (CountBench style, counts up to 3)",
            rules="Each description states how many of some object there are, and the image must show exactly "
                  "that many.\n"
                  "Counts are one, two or three; never more than three.\n"
                  "Mention diverse objects that appear in daily life.",
            seeds=("Three glass jars of honey lined up on a kitchen shelf.",
                   "Two cyclists waiting side by side at a red traffic light.",
                   "A single paper lantern hanging above a wooden doorway."),
            max_words=30,
        ),
        Skill(
            name="commonsense_defying",
            title="Commonsense-defying scenes (Whoops style)",
            rules="Describe a scene made of everyday things in a combination that defies common sense or "
                  "physics, yet is easy to picture.\n"
                  "Keep the description short and concrete.",
            seeds=("A snowman standing in the middle of a sunny desert.",
                   "A goldfish swimming inside a light bulb on a desk.",
                   "A birthday cake topped with burning matches instead of candles."),
            max_words=30,
        ),
        Skill(
            name="spatial_relations",
            title="Spatial relations",
            rules="Each description places two or three objects relative to each other: left of, right of, "
                  "above, below, on top of, under, behind, in front of, inside, next to.\n"
                  "The relations must be unambiguous and visible in one picture.",
            seeds=("A red mug to the left of a stack of books.",
                   "A cat sitting under a wooden chair, with a ball of yarn behind it.",
                   "A kite flying above a lighthouse."),
            max_words=30,
        ),
        Skill(
            name="attribute_binding",
            title="Attribute binding",
            rules="Each description gives two or three objects each with its own colour, material, size, shape "
                  "or texture, so that mixing the attributes up would be a visible mistake.",
            seeds=("A blue glass vase next to a yellow ceramic bowl.",
                   "A small green umbrella and a large striped beach towel on white sand.",
                   "A round wooden table with a square metal tray on it."),
            max_words=30,
        ),
        Skill(
            name="text_rendering",
            title="Text rendering",
            rules="Each description shows a short piece of legible text (one to four words, given in double "
                  "quotes) on an everyday surface such as a sign, a label, a cake, a shirt or a screen.",
            seeds=('A wooden sign reading "FRESH EGGS" beside a country road.',
                   'A coffee cup with the word "Monday" printed on it.',
                   'A neon sign that says "OPEN LATE" in a shop window at night.'),
            max_words=30,
        ),
    )
}


def skill_names() -> list[str]:
    """The preset names, then ``custom``: the choices a user picks from."""
    return [*SKILLS, CUSTOM]


def get_skill(name: str, description: str = "", seeds: Sequence[str] = (), max_words: int = 0) -> Skill:
    """The preset called ``name``, or a custom skill built from ``description`` and ``seeds``.

    ``seeds`` given with a preset replace its own seeds (at least 3). ``max_words`` > 0 replaces the
    word limit.
    """
    seed_prompts = tuple(seed.strip() for seed in seeds if seed.strip())
    if name == CUSTOM:
        if not description.strip():
            raise ValueError("skill 'custom' needs a description: the rules the LLM should follow, "
                             "e.g. 'Photos of kitchen tools on a counter, one tool per image.'")
        skill = Skill(name=CUSTOM, title="Custom skill", rules=description.strip(), seeds=())
    elif name in SKILLS:
        skill = SKILLS[name]
    else:
        raise ValueError(f"skill: unknown skill {name!r}; known skills: {', '.join(skill_names())}")
    if seed_prompts or name == CUSTOM:
        if len(seed_prompts) < MIN_SEEDS:
            raise ValueError(f"seeds: {len(seed_prompts)} seed prompt(s) given for skill {name!r}; expected at least "
                             f"{MIN_SEEDS} non-empty prompts, one per line")
        if len(set(seed_prompts)) < len(seed_prompts):
            raise ValueError(f"seeds: the seed prompts for skill {name!r} repeat a prompt; expected "
                             f"{MIN_SEEDS} or more different prompts")
        skill = Skill(skill.name, skill.title, skill.rules, seed_prompts, skill.max_words)
    if max_words:
        skill = Skill(skill.name, skill.title, skill.rules, skill.seeds, max_words)
    return skill


def request_text(skill: Skill, examples: Sequence[str], count: int) -> str:
    """The full request: the instruction, then the examples numbered 1..k (the reply continues at k+1)."""
    numbered = "\n".join(f"{index}. {example}" for index, example in enumerate(examples, start=1))
    return f"{skill.instruction(count)}\n{numbered}\n"
