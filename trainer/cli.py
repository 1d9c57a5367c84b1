"""The ``selma`` command line: one subcommand per SELMA stage, plus ``demo``.

Each built stage contributes its subcommand through a ``register_cli(subparsers)`` function in its
own module, so the CLI and the ComfyUI node call the same engine function. A stage that is not built
yet still answers ``--help`` and, when run, says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module that registers it, or None while the stage is not built; one-line summary)
SUBCOMMANDS: dict[str, tuple[str | None, str]] = {
    "prompts": (".prompts.generate", "Stage 1: write skill-specific prompts with an LLM, kept diverse by ROUGE-L."),
    "render": (".render.run", "Stage 2: render one image per prompt into a dataset folder."),
    "train": (".train.loop", "Stage 3: train one LoRA expert on a dataset."),
    "merge": (".merge.run", "Stage 4: merge LoRA experts into one multi-skill LoRA."),
    "lora": (".lora.file", "Inspect LoRA files (kohya, ComfyUI or diffusers layout): selma lora info FILE."),
    "demo": (".demo", "Run every built stage on the embedded default (tiny model, offline prompts)."),
}

NOT_BUILT_EXIT_CODE = 3


def _not_built(arguments: argparse.Namespace) -> int:
    print(f"selma {arguments.subcommand}: this stage is not built yet in this version of comfyui-selma.",
          file=sys.stderr)
    return NOT_BUILT_EXIT_CODE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selma",
        description="SELMA: teach a text-to-image model skills from data it makes itself, "
                    "one LoRA expert per skill, merged into one multi-skill LoRA.",
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if module_name is None:
            stage_parser = subparsers.add_parser(name, help=summary + " (not built yet)",
                                                 description=summary + " Not built yet in this version.")
            stage_parser.set_defaults(handler=_not_built)
            continue
        module = importlib.import_module(module_name, package=__package__)
        module.register_cli(subparsers, name, summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    return int(arguments.handler(arguments) or 0)


if __name__ == "__main__":
    sys.exit(main())
