"""Every GPU row of the benchmarks in one run, for a machine that is lent for minutes: one results file.

Run through ``benchmarks/gpu_rows.sh`` (it installs the carried wheels first; see that file), or here on a CPU
with the tiny models to check the whole path:

    PYTHON=.venv/bin/python bash benchmarks/gpu_rows.sh --tiny --reference-script PATH/train_text_to_image_lora.py \\
        --reference-pythonpath PATH/datasets-folder

Sections, in order (each appends to the results file as soon as it is done, and one that would start past
``--budget-s`` is skipped and says so):

1. **peak**: the device's bf16 matrix-product rate (8192^3, mean of 10 after 3 warm-ups), the denominator of
   model FLOP utilisation (MFU) beside the data-sheet peak ``--peak-tflops``;
2. **flops**: the UNet's FLOPs per image (``benchmarks/flops.py``), for SD 1.5 at 512 px and SDXL at 1024 px;
3. **models**: full-size SD 1.5 and SDXL with random weights, built on the device from the shipped configs and
   saved as diffusers folders (fp16) for the trainers and the renderer;
4. **train**: ``train_speed.py``: ours vs diffusers' script vs kohya's at SD 1.5 512 px, rank 128, batch 8,
   bf16 (SELMA's settings), images/s, peak memory and MFU;
5. **sdxl**: ``train_speed.py``, ours alone: SDXL 1024 px rank 128 micro-batch 4, peak memory; again with
   gradient checkpointing only if the first run needs more than 24 GiB;
6. **render**: ``render_batching.py``: prompts batched (4, 8) vs one call per prompt, SD 1.5 512 px and SDXL
   1024 px;
7. **variants**: one LoRA training step of SD 1.5 512 px rank 128 batch 8, each technique on its own against a
   baseline (bf16 autocast, PyTorch's SDPA choice, fused AdamW, a ``loss.item()`` per step as our trainer
   does): fp16, ``channels_last``, each SDPA kernel alone, foreach AdamW, gradient checkpointing, no host sync,
   ``torch.compile`` (last: its compile time is the risk). The LoRA is the trainer's own (``add_lora``).

With ``--tiny`` every model is the tiny SD 1.x / SDXL at 64 px and kohya is left out (its loader builds only
full-size SD 1.x; ``train_speed.py --model sd15-random`` runs it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import SELMA_CASES, add_selma_lora, build_unet, count_unet_flops, unet_inputs  # noqa: E402

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPOSITORY_ROOT / "benchmarks"
H200_BF16_PEAK_TFLOPS = 989.4  # data sheet, dense bf16 (H100/H200 SXM)
MEMORY_LIMIT_GIB = 24  # the SDXL goal: a 24 GB card


@dataclass(frozen=True)
class Scale:
    """The sizes one run uses: the real ones on a GPU, the tiny ones with --tiny."""

    sd1_resolution: int
    sdxl_resolution: int
    train_steps: int
    train_warmup: int
    train_images: int
    render_prompts: int
    render_steps: int
    variant_batch: int
    variant_steps: int


GPU_SCALE = Scale(512, 1024, train_steps=30, train_warmup=5, train_images=64, render_prompts=16, render_steps=20,
                  variant_batch=8, variant_steps=10)
TINY_SCALE = Scale(64, 64, train_steps=4, train_warmup=1, train_images=16, render_prompts=8, render_steps=4,
                   variant_batch=2, variant_steps=3)


class Results:
    """The one results file, rewritten whole after every section (a run cut short keeps what it measured)."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "sections": {}}
        self.save()

    def add(self, section: str, value) -> None:
        self.data["sections"][section] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(temporary, self.path)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured_bf16_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def tiny_unet_config(architecture: str) -> dict:
    from comfyui_selma.trainer.families.tiny import tiny_sd1_pipeline, tiny_sdxl_pipeline

    return dict((tiny_sd1_pipeline if architecture == "sd1" else tiny_sdxl_pipeline)().unet.config)


