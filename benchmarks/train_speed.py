"""Benchmark: our LoRA trainer against diffusers' ``train_text_to_image_lora.py`` (the script SELMA used)
and kohya-ss/sd-scripts' ``train_network.py`` (what most users train LoRAs with).

Run from the repository root:

    .venv/bin/python benchmarks/train_speed.py --reference-script PATH/train_text_to_image_lora.py
    .venv/bin/python benchmarks/train_speed.py --reference-script PATH/train_text_to_image_lora.py \
        --kohya-scripts PATH/sd-scripts --kohya-python PATH/kohya-venv/bin/python --model sd15-random

Neither peer is part of this repository. diffusers' script: ``examples/text_to_image/`` of a diffusers
checkout (``--reference-script`` or ``$SELMA_REFERENCE_SCRIPT``); it needs the ``datasets`` package
(``--reference-pythonpath``: a folder holding it, if it is not installed). kohya: a checkout of
kohya-ss/sd-scripts (``--kohya-scripts`` or ``$SELMA_KOHYA_SCRIPTS``), run by ``--kohya-python``
(``$SELMA_KOHYA_PYTHON``; default: ``--python``), a Python with sd-scripts' needs (toml, voluptuous,
imagesize, einops, opencv). Where torchvision cannot be imported (the registry's CUDA build beside a
CPU torch), a small PIL stand-in for the few ``torchvision.transforms`` the peers use is put on their
path, and the table says so.

All trainers run one after the other in this invocation, each in a fresh process, on the same base
model, the same images and captions, and the same settings (rank, alpha = rank, UNet attention
projections, constant learning rate 3e-4, AdamW, batch x accumulation, random flip, centre crop,
seed, precision). kohya runs as its users run it: latents cached (``--cache_latents``), SDPA
attention (``--sdpa``), UNet-only network; its network is restricted to the same attention
projections by an initial weights file holding exactly those modules (``--network_weights`` with
``--dim_from_weights``), or, with ``--kohya-coverage kohya``, left at its default coverage (every
linear layer and 1x1 convolution inside the transformer blocks: also the feed-forward layers and
``proj_in``/``proj_out``). Each process is timed by a hook after every optimizer step; steps/s and
images/s are measured over the steps after ``--warmup``; wall time covers the whole process (model
loading, caching). Peak memory is the CUDA allocator's peak on a GPU, else the process's peak
resident set. Results go to ``benchmarks/results/train_speed.json`` (ignored by git).

Models (``--model``): ``tiny`` (default; the tiny SD 1.x at 64 px), ``sd15-random`` (full-size SD 1.5
with random weights: the single-file LDM checkpoint of the test tier, cached, plus a diffusers
folder made from it for diffusers' script), or a diffusers folder of your own. kohya's loader
builds SD 1.x at its real shapes whatever the file says, so kohya joins only on a full-size model.
On a GPU, pass ``--resolution 512`` and SELMA's ``--rank 128`` (``benchmarks/gpu_rows.sh`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPOSITORY_ROOT / "benchmarks" / "results" / "train_speed.json"
# The modules each trainer puts a LoRA on (SELMA: the attention projections of every transformer block).
ATTENTION_PROJECTIONS = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
CAPTIONS = ("a red cube on a wooden table", "two green apples in a white bowl", "three birds on a wire at dawn",
            "a cat sleeping on a blue sofa", "a yellow taxi in the rain", "four candles on a birthday cake",
            "a lighthouse on a rocky coast", "five books stacked on a desk")

# Runs a training script in this process, timing every optimizer step; writes what it saw at exit.
TIMED_RUNNER = textwrap.dedent('''
    import atexit, json, os, resource, runpy, sys, time
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    step_times = []
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: step_times.append(time.perf_counter()))
    started = time.perf_counter()

    def report():
        cuda = torch.cuda.is_available()
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with open(os.environ["SELMA_BENCH_OUT"], "w") as stream:
            json.dump({"step_times": step_times, "started": started, "ended": time.perf_counter(),
                       "peak_memory_bytes": peak, "device": torch.cuda.get_device_name() if cuda else "cpu",
                       "threads": torch.get_num_threads()}, stream)

    atexit.register(report)
    kind, target, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.argv = [target, *arguments]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        stand_in = os.environ.get("SELMA_BENCH_TRANSFORMS_STAND_IN")
        if stand_in:  # the libraries first, so they keep seeing "no torchvision"; then the stand-in
            import importlib, importlib.machinery, importlib.util, types
            for name in os.environ["SELMA_BENCH_IMPORT_FIRST"].split(","):
                importlib.import_module(name)
            spec = importlib.util.spec_from_file_location("torchvision.transforms", stand_in)
            transforms = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(transforms)
            package = types.ModuleType("torchvision")
            package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
            package.transforms = transforms
            sys.modules["torchvision"], sys.modules["torchvision.transforms"] = package, transforms
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
''')

# The torchvision.transforms the peers use, on PIL (only where torchvision cannot load). kohya hands
# ToTensor numpy arrays (height x width x channels, uint8), which np.asarray takes as they are.
TRANSFORMS_STAND_IN = textwrap.dedent('''
    """Stand-in for the torchvision.transforms diffusers' LoRA script and kohya use, with torchvision's semantics."""
    import enum
    import numpy as np
    import torch
    from PIL import Image

    class InterpolationMode(enum.Enum):
        NEAREST = Image.Resampling.NEAREST
        NEAREST_EXACT = Image.Resampling.NEAREST
        BILINEAR = Image.Resampling.BILINEAR
        BICUBIC = Image.Resampling.BICUBIC
        BOX = Image.Resampling.BOX
        HAMMING = Image.Resampling.HAMMING
        LANCZOS = Image.Resampling.LANCZOS

    class Compose:
        def __init__(self, transforms): self.transforms = transforms
        def __call__(self, value):
            for transform in self.transforms:
                value = transform(value)
            return value

    class Lambda:
        def __init__(self, function): self.function = function
        def __call__(self, value): return self.function(value)

    class Resize:
        def __init__(self, size, interpolation=InterpolationMode.BILINEAR): self.size, self.mode = size, interpolation
        def __call__(self, image):
            width, height = image.size
            scale = self.size / min(width, height)
            return image.resize((max(self.size, round(width * scale)), max(self.size, round(height * scale))),
                                self.mode.value)

    class CenterCrop:
        def __init__(self, size): self.size = size
        def __call__(self, image):
            left, top = round((image.width - self.size) / 2), round((image.height - self.size) / 2)
            return image.crop((left, top, left + self.size, top + self.size))

    class RandomCrop(CenterCrop):
        def __call__(self, image):
            top = int(torch.randint(0, image.height - self.size + 1, (1,)))
            left = int(torch.randint(0, image.width - self.size + 1, (1,)))
            return image.crop((left, top, left + self.size, top + self.size))

    class RandomHorizontalFlip:
        def __init__(self, p=0.5): self.p = p
        def __call__(self, image):
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else image

    class ToTensor:
        def __call__(self, image):
            return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    class Normalize:
        def __init__(self, mean, std): self.mean, self.std = mean, std
        def __call__(self, tensor):
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            return (tensor - mean) / std
''')


def write_data(folder: Path, count: int, size: int) -> tuple[Path, Path, Path]:
    """The same images and captions three times: a SELMA folder (ours), an imagefolder (diffusers'
    script) and a kohya folder (``<repeats>_<name>`` under the training folder, one repeat)."""
    import numpy as np
    from PIL import Image

    ours, reference, kohya = folder / "dataset", folder / "imagefolder" / "train", folder / "kohya" / "1_selma"
    for target in (ours, reference, kohya):
        target.mkdir(parents=True)
    rows, columns = np.indices((size, size))
    with (reference / "metadata.jsonl").open("w") as metadata:
        for index in range(count):
            pixels = np.stack([(rows * (index + 1) * 3) % 256, (columns * 5 + index * 31) % 256,
                               ((rows + columns) * (index % 7 + 1)) % 256], axis=-1).astype(np.uint8)
            caption = CAPTIONS[index % len(CAPTIONS)]
            name = f"{index:06d}.png"
            Image.fromarray(pixels).save(ours / name)
            for copy in (reference, kohya):
                shutil.copyfile(ours / name, copy / name)
            (ours / f"{index:06d}.txt").write_text(caption)
            (kohya / f"{index:06d}.txt").write_text(caption)
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return ours, reference.parent, kohya.parent


@dataclass(frozen=True)
class BaseModelFiles:
    """One base model in the forms the trainers read: a diffusers folder (all three) and the UNet config."""

    folder: Path
    description: str
    full_size: bool  # SD 1.x at its real shapes: the only model kohya's loader builds


def sd15_random_model() -> BaseModelFiles:
    """Full-size SD 1.5 with random weights: the test tier's cached single-file checkpoint, and a diffusers
    folder made from it once (cached beside it, renamed into place complete), so every trainer reads the
    same weights."""
    sys.path.insert(0, str(REPOSITORY_ROOT / "tests"))
    import torch
    from full_size_models import build_sd15_random_checkpoint

    from comfyui_selma.trainer.families.loading import load_pipeline

    checkpoint = build_sd15_random_checkpoint()
    folder = checkpoint.with_suffix(".diffusers")
    if not folder.is_dir():
        building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            load_pipeline(checkpoint, architecture="sd1", torch_dtype=torch.float16).save_pretrained(
                building, safe_serialization=True)
            os.rename(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return BaseModelFiles(folder, f"SD 1.5 full size (random weights, {checkpoint.name})", True)


def base_model(choice: str, work: Path) -> BaseModelFiles:
    from comfyui_selma.trainer.families.tiny import save_pipeline, tiny_sd1_pipeline

    if choice == "tiny":
        return BaseModelFiles(save_pipeline(tiny_sd1_pipeline(), work / "tiny-sd1"), "tiny SD 1.x (random weights)",
                              False)
    if choice == "sd15-random":
        return sd15_random_model()
    folder = Path(choice).expanduser()
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--model: {folder} is not a diffusers folder (no model_index.json); expected tiny, "
                         "sd15-random or a diffusers folder")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    return BaseModelFiles(folder, str(folder), tuple(unet.get("block_out_channels", ())) == (320, 640, 1280, 1280))


def attention_projections(model: BaseModelFiles) -> list[tuple[str, int, int]]:
    """(module name, in features, out features) of every attention projection of the UNet, from its config
    on the meta device (no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model.folder / "unet"))
    return [(name, module.in_features, module.out_features) for name, module in unet.named_modules()
            if ATTENTION_PROJECTIONS.fullmatch(name)]


