"""Images per second of SELMA's rendering: prompts batched (4 and 8 per sampler call) vs one call per
prompt, same model, steps, size and seeds, in the same run.

Two engines, each measured with all three batch sizes back to back:

- **diffusers** (``selma render``'s :class:`DiffusersRenderer`): the tiny SD 1.x model by default,
  or ``--model PATH``;
- **ComfyUI** (the SELMA Render Dataset node inside a real ComfyUI): when ``COMFYUI_PATH`` names a
  ComfyUI checkout (``COMFYUI_PYTHON`` its Python), on a random-weight full-size SD 1.5 checkpoint
  (ComfyUI recognises models by their shapes, so a tiny one will not load). The checkpoint is built
  once and cached (``tests/full_size_models.py``). Each batch size renders its own dataset; the time
  is ComfyUI's own execution time of the node (from ``/history``), so model loading is excluded by a
  warm-up render first.

    .venv/bin/python benchmarks/render_batching.py                       # CPU: tiny model + ComfyUI if set
    .venv/bin/python benchmarks/render_batching.py --model PATH --size 512 --steps 20 --device cuda

Prints a table and writes benchmarks/results/render_batching.json (ignored by git). On a CPU the
ratio says little about a GPU at 512 px; it is recorded anyway. Timings on a shared machine are
noisy: each figure is the best of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from comfyui_selma.trainer.render.dataset import batches
from comfyui_selma.trainer.prompts.prompt_set import prompt_set_of
from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts
from comfyui_selma.trainer.render.run import DiffusersRenderer, load_renderer_pipeline
from comfyui_selma.trainer.families.tiny import save_pipeline, tiny_sd1_pipeline

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "render_batching.json"
BATCH_SIZES = (1, 4, 8)


def template_prompts(count: int, folder: Path) -> list[str]:
    path = folder / "prompts.jsonl"
    expand_prompts(PromptConfig(skill="everyday_objects", backend="template", count=count), path)
    return list(prompt_set_of(path).prompts)


# ---------------------------------------------------------------------------------------------------
# diffusers


def diffusers_rate(renderer: DiffusersRenderer, prompts: list[str], batch_size: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    lengths = {index: renderer.conditioning_length(prompt) for index, prompt in enumerate(prompts)}
    sync()
    start = time.perf_counter()
    for batch in batches(range(len(prompts)), batch_size, lengths):  # as selma render batches them
        renderer([prompts[index] for index in batch], batch)
    sync()
    return len(prompts) / (time.perf_counter() - start)


def diffusers_rows(arguments: argparse.Namespace, scratch: Path) -> list[dict]:
    model = arguments.model or str(save_pipeline(tiny_sd1_pipeline(), scratch / "tiny-sd1"))
    prompts = template_prompts(arguments.prompts, scratch)
    pipeline = load_renderer_pipeline(model, arguments.device, arguments.dtype)
    renderer = DiffusersRenderer(pipeline, arguments.size, arguments.size, arguments.steps, cfg=7.5)
    diffusers_rate(renderer, prompts[:max(BATCH_SIZES)], max(BATCH_SIZES), arguments.device)  # warm-up
    best = {batch_size: 0.0 for batch_size in BATCH_SIZES}
    for _ in range(arguments.repeats):
        for batch_size in BATCH_SIZES:
            best[batch_size] = max(best[batch_size], diffusers_rate(renderer, prompts, batch_size, arguments.device))
            print(f"diffusers: batch {batch_size}: best so far {best[batch_size]:.2f} images/s", flush=True)
    return [{"engine": "diffusers", "model": arguments.model or "tiny SD 1.x (random)", "device": arguments.device,
             "size": arguments.size, "steps": arguments.steps, "prompts": len(prompts), "batch_size": batch_size,
             "images_per_s": best[batch_size]} for batch_size in BATCH_SIZES]


# ---------------------------------------------------------------------------------------------------
# ComfyUI


def start_comfyui(comfyui_path: str, base_dir: Path):
    """A ComfyUI on a free port with this pack linked into ``custom_nodes``; returns (server, process)."""
    sys.path.insert(0, str(REPOSITORY_ROOT / "tests"))
    from comfyui_server import PACK_FOLDER_NAME, ComfyUIServer, _free_port, _wait_until_up

    (base_dir / "custom_nodes").mkdir(parents=True)
    (base_dir / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(REPOSITORY_ROOT, target_is_directory=True)
    port = _free_port()
    server = ComfyUIServer(url=f"http://127.0.0.1:{port}", base_dir=base_dir, log_path=base_dir / "comfyui.log")
    command = [os.environ.get("COMFYUI_PYTHON", sys.executable), str(Path(comfyui_path) / "main.py"), "--cpu",
               "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base_dir),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "DO_NOT_TRACK": "1"}, start_new_session=True)
    _wait_until_up(server, process)
    return server, process


def render_graph(checkpoint: str, prompts: int, dataset: str, batch_size: int, size: int, steps: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "SelmaSkillPrompts", "inputs": {
            "skill": "everyday_objects", "backend": "template", "base_url": "", "model": "", "api": "completions",
            "api_key_env": "OPENAI_API_KEY", "count": prompts, "threshold": 0.8, "seed": 0, "name": "benchmark"}},
        "3": {"class_type": "SelmaRenderDataset", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": ["2", 0], "negative_prompt": "",
            "width": size, "height": size, "steps": steps, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "seed": 0, "batch_size": batch_size, "dataset_name": dataset}},
    }


def node_seconds(entry: dict) -> float:
    """ComfyUI's execution time of the prompt, from its own start and success messages."""
    stamps = {name: data["timestamp"] for name, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def comfyui_rows(arguments: argparse.Namespace, scratch: Path) -> list[dict]:
    sys.path.insert(0, str(REPOSITORY_ROOT / "tests"))
    from full_size_models import build_sd15_random_checkpoint

    checkpoint = build_sd15_random_checkpoint()
    server, process = start_comfyui(os.environ["COMFYUI_PATH"], scratch / "comfyui")
    try:
        checkpoints = server.base_dir / "models" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "sd15-random.safetensors").symlink_to(checkpoint)

        def run(dataset: str, batch_size: int, prompts: int) -> float:
            entry = server.queue_prompt_and_wait(render_graph("sd15-random.safetensors", prompts, dataset, batch_size,
                                                              arguments.comfyui_size, arguments.comfyui_steps))
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"ComfyUI render failed: {entry['status']}\n{server.log_tail()}")
            return node_seconds(entry)

        print("ComfyUI: warm-up render (loads the checkpoint)", flush=True)
        run("warm-up", 4, arguments.comfyui_prompts)  # loads the checkpoint; cached for the timed runs
        best = {batch_size: 0.0 for batch_size in BATCH_SIZES}
        for repeat in range(arguments.repeats):
            for batch_size in BATCH_SIZES:
                seconds = run(f"batch{batch_size}-pass{repeat}", batch_size, arguments.comfyui_prompts)
                print(f"ComfyUI: batch {batch_size}, pass {repeat}: {seconds:.1f} s", flush=True)
                best[batch_size] = max(best[batch_size], arguments.comfyui_prompts / seconds)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    return [{"engine": "ComfyUI", "model": "SD 1.5 full size (random)", "device": "cpu",
             "size": arguments.comfyui_size, "steps": arguments.comfyui_steps, "prompts": arguments.comfyui_prompts,
             "batch_size": batch_size, "images_per_s": best[batch_size]} for batch_size in BATCH_SIZES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="diffusers folder or .safetensors checkpoint; default: the tiny SD 1.x")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="passes per batch size; the best is kept")
    parser.add_argument("--comfyui-size", type=int, default=64)
    parser.add_argument("--comfyui-steps", type=int, default=2)
    parser.add_argument("--comfyui-prompts", type=int, default=8)
    parser.add_argument("--no-comfyui", action="store_true", help="skip ComfyUI even when COMFYUI_PATH is set")
    parser.add_argument("--results", default=str(RESULTS), help="where the results file goes")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        rows = diffusers_rows(arguments, Path(scratch))
        comfyui_note = None
        if os.environ.get("COMFYUI_PATH") and not arguments.no_comfyui:
            rows += comfyui_rows(arguments, Path(scratch))
        else:
            comfyui_note = "not measured: COMFYUI_PATH is not set"
    for row in rows:
        baseline = next(other for other in rows if other["engine"] == row["engine"] and other["batch_size"] == 1)
        row["speedup_vs_one_call_per_prompt"] = row["images_per_s"] / baseline["images_per_s"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    header = f"{'engine':<9} | {'model':<26} | {'device':<6} | {'px':>4} | {'steps':>5} | {'prompts':>7} | " \
             f"{'per call':>8} | {'images/s':>8} | {'vs 1 per call':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['engine']:<9} | {row['model']:<26} | {row['device']:<6} | {row['size']:>4} | {row['steps']:>5} | "
              f"{row['prompts']:>7} | {row['batch_size']:>8} | {row['images_per_s']:>8.3f} | "
              f"{row['speedup_vs_one_call_per_prompt']:>12.2f}x")
    if comfyui_note:
        print(f"ComfyUI: {comfyui_note}")
    results = Path(arguments.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"settings": vars(arguments), "torch": torch.__version__,
                                   "threads": torch.get_num_threads(), "comfyui": comfyui_note or "measured",
                                   "rows": rows}, indent=2) + "\n")
    print(f"written {results}")


if __name__ == "__main__":
    main()