def build_model_folders(tiny: bool, folder: Path, device: str) -> dict[str, Path]:
    """A diffusers folder per architecture: the tiny models, or full size with random weights built on
    ``device`` from the shipped configs and saved in fp16."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from comfyui_selma.trainer.families.configs import config_folder
    from comfyui_selma.trainer.families.tiny import save_pipeline, tiny_sd1_pipeline, tiny_sdxl_pipeline

    if tiny:
        return {"sd1": save_pipeline(tiny_sd1_pipeline(), folder / "sd1"),
                "sdxl": save_pipeline(tiny_sdxl_pipeline(), folder / "sdxl")}
    folders = {}
    for architecture, pipeline_class in (("sd1", diffusers.StableDiffusionPipeline),
                                         ("sdxl", diffusers.StableDiffusionXLPipeline)):
        configs = config_folder(architecture)
        torch.manual_seed(0)
        scheduler_config = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
        with torch.device(device):
            parts = {
                "unet": build_unet(architecture, device, torch.float16),
                "vae": diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(configs / "vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
                "tokenizer": CLIPTokenizer.from_pretrained(configs / "tokenizer"),
                "scheduler": getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
            }
            if architecture == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
                parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(configs / "tokenizer_2")
            else:
                parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline = pipeline_class(**parts).to(torch.float16)
        pipeline.save_pretrained(folder / architecture, safe_serialization=True)
        folders[architecture] = folder / architecture
        del pipeline, parts
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folders


def run_benchmark(script: str, arguments: list[str], log: Path) -> dict:
    """Run one of the benchmark scripts with its ``--results`` in a file of its own; its results."""
    results = log.with_suffix(".json")
    with log.open("w") as output:
        completed = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments, "--results", str(results)],
                                   stdout=output, stderr=subprocess.STDOUT, cwd=REPOSITORY_ROOT)
    if completed.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        return {"failed": f"{script} exited {completed.returncode}", "log_tail": tail}
    return json.loads(results.read_text())


def with_mfu(rows: list[dict], flops_per_image: float, peaks: dict[str, float | None]) -> list[dict]:
    for row in rows:
        achieved = row["images_per_s"] * flops_per_image / 1e12
        row["model_tflops"] = achieved
        row.update({f"mfu_vs_{name}": achieved / peak for name, peak in peaks.items() if peak})
    return rows


# ---------------------------------------------------------------------------------------------- variants

BASELINE = {"precision": "bf16", "channels_last": False, "sdpa": "default", "fused_adamw": True,
            "gradient_checkpointing": False, "sync_per_step": True, "compile": False}
VARIANTS = {
    "baseline (bf16 autocast, SDPA default, fused AdamW, loss.item() per step)": {},
    "fp16 autocast + GradScaler": {"precision": "fp16"},
    "channels_last": {"channels_last": True},
    "SDPA flash only": {"sdpa": "flash"},
    "SDPA memory-efficient only": {"sdpa": "efficient"},
    "SDPA math only": {"sdpa": "math"},
    "foreach AdamW (not fused)": {"fused_adamw": False},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "no host sync per step": {"sync_per_step": False},
    "torch.compile(unet) with the LoRA layers": {"compile": True},
}
# Which of these our trainer (trainer/train/loop.py) can do today; the rows measure the technique either way.
IN_OUR_TRAINER = {"precision": "mixed_precision fp16 / bf16", "channels_last": None, "sdpa": "PyTorch's choice "
                  "(diffusers' default attention processor)", "fused_adamw": "fused on CUDA",
                  "gradient_checkpointing": "gradient_checkpointing", "sync_per_step": "loss.item() every step",
                  "compile": None}


def sdpa_context(choice: str):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}
    return nullcontext() if choice == "default" else sdpa_kernel([kernels[choice]])


def variant_rate(settings: dict, architecture: str, unet_config: dict | None, resolution: int, batch: int,
                 rank: int, steps: int, device: str) -> dict:
    """Images/s and peak memory of LoRA training steps of the UNet under ``settings`` (one change from
    BASELINE), the base frozen in the compute precision and the LoRA in fp32, as the trainer keeps them."""
    dtype = torch.float16 if settings["precision"] == "fp16" else torch.bfloat16
    if device == "cpu":
        dtype = torch.bfloat16
    unet = build_unet(architecture, device, dtype, config=unet_config)
    add_selma_lora(unet, architecture, rank)
    lora = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in lora:
        parameter.data = parameter.data.float()
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    unet.to(memory_format=memory_format)
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = torch.compile(unet) if settings["compile"] else unet
    optimizer = torch.optim.AdamW(lora, lr=3e-4, fused=settings["fused_adamw"] and device == "cuda",
                                  foreach=None if settings["fused_adamw"] else True)
    scaler = torch.amp.GradScaler(device, enabled=settings["precision"] == "fp16" and device == "cuda")
    inputs = unet_inputs(unet, batch, resolution, device, dtype)
    inputs["sample"] = inputs["sample"].contiguous(memory_format=memory_format)
    target = torch.randn_like(inputs["sample"], dtype=torch.float32)

    def step() -> None:
        with torch.autocast(device, dtype=dtype), sdpa_context(settings["sdpa"]):
            loss = torch.nn.functional.mse_loss(model(**inputs).sample.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if settings["sync_per_step"]:
            loss.item()

    started = time.perf_counter()
    for _ in range(3):
        step()
    synchronize()
    warm = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    synchronize()
    seconds = time.perf_counter() - warm
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del model, unet, optimizer, inputs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"images_per_s": steps * batch / seconds, "step_ms": 1000 * seconds / steps,
            "warmup_s": warm - started, "peak_memory_gib": peak}


def variant_rows(scale: Scale, tiny: bool, device: str, deadline: float, peaks: dict, flops_per_image: float) -> list:
    rows = []
    for name, change in VARIANTS.items():
        settings = {**BASELINE, **change}
        changed = next(iter(change), None)
        row = {"variant": name, "settings": settings,
               "in_our_trainer": IN_OUR_TRAINER[changed] if changed else "yes (our trainer's defaults on CUDA)"}
        if time.monotonic() > deadline:
            rows.append({**row, "skipped": "the run's time budget was spent"})
            continue
        if device == "cpu" and (settings["sdpa"] in ("flash", "efficient") or settings["precision"] == "fp16"):
            rows.append({**row, "skipped": "CUDA only"})
            continue
        try:
            row.update(variant_rate(settings, "sd1", tiny_unet_config("sd1") if tiny else None, scale.sd1_resolution,
                                    scale.variant_batch, 128 if not tiny else 8, scale.variant_steps, device))
        except Exception as error:  # a kernel a device lacks is a result too
            row["failed"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print(f"variant {name}: {row.get('images_per_s', row.get('failed', row.get('skipped')))}", flush=True)
    baseline = rows[0].get("images_per_s")
    for row in rows:
        if baseline and row.get("images_per_s"):
            row["vs_baseline"] = row["images_per_s"] / baseline
    with_mfu([row for row in rows if "images_per_s" in row], flops_per_image, peaks)
    return rows


# ---------------------------------------------------------------------------------------------- main


def datasets_missing(pythonpath: str) -> str | None:
    """Why diffusers' script cannot run here (its ``datasets`` does not import), or None."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True, text=True, env=env)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("SELMA_GPU_ROWS_TINY") == "1",
                        help="tiny models at 64 px (a CPU check of the whole path); also SELMA_GPU_ROWS_TINY=1")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(BENCHMARKS / "results"),
                        help="folder of the results file gpu_rows.json (default: $OUT, else benchmarks/results)")
    parser.add_argument("--work", default="", help="scratch folder (models, logs); default: a new one in /tmp")
    parser.add_argument("--budget-s", type=float, default=540, help="no section starts after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS, help="data-sheet bf16 peak")
    parser.add_argument("--reference-script", default=os.environ.get("SELMA_REFERENCE_SCRIPT", ""))
    parser.add_argument("--reference-pythonpath", default=os.environ.get("SELMA_REFERENCE_PYTHONPATH", ""))
    parser.add_argument("--kohya-scripts", default=os.environ.get("SELMA_KOHYA_SCRIPTS", ""))
    parser.add_argument("--kohya-python", default=os.environ.get("SELMA_KOHYA_PYTHON", ""))
    parser.add_argument("--sections", default="peak,flops,models,train,sdxl,render,variants")
    arguments = parser.parse_args()
    started = time.monotonic()
    deadline = started + arguments.budget_s
    sections = set(arguments.sections.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = TINY_SCALE if arguments.tiny else GPU_SCALE
    work = Path(arguments.work or tempfile.mkdtemp(prefix="selma-gpu-rows-"))
    work.mkdir(parents=True, exist_ok=True)
    results = Results(Path(arguments.out) / "gpu_rows.json", {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "tiny": arguments.tiny, "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "scale": vars(scale)})

    def time_left(section: str) -> bool:
        if section not in sections:
            return False
        if time.monotonic() > deadline:
            results.add(section, {"skipped": f"started past the {arguments.budget_s:.0f} s budget"})
            return False
        print(f"[{time.monotonic() - started:6.1f} s] {section}", flush=True)
        return True

    peaks = {"datasheet": arguments.peak_tflops if device == "cuda" else None}
    if time_left("peak"):
        peaks["measured"] = measured_bf16_tflops()
        results.add("peak", {"bf16_tflops_measured": peaks["measured"], "bf16_tflops_datasheet": peaks["datasheet"]})
    flops = {}
    if time_left("flops"):
        cases = [("sd1", scale.sd1_resolution), ("sdxl", scale.sdxl_resolution)] if arguments.tiny else SELMA_CASES
        for architecture, resolution in cases:
            flops[architecture] = count_unet_flops(architecture, resolution, 8 if arguments.tiny else 128,
                                                   tiny_unet_config(architecture) if arguments.tiny else None)
        results.add("flops", flops)
    lora_flops = {name: row["lora_training_flops"] for name, row in flops.items()}
    models = {}
    if time_left("models"):
        models = build_model_folders(arguments.tiny, work / "models", device)
        results.add("models", {name: str(path) for name, path in models.items()})
    precision = "bf16" if device == "cuda" else "no"
    rank = "8" if arguments.tiny else "128"
    common = ["--rank", rank, "--precision", precision, "--steps", str(scale.train_steps), "--warmup",
              str(scale.train_warmup), "--images", str(scale.train_images), "--accumulation", "1"]
    if models and time_left("train"):
        trainers = ["ours"]
        missing = datasets_missing(arguments.reference_pythonpath) if arguments.reference_script else \
            "no --reference-script"
        if not missing:
            trainers.append("diffusers")
        if arguments.kohya_scripts and not arguments.tiny:
            trainers.append("kohya")
        peers = ["--reference-script", arguments.reference_script, "--reference-pythonpath",
                 arguments.reference_pythonpath, "--kohya-scripts", arguments.kohya_scripts if "kohya" in trainers
                 else "", "--kohya-python", arguments.kohya_python]
        train = run_benchmark("train_speed.py", ["--model", str(models["sd1"]), "--resolution",
                                                 str(scale.sd1_resolution), "--batch", "8" if not arguments.tiny
                                                 else "2", "--trainers", ",".join(trainers), *peers, *common],
                              work / "train_sd15.log")
        if "rows" in train and "sd1" in lora_flops:
            with_mfu(train["rows"], lora_flops["sd1"], peaks)
        results.add("train", {**train, "left_out": {"diffusers": missing} if missing else {}})
    if models and time_left("sdxl"):
        runs = []
        for checkpointing in (False, True):
            run = run_benchmark("train_speed.py", ["--model", str(models["sdxl"]), "--resolution",
                                                   str(scale.sdxl_resolution), "--batch", "4", "--trainers", "ours",
                                                   *common, *(["--gradient-checkpointing"] if checkpointing else [])],
                                work / f"train_sdxl_gc{int(checkpointing)}.log")
            if "rows" in run and "sdxl" in lora_flops:
                with_mfu(run["rows"], lora_flops["sdxl"], peaks)
            runs.append(run)
            peak = run.get("rows", [{}])[0].get("peak_memory_gib", 0)
            if device != "cuda" or peak <= MEMORY_LIMIT_GIB or time.monotonic() > deadline:
                break  # checkpointing only when memory needs it
        results.add("sdxl", runs)
    if models and time_left("render"):
        render = {}
        for architecture, size in (("sd1", scale.sd1_resolution), ("sdxl", scale.sdxl_resolution)):
            prompts = scale.render_prompts if architecture == "sd1" else max(8, scale.render_prompts // 2)
            render[architecture] = run_benchmark("render_batching.py", [
                "--model", str(models[architecture]), "--size", str(size), "--steps", str(scale.render_steps),
                "--prompts", str(prompts), "--device", device, "--repeats", "1", "--no-comfyui"],
                work / f"render_{architecture}.log")
        results.add("render", render)
    if time_left("variants"):
        results.add("variants", variant_rows(scale, arguments.tiny, device, deadline, peaks, lora_flops.get("sd1", 0.0)))
    results.data["seconds"] = time.monotonic() - started
    results.save()
    print(json.dumps(summary(results.data), indent=1))
    print(f"written: {results.path} in {time.monotonic() - started:.0f} s")
    return 0


def summary(data: dict) -> dict:
    """The figures a README row quotes, from the results."""
    sections = {name: value for name, value in data["sections"].items()
                if not (isinstance(value, dict) and "skipped" in value)}
    short = {}
    for row in sections.get("train", {}).get("rows", []):
        short[f"train {row['trainer']}"] = {key: round(row[key], 3) for key in
                                           ("images_per_s", "peak_memory_gib", "mfu_vs_measured") if key in row}
    for run in sections.get("sdxl", []):
        for row in run.get("rows", []):
            short[f"sdxl gc={run['settings']['gradient_checkpointing']}"] = {
                key: round(row[key], 3) for key in ("images_per_s", "peak_memory_gib") if key in row}
    for architecture, render in sections.get("render", {}).items():  # a failed run has no rows
        for row in render.get("rows", []):
            short[f"render {architecture} batch {row['batch_size']}"] = round(row["speedup_vs_one_call_per_prompt"], 2)
    for row in sections.get("variants", []):
        short[f"variant {row['variant']}"] = row.get("vs_baseline") or row.get("failed") or row.get("skipped")
    return short


if __name__ == "__main__":
    sys.exit(main())
