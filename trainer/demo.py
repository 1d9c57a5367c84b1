"""``selma demo``: every built stage on the embedded default, written under one folder.

The embedded default needs no model and no network: prompts come from the offline template
source. Each stage writes into its own subfolder of ``--out``, and a re-run continues what is there
(the stages resume), so the demo also shows the file contracts between stages.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import PromptConfig, expand_prompts
from .settings import add_config_arguments, config_from_arguments, setting


@dataclass
class DemoConfig:
    """What the demo runs: a few SELMA skills at toy sizes."""

    out: str = setting("selma-demo", "Folder the demo writes everything under.")
    skills: list = setting(["everyday_objects", "counting", "spatial_relations"],
                           "Skill presets the demo makes experts for (comma-separated).",
                           type=lambda text: [name.strip() for name in text.split(",") if name.strip()])
    prompts_per_skill: int = setting(12, "Prompts kept per skill (the paper keeps 1,000).")
    seed: int = setting(0, "Seed of every stage.")


@dataclass
class DemoResult:
    """Where each stage wrote its files."""

    prompt_sets: dict[str, Path] = field(default_factory=dict)


def run_demo(config: DemoConfig, report=print) -> DemoResult:
    out_dir = Path(config.out).resolve()
    result = DemoResult()
    for skill in config.skills:
        prompt_path = out_dir / "prompts" / f"{skill}.jsonl"
        summary = expand_prompts(PromptConfig(skill=skill, backend="template", count=config.prompts_per_skill,
                                              seed=config.seed), prompt_path)
        report(f"[1 prompts] {skill}: {summary.message()}")
        result.prompt_sets[skill] = prompt_path
    return result


def _run(arguments: argparse.Namespace) -> int:
    run_demo(config_from_arguments(DemoConfig, arguments))
    return 0


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    parser = subparsers.add_parser(name, help=summary, description=summary)
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(handler=_run)