def write_kohya_attention_network(model: BaseModelFiles, rank: int, path: Path) -> int:
    """An initial kohya LoRA file with exactly the attention projections, initialised as kohya initialises
    (down: Kaiming uniform, up: zero), so ``--dim_from_weights`` builds the same coverage as ours; the
    number of modules. kohya names a module ``lora_unet_`` + its path with dots as underscores."""
    import math

    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(42)
    tensors = {}
    projections = attention_projections(model)
    for name, in_features, out_features in projections:
        key = "lora_unet_" + name.replace(".", "_")
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix
        tensors[f"{key}.lora_down.weight"] = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        tensors[f"{key}.lora_up.weight"] = torch.zeros(out_features, rank)
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(projections)


def torchvision_loads(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torchvision.transforms"], capture_output=True)
    return probe.returncode == 0


def stand_in_env(python: str, work: Path, import_first: str) -> dict[str, str]:
    """The environment that puts the torchvision stand-in in place for ``python``, if it needs one."""
    if torchvision_loads(python):
        return {}
    (work / "transforms_stand_in.py").write_text(TRANSFORMS_STAND_IN)
    return {"SELMA_BENCH_TRANSFORMS_STAND_IN": str(work / "transforms_stand_in.py"),
            "SELMA_BENCH_IMPORT_FIRST": import_first}


def with_pythonpath(env: dict[str, str], *folders: str) -> dict[str, str]:
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [*folders, env.get("PYTHONPATH")]))}


