"""``selma demo``: every SELMA stage on the embedded default, written under one folder.

The embedded default needs no download and no network: prompts come from the offline template
source and the model is a tiny Stable Diffusion 1.x built from configs with seeded random weights.
Its images are noise and its LoRAs teach nothing; what the demo shows is the pipeline and its file
contracts — prompt sets, datasets, training runs, expert LoRAs, the merged LoRA — in minutes on a
CPU. Each stage writes into its own subfolder of ``--out``; a re-run continues what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .storage.files import atomic_path, check_output_folder
from .prompts.generate import PromptConfig, expand_prompts
from .settings import add_config_arguments, config_from_arguments, setting
from .prompts.skills import CUSTOM, SKILLS, skill_names

CONTACT_SHEET_COLUMNS = 8  # one row per skill at the default prompts_per_skill


@dataclass
class DemoConfig:
    """What the demo runs: a few SELMA skills at toy sizes."""

    out: str = setting("selma-demo", "Folder the demo writes everything under.")
    skills: list = setting(["everyday_objects", "counting", "spatial_relations"],
                           "Skill presets the demo makes experts for (comma-separated).",
                           type=lambda text: [name.strip() for name in text.split(",") if name.strip()])
    prompts_per_skill: int = setting(8, "Prompts kept per skill, one image each (the paper keeps 1,000).")
    resolution: int = setting(64, "Image and training resolution of the tiny model, in pixels.")
    sampling_steps: int = setting(2, "Sampling steps per image (the paper uses 50).")
    training_steps: int = setting(4, "Training steps per expert (the paper trains 5,000).")
    rank: int = setting(4, "LoRA rank of the experts (the paper uses 128).")
    seed: int = setting(0, "Seed of every stage.")

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first setting that cannot work, before the demo makes anything:
        a bad value would otherwise stop it minutes later, after the model and the first stages were made."""
        presets = [name for name in skill_names() if name != CUSTOM]  # custom needs rules and seeds the demo lacks
        if not self.skills:
            raise ValueError("skills: empty; expected comma-separated skill presets, e.g. counting,spatial_relations")
        for index, name in enumerate(self.skills):
            if name not in presets:
                raise ValueError(f"skills: unknown skill {name!r}; expected presets from {', '.join(presets)}")
            if name in self.skills[:index]:
                raise ValueError(f"skills: {name!r} is listed twice; expected each skill once (one expert each)")
        seed_prompts = max(len(SKILLS[name].seeds) for name in self.skills)
        if _whole(self.prompts_per_skill) and self.prompts_per_skill < seed_prompts:
            raise ValueError(f"prompts_per_skill: {self.prompts_per_skill}; expected at least {seed_prompts} (the "
                             "seed prompts each skill's set starts from)")
        for name in ("prompts_per_skill", "sampling_steps", "training_steps", "rank"):
            value = getattr(self, name)
            if not _whole(value) or value < 1:
                raise ValueError(f"{name}: {value!r}; expected a whole number >= 1")
        if not _whole(self.resolution) or self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution: {self.resolution!r}; expected a positive multiple of 8 (the VAE works on "
                             "8x8 pixel blocks), e.g. 64")
        if not _whole(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: {self.seed!r}; expected a whole number from 0 to 2**63 - 1")
        check_output_folder(self.out, "out")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DemoResult:
    """Where each stage wrote its files."""

    model: Path
    prompt_sets: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)
    experts: dict[str, Path] = field(default_factory=dict)
    merged_lora: Path | None = None
    contact_sheet: Path | None = None


def tiny_model_folder(folder: Path, seed: int) -> Path:
    """The embedded default model as a diffusers folder, built once (seeded) and reused."""
    if (folder / "model_index.json").is_file():
        return folder
    from .families.tiny import save_pipeline, tiny_sd1_pipeline

    building = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    save_pipeline(tiny_sd1_pipeline(seed), building)
    os.replace(building, folder)
    return folder


