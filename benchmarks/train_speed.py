"""Benchmark: our LoRA trainer against diffusers' ``train_text_to_image_lora.py`` (the script SELMA used).

Run from the repository root:

    .venv/bin/python benchmarks/train_speed.py --reference-script PATH/TO/train_text_to_image_lora.py

The reference script is not part of this repository: take it from a diffusers checkout
(``examples/text_to_image/train_text_to_image_lora.py``) and point ``--reference-script`` (or
``$SELMA_REFERENCE_SCRIPT``) at it. It needs the ``datasets`` package; give ``--reference-pythonpath``
a folder that holds it if it is not installed. Where torchvision cannot be imported (the registry's
CUDA build beside a CPU torch), a small PIL stand-in for the few ``torchvision.transforms`` the script
uses is put on its path, and the table says so.

Both trainers run one after the other in this invocation, each in a fresh process, on the same base
model, the same images and captions, and the same settings (rank, alpha = rank, UNet attention
projections, constant learning rate, batch x accumulation, random flip, centre crop, seed,
precision). Each process is timed by a hook after every optimizer step; steps/s and images/s are
measured over the steps after ``--warmup``; wall time covers the whole process (model loading, our
caching). Peak memory is the CUDA allocator's peak on a GPU, else the process's peak resident set.
Results go to ``benchmarks/results/train_speed.json`` (ignored by git).

Defaults are the CPU row: the tiny SD 1.x model at 64 px. On a GPU, pass ``--model`` (a diffusers
folder of SD 1.5 or SDXL, random weights are fine), ``--resolution 512`` and SELMA's ``--rank 128``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPOSITORY_ROOT / "benchmarks" / "results" / "train_speed.json"
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
        if stand_in:  # transformers and peft first, so they keep seeing "no torchvision"; then the stand-in
            import importlib.machinery, importlib.util, types
            import datasets, diffusers, peft, transformers.image_utils
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

# The torchvision.transforms the reference script uses, on PIL (only where torchvision cannot load).
TRANSFORMS_STAND_IN = textwrap.dedent('''
    """Stand-in for the torchvision.transforms diffusers' LoRA script uses, with torchvision's semantics."""
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


def write_data(folder: Path, count: int, size: int) -> tuple[Path, Path]:
    """The same images and captions twice: a kohya/SELMA folder (ours) and an imagefolder (the reference)."""
    import numpy as np
    from PIL import Image

    ours, reference = folder / "dataset", folder / "imagefolder" / "train"
    ours.mkdir(parents=True)
    reference.mkdir(parents=True)
    rows, columns = np.indices((size, size))
    with (reference / "metadata.jsonl").open("w") as metadata:
        for index in range(count):
            pixels = np.stack([(rows * (index + 1) * 3) % 256, (columns * 5 + index * 31) % 256,
                               ((rows + columns) * (index % 7 + 1)) % 256], axis=-1).astype(np.uint8)
            caption = CAPTIONS[index % len(CAPTIONS)]
            name = f"{index:06d}.png"
            Image.fromarray(pixels).save(ours / name)
            shutil.copyfile(ours / name, reference / name)
            (ours / f"{index:06d}.txt").write_text(caption)
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return ours, reference.parent


def torchvision_loads(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torchvision.transforms"], capture_output=True)
    return probe.returncode == 0


def timed_run(name: str, command: list[str], env: dict[str, str], work: Path, warmup: int,
              images_per_step: int, log: Path) -> dict:
    report_path = work / f"{name}-timing.json"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-script", default=os.environ.get("SELMA_REFERENCE_SCRIPT", ""),
                        help="path of diffusers' examples/text_to_image/train_text_to_image_lora.py")
    parser.add_argument("--reference-pythonpath", default=os.environ.get("SELMA_REFERENCE_PYTHONPATH", ""),
                        help="extra PYTHONPATH for the reference (a folder holding the datasets package)")
    parser.add_argument("--model", default="", help="diffusers model folder; default: the tiny SD 1.x model")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank in both); SELMA: 128")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per step")
    parser.add_argument("--accumulation", type=int, default=8, help="gradient accumulation (SELMA: batch 64 in all)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the rate")
    parser.add_argument("--images", type=int, default=64, help="dataset size")
    parser.add_argument("--precision", default="", help="no / fp16 / bf16; default: fp16 on a GPU, no on a CPU")
    parser.add_argument("--python", default=sys.executable, help="interpreter for both trainers")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs)")
    arguments = parser.parse_args()
    script = Path(arguments.reference_script).expanduser()
    if not script.is_file():
        parser.error("--reference-script: give the path of diffusers' train_text_to_image_lora.py "
                     "(examples/text_to_image/ in a diffusers checkout)")

    import torch

    from comfyui_selma.trainer.tiny_models import save_pipeline, tiny_sd1_pipeline
    from comfyui_selma.trainer.train_config import TrainConfig, write_config

    on_gpu = torch.cuda.is_available()
    precision = arguments.precision or ("fp16" if on_gpu else "no")
    work = Path(tempfile.mkdtemp(prefix="selma-train-speed-"))
    try:
        model = Path(arguments.model) if arguments.model else save_pipeline(tiny_sd1_pipeline(), work / "tiny-sd1")
        ours_data, reference_data = write_data(work, arguments.images, max(arguments.resolution, 64))
        runner = work / "timed_runner.py"
        runner.write_text(TIMED_RUNNER)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "DO_NOT_TRACK": "1", "WANDB_DISABLED": "true"}
        images_per_step = arguments.batch * arguments.accumulation

        run_dir = work / "ours"
        config = TrainConfig(
            pretrained_model_name_or_path=str(model), train_data_dir=str(ours_data), resolution=arguments.resolution,
            network_dim=arguments.rank, network_alpha=float(arguments.rank), train_batch_size=arguments.batch,
            gradient_accumulation_steps=arguments.accumulation, max_train_steps=arguments.steps,
            mixed_precision=precision, save_every_n_steps=0, cache_dir=str(work / "cache"), seed=42)
        write_config(config, run_dir)
        ours = timed_run("comfyui-selma", [arguments.python, str(runner), "module", "trainer.train", "--config",
                                           str(run_dir / "config.toml")],
                         {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY_ROOT),
                                                                              env.get("PYTHONPATH")]))},
                         work, arguments.warmup, images_per_step, work / "ours.log")

        reference_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [arguments.reference_pythonpath,
                                                                             env.get("PYTHONPATH")]))}
        stand_in = not torchvision_loads(arguments.python)
        if stand_in:
            (work / "transforms_stand_in.py").write_text(TRANSFORMS_STAND_IN)
            reference_env["SELMA_BENCH_TRANSFORMS_STAND_IN"] = str(work / "transforms_stand_in.py")
        reference = timed_run(
            "diffusers train_text_to_image_lora.py",
            [arguments.python, str(runner), "path", str(script), "--pretrained_model_name_or_path", str(model),
             "--train_data_dir", str(reference_data), "--caption_column", "text", "--resolution",
             str(arguments.resolution), "--center_crop", "--random_flip", "--train_batch_size", str(arguments.batch),
             "--gradient_accumulation_steps", str(arguments.accumulation), "--max_train_steps", str(arguments.steps),
             "--learning_rate", "3e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank",
             str(arguments.rank), "--mixed_precision", precision, "--seed", "42", "--checkpointing_steps",
             str(10 * arguments.steps), "--output_dir", str(work / "reference"), "--dataloader_num_workers", "0",
             "--cache_dir", str(work / "hf-cache")],
            reference_env, work, arguments.warmup, images_per_step, work / "reference.log")
    finally:
        if not arguments.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [ours, reference]
    setting = {"model": arguments.model or "tiny SD 1.x (random weights)", "resolution": arguments.resolution,
               "rank": arguments.rank, "batch": arguments.batch, "accumulation": arguments.accumulation,
               "steps": arguments.steps, "warmup": arguments.warmup, "images": arguments.images,
               "precision": precision, "reference_script": str(script),
               "torchvision_stand_in_for_reference": stand_in}
    print(f"\nSettings: {json.dumps(setting)}")
    print(f"{'trainer':<40} {'steps/s':>9} {'images/s':>9} {'wall s':>8} {'peak GiB':>9}  device (threads)")
    for row in rows:
        print(f"{row['trainer']:<40} {row['steps_per_s']:>9.3f} {row['images_per_s']:>9.2f} {row['wall_s']:>8.1f} "
              f"{row['peak_memory_gib']:>9.2f}  {row['device']} ({row['threads']})")
    print(f"speed-up (images/s): {ours['images_per_s'] / reference['images_per_s']:.2f}x; "
          f"memory: {ours['peak_memory_gib'] / reference['peak_memory_gib']:.2f}x of the reference's")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({"settings": setting, "rows": rows, "machine": platform.platform(),
                                        "python": platform.python_version(), "torch": torch.__version__,
                                        "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    print(f"written: {RESULTS_PATH.relative_to(REPOSITORY_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
