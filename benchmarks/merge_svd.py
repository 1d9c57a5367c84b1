"""Benchmark: the ``svd`` merge (stacked factors) against a full SVD of each summed ΔW, on SDXL's shapes.

Five rank-128 experts over every attention projection of the SDXL base UNet (to_q/to_k/to_v/to_out.0
of attn1 and attn2: 560 layers; shapes from diffusers' UNet2DConditionModel built on the meta device
from the shipped SDXL config), merged with weights 1/5 and re-factored to rank 128 two ways, in the
same run, layer by layer, alternating which goes first:

- ours: ``trainer.merge.methods.svd`` (``trainer.merge.low_rank.truncate_product``) — where the total rank
  R = 640 is below the longer side (1280 x 1280, 1280 x 2048, 640 x 2048): T from the Cholesky factor of
  the 640 x 640 Gram of the longer factor, S = T·(the other), and only the 128 leading eigenvectors of
  S·Sᵀ (tridiagonal reduction, inverse iteration for the wanted 128, reflectors applied to those alone);
  where R reaches it (640 x 640): ΔW formed, its Gram, the same partial eigensolve. Never an SVD;
- full: form ΔW = Σ w_i·scale_i·up_i·down_i, ``torch.linalg.svd(ΔW, full_matrices=False)``, keep 128.

Reported per layer shape: time, relative reconstruction error ||ΔW − up·down||_F / ||ΔW||_F of each
(equal errors = both found the best rank-128 approximation), and the peak memory of each, measured in a
fresh child process per method and shape as the growth of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs) while the method runs on one layer, the experts already in memory —
RSS, because torch's CPU allocator keeps no statistics and tracemalloc does not see it.

``--threads T`` limits torch (MKL) and scipy's OpenBLAS alike (OPENBLAS_NUM_THREADS, set before scipy
loads and inherited by the memory children), so both methods run on the same number of cores.

    .venv/bin/python benchmarks/merge_svd.py [--per-shape N] [--threads T]

writes ``benchmarks/results/merge_svd.json`` (git-ignored) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS = REPOSITORY / "benchmarks" / "results" / "merge_svd.json"
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def sdxl_attention_shapes() -> list[tuple[str, int, int]]:
    """(diffusers path, out, in) of every attention projection of the real SDXL base UNet."""
    from diffusers import UNet2DConditionModel

    from comfyui_selma.trainer.families.configs import CONFIGS_PATH

    config = json.loads((CONFIGS_PATH / "sdxl" / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [(path, layer.out_features, layer.in_features) for path, layer in unet.named_modules()
            if path.endswith(PROJECTIONS)]


def experts_for(out_features: int, in_features: int, count: int, rank: int, seed: int):
    from comfyui_selma.trainer.lora.file import LoraModule

    generator = torch.Generator().manual_seed(seed)
    return [LoraModule(down=torch.randn(rank, in_features, generator=generator) / in_features**0.5,
                       up=torch.randn(out_features, rank, generator=generator) * 0.05, alpha=float(rank))
            for _ in range(count)]


def ours(experts, weights, rank):
    from comfyui_selma.trainer.merge.methods import MergeOptions, svd

    module = svd(experts, weights, MergeOptions(rank=rank))
    return module.up_matrix() * module.scale, module.down_matrix()


def full_svd(experts, weights, rank):
    delta = sum(weight * expert.scale * (expert.up_matrix() @ expert.down_matrix())
                for expert, weight in zip(experts, weights, strict=True))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


METHODS = {"ours": ours, "full": full_svd}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory_in_child(method: str, out_features: int, in_features: int, count: int, rank: int) -> float:
    """Peak RSS growth (MiB) of ``method`` on one layer, in a fresh process (so earlier work leaves no pool)."""
    command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--experts", str(count),
               "--rank", str(rank), "--memory-of", f"{method}:{out_features}x{in_features}"]
    # A fixed mmap threshold turns off glibc's adaptive one, so freed large blocks leave the RSS at once
    # and the peak we read is this method's, not a reused heap.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return float(result.stdout.strip().splitlines()[-1])


def _memory_of(spec: str, count: int, rank: int) -> float:
    """In the child: RSS growth while ``method`` merges one layer, after a warm-up that loads the libraries."""
    method, shape = spec.split(":")
    out_features, in_features = (int(size) for size in shape.split("x"))
    weights = [1 / count] * count
    METHODS[method](experts_for(64, 48, count, 4, seed=1), weights, 2)  # loads the libraries, holds no big buffer
    experts = experts_for(out_features, in_features, count, rank, seed=0)
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    METHODS[method](experts, weights, rank)
    return (_status_kib("VmHWM") - base) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--rank", type=int, default=128, help="rank of every expert and of the merge")
    parser.add_argument("--per-shape", type=int, default=0,
                        help="time at most this many layers of each shape (0: all 560 layers)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch and of scipy's OpenBLAS (0: the libraries' defaults)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # METHOD:OUTxIN, run in the child process
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
        os.environ["OPENBLAS_NUM_THREADS"] = str(arguments.threads)  # read when scipy first loads, below
    if arguments.memory_of:
        print(json.dumps(_memory_of(arguments.memory_of, arguments.experts, arguments.rank)))
        return 0

    layers = sdxl_attention_shapes()
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for path, out_features, in_features in layers:
        groups[(out_features, in_features)].append(path)
    weights = [1 / arguments.experts] * arguments.experts
    rows = []
    warm = experts_for(64, 64, arguments.experts, 8, 0)
    for method in METHODS.values():
        method(warm, weights, 8)  # first-call library setup is not what we time
    for (out_features, in_features), paths in sorted(groups.items()):
        timed = paths[: arguments.per_shape] if arguments.per_shape else paths
        seconds = {name: 0.0 for name in METHODS}
        squared_error = {name: 0.0 for name in METHODS}
        squared_norm = 0.0
        worst_gap = 0.0
        for index in range(len(timed)):
            experts = experts_for(out_features, in_features, arguments.experts, arguments.rank, seed=index)
            delta = sum(weight * expert.scale * (expert.up_matrix() @ expert.down_matrix())
                        for expert, weight in zip(experts, weights, strict=True))
            norm = float(delta.norm())
            order = list(METHODS) if index % 2 == 0 else list(reversed(METHODS))
            errors = {}
            for name in order:
                start = time.perf_counter()
                up, down = METHODS[name](experts, weights, arguments.rank)
                seconds[name] += time.perf_counter() - start
                errors[name] = float((delta - up @ down).norm())
                squared_error[name] += errors[name] ** 2
            squared_norm += norm**2
            worst_gap = max(worst_gap, abs(errors["ours"] - errors["full"]) / norm)
        memory = {name: measure_memory_in_child(name, out_features, in_features, arguments.experts, arguments.rank)
                  for name in METHODS}
        rows.append({
            "shape": f"{out_features}x{in_features}", "layers": len(paths), "timed_layers": len(timed),
            "seconds": seconds, "seconds_all_layers": {name: value * len(paths) / len(timed)
                                                       for name, value in seconds.items()},
            "relative_error": {name: (value / squared_norm) ** 0.5 for name, value in squared_error.items()},
            "largest_error_gap": worst_gap, "peak_rss_growth_mib": memory,
        })
        print(f"{out_features}x{in_features}: {len(timed)}/{len(paths)} layers, ours {seconds['ours']:.2f} s, "
              f"full {seconds['full']:.2f} s", flush=True)

    total = {name: sum(row["seconds_all_layers"][name] for row in rows) for name in METHODS}
    measured = {name: sum(row["seconds"][name] for row in rows) for name in METHODS}
    result = {
        "benchmark": "svd merge of 5 rank-128 experts over every SDXL attention projection",
        "experts": arguments.experts, "rank": arguments.rank, "layers": len(layers),
        "timed_layers": sum(row["timed_layers"] for row in rows), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "cpu": platform.processor() or platform.machine(),
        "rows": rows, "total_seconds_measured": measured, "total_seconds_all_layers": total,
        "speedup": total["full"] / total["ours"],
        "memory_measure": "peak RSS growth (VmHWM after /proc/self/clear_refs) in a fresh process per method and "
                          "shape, one layer",
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print("| layer shape (out x in) | layers | ours (s) | full SVD (s) | speedup | rel. error ours | rel. error full "
          "| peak RSS ours (MiB) | peak RSS full (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ours_s, full_s = row["seconds_all_layers"]["ours"], row["seconds_all_layers"]["full"]
        timed = "" if row["timed_layers"] == row["layers"] else f" ({row['timed_layers']} timed)"
        print(f"| {row['shape']} | {row['layers']}{timed} | {ours_s:.2f} | {full_s:.2f} | {full_s / ours_s:.1f}x | "
              f"{row['relative_error']['ours']:.6f} | {row['relative_error']['full']:.6f} | "
              f"{row['peak_rss_growth_mib']['ours']:.0f} | {row['peak_rss_growth_mib']['full']:.0f} |")
    print(f"| **all {len(layers)}** | {len(layers)} | {total['ours']:.2f} | {total['full']:.2f} | "
          f"**{result['speedup']:.1f}x** | | | | |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), OpenBLAS threads "
          f"{result['openblas_threads']}; results in {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
