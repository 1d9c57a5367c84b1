"""Shared pieces of the trainer's tests: a tiny dataset on disk, a tiny run's settings, one CPU thread.

Tests of the trainer run torch on one thread, in the test process and in every trainer process
they start (``OMP_NUM_THREADS=1``): on a CPU shared with other work, two spinning threads per
process are many times slower than one, and the same thread count in parent and child keeps float
sums in the same order, so an in-process run and a child's run compute identical numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_selma.trainer.render.dataset import RenderRequest
from comfyui_selma.trainer.train.config import TrainConfig

CAPTIONS = (
    "a red cube on a wooden table",
    "two green apples in a white bowl",
    # Over 75 tokens: two pieces, so a micro-batch mixes caption lengths.
    "A long paragraph caption. " + " ".join(f"then a small toy number {index} stands beside the red box"
                                            for index in range(8)),
    "three birds on a wire at dawn",
)
SKILL = "counting"


def write_dataset(folder: Path, captions=CAPTIONS, size: int = 64, skill: str = SKILL) -> Path:
    """Images with structure (stripes and a gradient per index), their captions and a SELMA dataset.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, columns = np.indices((size, size))
    for index, caption in enumerate(captions):
        pixels = np.stack([(rows * (index + 1) * 4) % 256, (columns * 3 + index * 40) % 256,
                           ((rows + columns) * (index + 2)) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png")
        (folder / f"{index:06d}.txt").write_text(caption, encoding="utf-8")
    request = RenderRequest(prompts=tuple(captions), skill=skill, generator={"engine": "test", "model": "tiny"},
                            sampler="euler", scheduler="normal", steps=2, cfg=7.5, width=size, height=size)
    (folder / "dataset.json").write_text(json.dumps(request.settings()), encoding="utf-8")
    return folder


def tiny_config(model: Path, dataset: Path, cache: Path, **changes) -> TrainConfig:
    """A few cheap steps at 64 px on a tiny model: rank 4 with alpha 2 (so a wrong alpha shows)."""
    values = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(dataset), resolution=64,
                  network_dim=4, network_alpha=2.0, train_batch_size=2, gradient_accumulation_steps=1,
                  max_train_steps=2, save_every_n_steps=0, cache_dir=str(cache), save_precision="fp32")
    values.update(changes)
    return TrainConfig(**values)


def events_of(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    patch = pytest.MonkeyPatch()
    patch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()