def timed_run(name: str, command: list[str], env: dict[str, str], work: Path, warmup: int,
              images_per_step: int, log: Path) -> dict:
    report_path = work / f"{re.sub(r'[^A-Za-z0-9]+', '-', name)}-timing.json"
    started = time.perf_counter()
    with log.open("w") as output:
        result = subprocess.run(command, env={**env, "SELMA_BENCH_OUT": str(report_path)}, stdout=output,
                                stderr=subprocess.STDOUT, cwd=work)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{name} failed (exit code {result.returncode}); last lines of {log}:\n{tail}")
    timing = json.loads(report_path.read_text())
    times = timing["step_times"]
    if len(times) <= warmup + 1:
        raise SystemExit(f"{name}: only {len(times)} optimizer steps were timed; "
                         "ask for more --steps than --warmup + 1")
    steps_per_s = (len(times) - 1 - warmup) / (times[-1] - times[warmup])
    return {"trainer": name, "steps": len(times), "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * images_per_step, "wall_s": wall,
            "peak_memory_gib": timing["peak_memory_bytes"] / 2**30, "device": timing["device"],
            "threads": timing["threads"], "log": str(log)}


def run_ours(arguments: argparse.Namespace, model: BaseModelFiles, data: Path, precision: str, runner: Path,
             env: dict[str, str], work: Path) -> dict:
    from comfyui_selma.trainer.train.config import TrainConfig, write_config

    run_dir = work / "ours"
    config = TrainConfig(
        pretrained_model_name_or_path=str(model.folder), train_data_dir=str(data), resolution=arguments.resolution,
        network_dim=arguments.rank, network_alpha=float(arguments.rank), train_batch_size=arguments.batch,
        gradient_accumulation_steps=arguments.accumulation, max_train_steps=arguments.steps,
        mixed_precision=precision, gradient_checkpointing=arguments.gradient_checkpointing, save_every_n_steps=0,
        cache_dir=str(work / "cache"), seed=42)
    write_config(config, run_dir)
    row = timed_run("comfyui-selma", [arguments.python, str(runner), "module", "trainer.train.loop", "--config",
                                      str(run_dir / "config.toml")],
                    with_pythonpath(env, str(REPOSITORY_ROOT)), work, arguments.warmup,
                    arguments.batch * arguments.accumulation, work / "ours.log")
    return {**row, "lora_targets": "attention projections"}