def write_contact_sheet(image_paths: list[Path], target: Path, columns: int = CONTACT_SHEET_COLUMNS) -> Path:
    """Tile ``image_paths`` (equal sizes) into one PNG, row-major."""
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in image_paths]
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (width * min(columns, len(images)), height * rows), "white")
    for position, image in enumerate(images):
        sheet.paste(image, ((position % columns) * width, (position // columns) * height))
    with atomic_path(target) as temporary:
        sheet.save(temporary, format="PNG")
    return target


def _training_echo(report: Callable[[str], None]) -> Callable[[str], None]:
    """Show the trainer's step events as short lines (all events stay in the run's log.jsonl)."""

    def echo(line: str) -> None:
        event = json.loads(line)
        if event.get("event") == "step":
            report(f"    step {event['step']}/{event['max_steps']}  loss {event['loss']:.4f}  "
                   f"{event['images_per_s']:.1f} images/s")

    return echo


def run_demo(config: DemoConfig, report: Callable[[str], None] = print) -> DemoResult:
    """Run every stage; every setting is checked (:meth:`DemoConfig.validate`) before anything is made."""
    from .merge.run import MergeConfig, merge_files
    from .prompts.prompt_set import prompt_set_of
    from .render.run import RenderConfig, render_dataset
    from .train.loop import quiet_libraries, run_training
    from .train.config import TrainConfig

    config.validate()
    quiet_libraries()
    out_dir = Path(config.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(model=tiny_model_folder(out_dir / "model", config.seed))
    report(f"[model] tiny SD 1.x with random weights: {result.model}")
    for skill in config.skills:
        prompt_path = out_dir / "prompts" / f"{skill}.jsonl"
        summary = expand_prompts(PromptConfig(skill=skill, backend="template", count=config.prompts_per_skill,
                                              seed=config.seed), prompt_path)
        report(f"[1 prompts] {skill}: {summary.message()}")
        result.prompt_sets[skill] = prompt_path

        dataset = out_dir / "datasets" / skill
        rendered = render_dataset(prompt_set_of(prompt_path), dataset, result.model,
                                  RenderConfig(width=config.resolution, height=config.resolution,
                                               steps=config.sampling_steps, seed=config.seed),
                                  device="cpu", show_progress=False)
        report(f"[2 render] {skill}: {rendered.message()}")
        result.datasets[skill] = dataset

        training = TrainConfig(pretrained_model_name_or_path=str(result.model), train_data_dir=str(dataset),
                               output_name=f"expert-{skill}", skill=skill, network_dim=config.rank,
                               network_alpha=float(config.rank), max_train_steps=config.training_steps,
                               train_batch_size=2, gradient_accumulation_steps=1, mixed_precision="no",
                               resolution=config.resolution, save_every_n_steps=config.training_steps,
                               seed=config.seed, cache_dir=str(out_dir / "cache"))
        result.experts[skill] = run_training(training, out_dir / "runs" / skill, echo=_training_echo(report))
        report(f"[3 train] {skill}: expert LoRA {result.experts[skill]}")

    result.merged_lora = out_dir / "selma-multi-skill.safetensors"
    merged = merge_files(list(result.experts.values()), result.merged_lora,
                         MergeConfig(method="linear", title="selma-demo multi-skill"))
    report(f"[4 merge] {merged.summary()}")

    from .render.dataset import done_image_paths

    sheet_images = [path for dataset in result.datasets.values() for path in done_image_paths(dataset)]
    result.contact_sheet = write_contact_sheet(sheet_images, out_dir / "contact_sheet.png")
    report(f"merged LoRA: {result.merged_lora}")
    report(f"contact sheet of the {len(sheet_images)} rendered images: {result.contact_sheet}")
    return result


def _run(arguments: argparse.Namespace) -> int:
    try:
        run_demo(config_from_arguments(DemoConfig, arguments))
    except (ValueError, OSError) as error:  # every stage's user errors; OSError: a lock held, a full disk
        print(f"selma demo: {error}", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    parser = subparsers.add_parser(name, help=summary, description=summary)
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(handler=_run)
