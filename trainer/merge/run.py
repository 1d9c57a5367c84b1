"""Stage 4: merge LoRA experts into one multi-skill LoRA (``selma merge`` and the Merge node).

:func:`merge_files` reads every expert, checks everything that can be wrong — files, architectures,
weights, shapes, ranks for ``mean_ab`` — and only then merges layer by layer with the method from
:data:`.methods.METHODS` and writes one kohya LoRA (atomically). An error names the file and key
(or setting) and leaves no file behind.

A layer that some experts lack is merged as if they had ΔW = 0 there; the result lists those layers
(:attr:`MergeResult.missing`) and so does the output file's metadata.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..storage.files import check_output_file
from ..storage.locks import exclusive_lock
from ..lora.file import Lora, format_number, lora_metadata, read_lora, release_date, write_lora
from .methods import DENSITY_METHODS, METHODS, RANKED_METHODS, SEEDED_METHODS, MergeOptions, module_seed
from ..settings import add_config_arguments, config_from_arguments, setting

if TYPE_CHECKING:
    import torch

SAVE_DTYPES = ("same", "float16", "bfloat16", "float32")
ARCHITECTURE_CHOICES = ("auto", "sd1", "sd2", "sdxl")
METHOD_KEY = "selma.merge.method"  # in every merged file's metadata: how a merge is told from other LoRAs
# Metadata the output keeps when every expert agrees on it (e.g. an SD 2.x-base family or a resolution).
_SHARED_METADATA = ("modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
                    "modelspec.prediction_type", "ss_base_model_version", "ss_v2")
ProgressCallback = Callable[[int, int], None]


@dataclass
class MergeConfig:
    """How to merge; defaults follow SELMA's released code (a weighted sum of the experts' ΔW, 1/N each)."""

    method: str = setting(
        "linear",
        "How to combine the experts. linear: exact weighted sum of their ΔW (what SELMA's released code "
        "computes), ranks stacked, no loss; mean_ab: SELMA's printed formula, average of the down and of the up "
        "matrices (equal ranks needed; not the same function); svd: the weighted sum re-factored to 'rank'; "
        "ties / dare: interference-reducing merges (trim + sign election / random drop), re-factored to 'rank'.",
        choices=tuple(METHODS))
    weights: str = setting(
        "",
        "One weight per expert, comma-separated, in expert order (e.g. 0.5,0.5); empty: 1/N each. linear and svd "
        "give Σ weight·ΔW, so weights summing to 1 keep an average expert's strength.")
    rank: int = setting(
        0,
        "Rank of the merged LoRA for svd, ties and dare; 0: the experts' largest rank. linear keeps every expert's "
        "rank (their sum), mean_ab keeps the experts' rank.")
    density: float = setting(
        0.2,
        "ties: fraction of each expert's largest-magnitude ΔW entries kept (TIES paper: 0.2); dare: fraction of "
        "entries kept at random, the kept rescaled by 1/density.")
    seed: int = setting(0, "dare: seed of the random drop masks; the same seed gives the same file.")
    save_dtype: str = setting(
        "same", "Precision of the saved weights; same: the experts' (float32 if they differ).", choices=SAVE_DTYPES)
    title: str = setting("", "Title stored as modelspec.title; empty: the output file name.")
    architecture: str = setting(
        "auto", "Base model family of the experts; auto: read from each file (names, shapes, metadata).",
        choices=ARCHITECTURE_CHOICES)


@dataclass
class MergeResult:
    """What a merge wrote and what a user should know about it."""

    path: Path
    lora: Lora
    method: str
    weights: list[float]
    sources: list[str]
    missing: dict[str, list[str]] = field(default_factory=dict)  # layer → titles of the experts without it

    def summary(self, listed: int = 20) -> str:
        ranks = ", ".join(str(rank) for rank in self.lora.ranks[:6])
        lines = [f"merged {len(self.sources)} experts ({self.method}, weights "
                 f"{', '.join(format_number(weight) for weight in self.weights)}) into {self.path}: "
                 f"{len(self.lora.modules)} modules, {self.lora.architecture.title}, rank {ranks}"]
        if self.missing:
            lines.append(f"{len(self.missing)} modules are missing in some experts and were merged as zero there:")
            for name, titles in list(self.missing.items())[:listed]:
                lines.append(f"  {name}: missing in {', '.join(titles)}")
            if len(self.missing) > listed:
                lines.append(f"  ... and {len(self.missing) - listed} more (listed in the file's metadata)")
        return "\n".join(lines)


def parse_weights(text: str, count: int) -> list[float]:
    """Weights from ``"0.5,0.5"`` (commas or spaces); empty → 1/N each. Raises naming the mismatch."""
    if count < 1:
        raise ValueError("no experts to merge; expected at least one LoRA file")
    items = [item for item in text.replace(",", " ").split()]
    if not items:
        return [1.0 / count] * count
    try:
        weights = [float(item) for item in items]
    except ValueError as error:
        raise ValueError(f"weights: {text!r} is not a list of numbers ({error})") from error
    if len(weights) != count:
        raise ValueError(f"weights: {text!r} gives {len(weights)} weight(s) for {count} experts; expected one per "
                         "expert, in the order the experts are given (or none for 1/N each)")
    bad = [item for item, weight in zip(items, weights, strict=True) if not math.isfinite(weight)]
    if bad:
        raise ValueError(f"weights: {bad[0]!r} is not a finite number")
    return weights


def check_config(config: MergeConfig, weights: Sequence[float]) -> None:
    """Settings that are wrong whatever the files hold."""
    if config.method not in METHODS:
        raise ValueError(f"method: {config.method!r} is not a merge method; expected one of {', '.join(METHODS)}")
    if config.rank < 0:
        raise ValueError(f"rank: {config.rank} is negative; expected 0 (the experts' rank) or a positive rank")
    if config.method in DENSITY_METHODS and not 0.0 < config.density <= 1.0:
        raise ValueError(f"density: {config.density} is outside (0, 1]; expected the fraction of entries kept")
    if config.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype: {config.save_dtype!r}; expected one of {', '.join(SAVE_DTYPES)}")
    if config.architecture not in ARCHITECTURE_CHOICES:
        raise ValueError(f"architecture: {config.architecture!r}; expected one of {', '.join(ARCHITECTURE_CHOICES)}")
    if config.method == "ties" and any(weight <= 0 for weight in weights):
        raise ValueError(f"weights: ties elects signs by weighted vote and needs positive weights; got "
                         f"{', '.join(format_number(weight) for weight in weights)}")


def check_experts(experts: Sequence[Lora], method: str) -> dict[str, list[str]]:
    """Raise if the experts cannot be merged; return the layers some of them lack (layer → titles)."""
    first = experts[0]
    for expert in experts[1:]:
        if expert.architecture.name != first.architecture.name:
            raise ValueError(
                f"{expert.source} is a {expert.architecture.title} LoRA but {first.source} is "
                f"{first.architecture.title}; experts of different base models cannot be merged")
    shapes: dict[str, tuple[Lora, tuple[int, ...], int]] = {}
    for expert in experts:
        for name, module in expert.modules.items():
            if name not in shapes:
                shapes[name] = (expert, module.weight_shape, module.rank)
                continue
            other, shape, rank = shapes[name]
            if module.weight_shape != shape:
                raise ValueError(f"{expert.source}: module {name!r} adapts a {'x'.join(map(str, module.weight_shape))} "
                                 f"layer, {other.source} a {'x'.join(map(str, shape))} one; the experts were trained "
                                 "on different models")
            if method == "mean_ab" and module.rank != rank:
                raise ValueError(f"{expert.source}: module {name!r} has rank {module.rank}, {other.source} rank "
                                 f"{rank}; mean_ab averages down and up matrices and needs equal ranks (use linear "
                                 "or svd)")
    return {
        name: [expert.title for expert in experts if name not in expert.modules]
        for name in sorted(shapes)
        if any(name not in expert.modules for expert in experts)
    }


def _save_dtype(config: MergeConfig, experts: Sequence[Lora]) -> torch.dtype:
    import torch

    if config.save_dtype != "same":
        return getattr(torch, config.save_dtype)
    dtypes = {module.down.dtype for expert in experts for module in expert.modules.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def merge_loras(
    experts: Sequence[Lora],
    config: MergeConfig,
    weights: Sequence[float],
    title: str,
    progress: ProgressCallback | None = None,
) -> tuple[Lora, dict[str, list[str]]]:
    """Merge already-read experts in memory: (the merged LoRA with its metadata, the layers some experts lack)."""
    check_config(config, weights)
    if len(weights) != len(experts):
        raise ValueError(f"weights: {len(weights)} weight(s) for {len(experts)} experts; expected one per expert")
    missing = check_experts(experts, config.method)
    merge = METHODS[config.method]
    names = sorted({name for expert in experts for name in expert.modules})
    base_options = MergeOptions(rank=config.rank or None, density=config.density, seed=config.seed)
    dtype = _save_dtype(config, experts)
    merged = {}
    for done, name in enumerate(names, start=1):
        options = replace(base_options, seed=module_seed(config.seed, name))
        module = merge([expert.modules.get(name) for expert in experts], weights, options)
        merged[name] = replace(module, down=module.down.to(dtype), up=module.up.to(dtype))
        if progress is not None:
            progress(done, len(names))
    arch = experts[0].architecture
    rank = Counter(module.rank for module in merged.values()).most_common(1)[0][0]
    alpha = Counter(module.alpha for module in merged.values()).most_common(1)[0][0]
    extra: dict[str, object] = {
        METHOD_KEY: config.method,
        "selma.merge.weights": [float(weight) for weight in weights],
        "selma.merge.sources": [Path(expert.source).name for expert in experts],
    }
    if config.method in RANKED_METHODS:
        extra["selma.merge.rank"] = str(rank)
    if config.method in DENSITY_METHODS:
        extra["selma.merge.density"] = format_number(config.density)
    if config.method in SEEDED_METHODS:
        extra["selma.merge.seed"] = str(config.seed)
    if missing:
        extra["selma.merge.missing_modules"] = missing
    metadata = lora_metadata(arch, title=title, rank=rank, alpha=alpha,
                             merged_from=[expert.title for expert in experts], extra=extra)
    for key in _SHARED_METADATA:
        values = {expert.metadata.get(key) for expert in experts}
        if len(values) == 1 and (value := values.pop()):
            metadata[key] = value
    return Lora(modules=merged, architecture=arch, metadata=metadata, source=title), missing


def merge_files(
    paths: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    config: MergeConfig | None = None,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Read, check, merge and write: the one merge entry point of the CLI and the node.

    Every check runs before the output is written; on any error nothing is written. The output is
    checked (a file path in a folder this process may write in) before any expert is read, and
    locked (:func:`.locks.exclusive_lock`) while it is made: a merge into an output another process
    is writing raises :class:`.locks.LockHeldError` naming that process.
    """
    config = config or MergeConfig()
    sources = [Path(path) for path in paths]
    target = Path(output)
    weights = parse_weights(config.weights, len(sources))
    check_config(config, weights)
    release_date()  # a malformed SOURCE_DATE_EPOCH is refused before any work
    check_output_file(target, "output")
    if target.suffix.lower() != ".safetensors":
        raise ValueError(f"output: {target} must end in .safetensors (the merged LoRA is written in kohya layout)")
    for source in sources:
        if target.exists() and source.exists() and os.path.samefile(source, target):
            raise ValueError(f"output: {target} is also expert {source}; write the merge to a new file")
    architecture = None if config.architecture == "auto" else config.architecture
    with exclusive_lock(target):  # one writer per output: a second merge into it is told who holds it
        experts = [read_lora(source, architecture=architecture) for source in sources]
        title = config.title.strip() or target.stem
        lora, missing = merge_loras(experts, config, weights, title=title, progress=progress)
        lora.source = os.fspath(target)
        write_lora(lora, target)
    return MergeResult(path=target, lora=lora, method=config.method, weights=list(weights),
                       sources=[os.fspath(source) for source in sources], missing=missing)


# --- `selma merge` ---------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    """``selma merge A.safetensors B.safetensors ... --method linear --weights 0.5,0.5 [--rank 128] --out X``."""
    parser = subparsers.add_parser(
        name, help=summary, description=summary + " Reads kohya, ComfyUI and diffusers/PEFT LoRA files; writes "
        "one kohya LoRA with ss_* and modelspec.* metadata.")
    parser.add_argument("experts", nargs="+", help="the expert LoRA .safetensors files")
    parser.add_argument("--out", required=True, help="the merged LoRA file to write (.safetensors)")
    add_config_arguments(parser, MergeConfig)
    parser.set_defaults(handler=_run_cli)


def _run_cli(arguments: argparse.Namespace) -> int:
    config = config_from_arguments(MergeConfig, arguments)
    try:
        result = merge_files(arguments.experts, arguments.out, config)
    except (ValueError, OSError) as error:  # OSError: a file that cannot be read, a full disk, a lock held
        print(f"selma merge: {error}", file=sys.stderr)
        print("selma merge: nothing was written", file=sys.stderr)
        return 2
    print(result.summary())
    return 0