def run_diffusers(arguments: argparse.Namespace, model: BaseModelFiles, data: Path, precision: str, runner: Path,
                  env: dict[str, str], work: Path) -> dict:
    stand_in = stand_in_env(arguments.python, work, "datasets,diffusers,peft,transformers.image_utils")
    command = [arguments.python, str(runner), "path", arguments.reference_script,
               "--pretrained_model_name_or_path", str(model.folder), "--train_data_dir", str(data),
               "--caption_column", "text", "--resolution", str(arguments.resolution), "--center_crop",
               "--random_flip", "--train_batch_size", str(arguments.batch), "--gradient_accumulation_steps",
               str(arguments.accumulation), "--max_train_steps", str(arguments.steps), "--learning_rate", "3e-4",
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", str(arguments.rank),
               "--mixed_precision", precision, "--seed", "42", "--checkpointing_steps", str(10 * arguments.steps),
               "--output_dir", str(work / "reference"), "--dataloader_num_workers", "0",
               "--cache_dir", str(work / "hf-cache")]
    if arguments.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    row = timed_run("diffusers train_text_to_image_lora.py", command,
                    with_pythonpath({**env, **stand_in}, arguments.reference_pythonpath), work, arguments.warmup,
                    arguments.batch * arguments.accumulation, work / "reference.log")
    return {**row, "lora_targets": "attention projections", "torchvision_stand_in": bool(stand_in)}


def run_kohya(arguments: argparse.Namespace, model: BaseModelFiles, data: Path, precision: str, runner: Path,
              env: dict[str, str], work: Path) -> dict:
    from comfyui_selma.trainer.families.configs import config_folder

    scripts = Path(arguments.kohya_scripts).expanduser().resolve()
    tokenizers = work / "kohya-tokenizers"  # kohya's --tokenizer_cache_dir layout: <id with / as _>
    shutil.copytree(config_folder("sd1") / "tokenizer", tokenizers / "openai_clip-vit-large-patch14")
    command = [arguments.kohya_python, str(runner), "path", str(scripts / "train_network.py"),
               "--pretrained_model_name_or_path", str(model.folder), "--train_data_dir", str(data),
               "--caption_extension", ".txt", "--resolution", str(arguments.resolution), "--flip_aug",
               "--cache_latents", "--sdpa", "--train_batch_size", str(arguments.batch),
               "--gradient_accumulation_steps", str(arguments.accumulation), "--max_train_steps",
               str(arguments.steps), "--learning_rate", "3e-4", "--unet_lr", "3e-4", "--lr_scheduler", "constant",
               "--optimizer_type", "AdamW", "--network_module", "networks.lora", "--network_dim", str(arguments.rank),
               "--network_alpha", str(arguments.rank), "--network_train_unet_only", "--mixed_precision", precision,
               "--save_precision", "fp16", "--save_model_as", "safetensors", "--seed", "42",
               "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir", str(tokenizers),
               "--output_dir", str(work / "kohya-output"), "--output_name", "kohya-lora"]
    if arguments.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    if arguments.kohya_coverage == "attention":
        modules = write_kohya_attention_network(model, arguments.rank, work / "kohya-attention-init.safetensors")
        command += ["--network_weights", str(work / "kohya-attention-init.safetensors"), "--dim_from_weights"]
        targets = f"attention projections ({modules} modules, from --network_weights)"
    else:
        targets = "kohya default: transformer-block linears and 1x1 convs"
    stand_in = stand_in_env(arguments.kohya_python, work, "diffusers,transformers.image_utils")
    row = timed_run("kohya train_network.py", command, with_pythonpath({**env, **stand_in}, str(scripts)), work,
                    arguments.warmup, arguments.batch * arguments.accumulation, work / "kohya.log")
    created = re.search(r"create LoRA for U-Net: (\d+) modules", Path(row["log"]).read_text(errors="replace"))
    if created:
        targets += f"; kohya created {created[1]}"
    return {**row, "lora_targets": targets, "torchvision_stand_in": bool(stand_in)}


TRAINERS = {"ours": run_ours, "diffusers": run_diffusers, "kohya": run_kohya}


def print_table(rows: list[dict], setting: dict) -> None:
    print(f"\nSettings: {json.dumps(setting)}")
    print(f"{'trainer':<40} {'steps/s':>9} {'images/s':>9} {'wall s':>8} {'peak GiB':>9}  device (threads)")
    for row in rows:
        print(f"{row['trainer']:<40} {row['steps_per_s']:>9.3f} {row['images_per_s']:>9.2f} {row['wall_s']:>8.1f} "
              f"{row['peak_memory_gib']:>9.2f}  {row['device']} ({row['threads']})")
    ours = rows[0]
    for peer in rows[1:] if ours["trainer"] == "comfyui-selma" else []:
        print(f"vs {peer['trainer']}: {ours['images_per_s'] / peer['images_per_s']:.2f}x the images/s at "
              f"{ours['peak_memory_gib'] / peer['peak_memory_gib']:.2f}x the memory")
    for row in rows:
        print(f"LoRA targets of {row['trainer']}: {row['lora_targets']}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-script", default=os.environ.get("SELMA_REFERENCE_SCRIPT", ""),
                        help="path of diffusers' examples/text_to_image/train_text_to_image_lora.py")
    parser.add_argument("--reference-pythonpath", default=os.environ.get("SELMA_REFERENCE_PYTHONPATH", ""),
                        help="extra PYTHONPATH for the reference (a folder holding the datasets package)")
    parser.add_argument("--kohya-scripts", default=os.environ.get("SELMA_KOHYA_SCRIPTS", ""),
                        help="a kohya-ss/sd-scripts checkout (its train_network.py); empty: no kohya row")
    parser.add_argument("--kohya-python", default=os.environ.get("SELMA_KOHYA_PYTHON", ""),
                        help="interpreter with sd-scripts' requirements; default: --python")
    parser.add_argument("--kohya-coverage", choices=("attention", "kohya"), default="attention",
                        help="kohya's LoRA targets: the attention projections (as ours), or kohya's default")
    parser.add_argument("--trainers", default="ours,diffusers,kohya",
                        help="comma-separated, in this order: ours, diffusers, kohya (kohya only with --kohya-scripts)")
    parser.add_argument("--model", default="tiny", help="tiny, sd15-random (full size, random weights; kohya needs "
                                                        "a full-size SD 1.x) or a diffusers folder")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank in all); SELMA: 128")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per step")
    parser.add_argument("--accumulation", type=int, default=8, help="gradient accumulation (SELMA: batch 64 in all)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the rate")
    parser.add_argument("--images", type=int, default=64, help="dataset size")
    parser.add_argument("--precision", default="", help="no / fp16 / bf16; default: fp16 on a GPU, no on a CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in every trainer")
    parser.add_argument("--python", default=sys.executable, help="interpreter for ours and diffusers' script")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="where the results file goes")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs)")
    arguments = parser.parse_args()
    arguments.trainers = [name.strip() for name in arguments.trainers.split(",") if name.strip()]
    unknown = sorted(set(arguments.trainers) - set(TRAINERS))
    if unknown or not arguments.trainers:
        parser.error(f"--trainers: {', '.join(unknown) or 'none given'}; expected some of {', '.join(TRAINERS)}")
    if not arguments.kohya_scripts and "kohya" in arguments.trainers:
        arguments.trainers.remove("kohya")
    if "diffusers" in arguments.trainers and not Path(arguments.reference_script).expanduser().is_file():
        parser.error("--reference-script: give the path of diffusers' train_text_to_image_lora.py "
                     "(examples/text_to_image/ in a diffusers checkout)")
    if arguments.kohya_scripts and not (Path(arguments.kohya_scripts).expanduser() / "train_network.py").is_file():
        parser.error(f"--kohya-scripts: {arguments.kohya_scripts} holds no train_network.py; expected a "
                     "kohya-ss/sd-scripts checkout")
    if "kohya" in arguments.trainers and arguments.model == "tiny":
        parser.error("--kohya-scripts: kohya's loader builds SD 1.x at its real shapes, so it cannot load the tiny "
                     "model; add --model sd15-random (or a full-size diffusers folder)")
    arguments.kohya_python = arguments.kohya_python or arguments.python
    return arguments


def main() -> int:
    arguments = parse_arguments()
    import torch

    precision = arguments.precision or ("fp16" if torch.cuda.is_available() else "no")
    work = Path(tempfile.mkdtemp(prefix="selma-train-speed-"))
    try:
        model = base_model(arguments.model, work)
        if "kohya" in arguments.trainers and not model.full_size:
            raise SystemExit(f"--model {arguments.model}: not a full-size SD 1.x, which kohya's loader needs")
        ours_data, reference_data, kohya_data = write_data(work, arguments.images, max(arguments.resolution, 64))
        runner = work / "timed_runner.py"
        runner.write_text(TIMED_RUNNER)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "DO_NOT_TRACK": "1", "WANDB_DISABLED": "true"}
        data = {"ours": ours_data, "diffusers": reference_data, "kohya": kohya_data}
        rows = [TRAINERS[name](arguments, model, data[name], precision, runner, env, work)
                for name in arguments.trainers]
    finally:
        if not arguments.keep:
            shutil.rmtree(work, ignore_errors=True)

    setting = {"model": model.description, "resolution": arguments.resolution, "rank": arguments.rank,
               "batch": arguments.batch, "accumulation": arguments.accumulation, "steps": arguments.steps,
               "warmup": arguments.warmup, "images": arguments.images, "precision": precision,
               "gradient_checkpointing": arguments.gradient_checkpointing,
               "trainers": arguments.trainers, "reference_script": arguments.reference_script or None,
               "kohya_scripts": arguments.kohya_scripts or None,
               "kohya_coverage": arguments.kohya_coverage if "kohya" in arguments.trainers else None}
    print_table(rows, setting)
    results = Path(arguments.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"settings": setting, "rows": rows, "machine": platform.platform(),
                                   "python": platform.python_version(), "torch": torch.__version__,
                                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    print(f"written: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
