"""The trainer's side of the dataset contract: reading and checking a folder, the on-disk caches,
and the data order as a function of the step.

**Reading.** A dataset folder holds images with a caption file of the same name (the kohya
convention; SELMA Render writes ``NNNNNN.png`` + ``NNNNNN.txt`` + ``dataset.json``). Everything a
run can know about its data is checked before any model loads: an empty folder, an image without a
caption, a caption without an image, an image that does not decode.

**Caches.** VAE latents (both flips when flipping is on) and text-encoder outputs are computed once
and stored under ``<cache>/<model hash>/``, one file per image or caption, named by the SHA-256 of
what went in (file bytes or caption text, resolution, crop, caption mode, cache version). A second
run on the same data and model, or a resumed one, reads them back and the training loop touches only
the UNet. Latents are stored as the VAE's distribution (mean and standard deviation), and each step
draws a sample from it, as diffusers' training scripts do with a fresh encode.

**Order.** Which images a step sees, their flips, timesteps and noise are all drawn from generators
seeded by ``(seed, step, micro-batch, process)``, never from a stream that runs through the whole
training. A run resumed at any step therefore computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..text.encoding import cache_name
from ..render.dataset import DATASET_FILE, DatasetError, read_settings
from ..storage.files import atomic_open

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = "selma-train-cache-2"  # 2: the flipped latents carry their own (mirrored) crop
_LISTED = 5


@dataclass(frozen=True)
class TrainingItem:
    image: Path
    caption: str


@dataclass(frozen=True)
class TrainingSet:
    """A checked dataset folder: its image–caption pairs in name order and its ``dataset.json``."""

    folder: Path
    items: tuple[TrainingItem, ...]
    description: dict[str, Any] | None

    @property
    def skill(self) -> str:
        return str((self.description or {}).get("skill") or "")

    def __len__(self) -> int:
        return len(self.items)


def _listing(paths: Sequence[Path]) -> str:
    names = ", ".join(path.name for path in paths[:_LISTED])
    return names + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def read_training_set(folder: str | os.PathLike[str], caption_extension: str = ".txt",
                      verify_images: bool = True) -> TrainingSet:
    """Read and check a dataset folder; raise :class:`DatasetError` naming every problem of a kind."""
    source = Path(folder)
    if not source.is_dir():
        raise DatasetError(f"train_data_dir {source}: no such folder; expected a dataset folder of images with "
                           f"{caption_extension} captions (the output of SELMA Render)")
    files = [path for path in source.iterdir() if path.is_file() and not path.name.startswith(".")]
    images = sorted(path for path in files if path.suffix.lower() in IMAGE_SUFFIXES)
    captions = {path.stem: path for path in files if path.suffix == caption_extension}
    image_stems = {path.stem for path in images}
    if not images and not captions:
        raise DatasetError(f"train_data_dir {source}: the dataset is empty (no images, no {caption_extension} "
                           "captions); render it first with SELMA Render / `selma render`")
    without_caption = [path for path in images if path.stem not in captions]
    if without_caption:
        raise DatasetError(f"train_data_dir {source}: {len(without_caption)} image(s) without a caption file: "
                           f"{_listing(without_caption)}; expected <name>{caption_extension} beside each image")
    without_image = sorted(path for stem, path in captions.items() if stem not in image_stems)
    if without_image:
        raise DatasetError(f"train_data_dir {source}: {len(without_image)} caption file(s) without an image: "
                           f"{_listing(without_image)}; expected an image ({', '.join(IMAGE_SUFFIXES)}) of the same "
                           "name beside each caption")
    duplicates = sorted({path.stem for path in images if sum(other.stem == path.stem for other in images) > 1})
    if duplicates:
        raise DatasetError(f"train_data_dir {source}: several images share the caption of {', '.join(duplicates[:5])}; "
                           "expected one image per caption file")
    if verify_images:
        corrupt = []
        for path in images:
            reason = image_problem(path)
            if reason:
                corrupt.append(f"{path.name} ({reason})")
        if corrupt:
            more = f"; and {len(corrupt) - _LISTED} more" if len(corrupt) > _LISTED else ""
            shown = "; ".join(corrupt[:_LISTED]) + more
            raise DatasetError(f"train_data_dir {source}: {len(corrupt)} image(s) cannot be decoded: {shown}; "
                               "re-render or remove them (with their captions)")
    items = []
    for path in images:
        try:
            caption = captions[path.stem].read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DatasetError(f"{captions[path.stem]}: not UTF-8 text; expected the caption as UTF-8") from None
        items.append(TrainingItem(path, caption))
    description = read_settings(source) if (source / DATASET_FILE).is_file() else None
    return TrainingSet(source, tuple(items), description)


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable image, or None: the file is fully decoded (truncation shows)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 8 or image.height < 8:
                return f"{image.width}x{image.height} pixels is too small"
    except Exception as error:  # PIL raises many kinds for broken files
        return f"{type(error).__name__}: {error}"
    return None


# ----------------------------------------------------------------------------------------- pixels

@dataclass(frozen=True)
class PreparedImage:
    """An image resized and cropped for training, with SDXL's size/crop conditioning."""

    pixels: torch.Tensor  # [3, resolution, resolution] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image, flipped with it


def prepare_image(path: Path, resolution: int, flip: bool = False,
                  crop_offset: Callable[[int, int], tuple[int, int]] | None = None) -> PreparedImage:
    """Resize so the short side is ``resolution`` (bicubic, antialiased), crop a square, maybe flip.

    ``crop_offset(free_height, free_width)`` picks the crop's (top, left); default: the centre. The
    crop's top-left (SDXL's crop conditioning) is where the pixels lie in the image as trained: for a
    flipped image, in the flipped image, so its left is mirrored (as sd-scripts and diffusers' SDXL
    script give it).
    """
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    free_height, free_width = image.height - resolution, image.width - resolution
    top, left = crop_offset(free_height, free_width) if crop_offset else (free_height // 2, free_width // 2)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = free_width - left  # = resized width - left - resolution
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return PreparedImage(torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left))


# ----------------------------------------------------------------------------------------- caches

def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    payload = save({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}, metadata)
    with atomic_open(path, "wb") as stream:
        stream.write(payload)


class LatentCache:
    """VAE latents of each image at one resolution and crop, both flips, under ``folder``."""

    def __init__(self, folder: Path, model_key: str, resolution: int, flips: bool) -> None:
        self.folder = folder / "latents"
        self.model_key = model_key
        self.resolution = resolution
        self.flips = flips
        self._paths: dict[Path, Path] = {}

    def path(self, item: TrainingItem) -> Path:
        if item.image not in self._paths:
            key = _digest(CACHE_VERSION, self.model_key, "latents", self.resolution, "centre-crop", self.flips,
                          _file_digest(item.image))
            self._paths[item.image] = self.folder / f"{key}.safetensors"
        return self._paths[item.image]

    def missing(self, items: Sequence[TrainingItem]) -> list[int]:
        return [index for index, item in enumerate(items) if not self.path(item).is_file()]

    def build(self, items: Sequence[TrainingItem], vae, batch_size: int,
              report: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Encode the images not cached yet; return ``(encoded, reused)``."""
        import torch

        missing = self.missing(items)
        flips = (False, True) if self.flips else (False,)
        for start in range(0, len(missing), batch_size):
            batch = [items[index] for index in missing[start:start + batch_size]]
            tensors: list[dict[str, torch.Tensor]] = [{} for _ in batch]
            metadata: list[dict[str, str]] = [{"source": item.image.name} for item in batch]
            for flip in flips:
                prepared = [prepare_image(item.image, self.resolution, flip=flip) for item in batch]
                pixels = torch.stack([image.pixels for image in prepared]).to(vae.device, vae.dtype)
                with torch.no_grad():
                    distribution = vae.encode(pixels).latent_dist
                suffix = "_flipped" if flip else ""
                for index, image in enumerate(prepared):
                    tensors[index]["mean" + suffix] = distribution.mean[index].float()
                    tensors[index]["std" + suffix] = distribution.std[index].float()
                    metadata[index]["original_size"] = "{},{}".format(*image.original_size)
                    metadata[index]["crop_top_left" + suffix] = "{},{}".format(*image.crop_top_left)
            for item, item_tensors, item_metadata in zip(batch, tensors, metadata):
                _save_tensors(self.path(item), item_tensors, item_metadata)
            if report:
                report(min(start + batch_size, len(missing)), len(missing))
        return len(missing), len(items) - len(missing)

    def load(self, item: TrainingItem,
             flip: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
        """``(mean, std, original_size, crop_top_left)`` of one image, flipped or not."""
        from safetensors import safe_open

        suffix = "_flipped" if flip else ""
        with safe_open(str(self.path(item)), framework="pt") as stored:
            metadata = stored.metadata() or {}
            mean, std = stored.get_tensor("mean" + suffix), stored.get_tensor("std" + suffix)
        original_size = tuple(int(value) for value in metadata["original_size"].split(","))
        crop = tuple(int(value) for value in metadata["crop_top_left" + suffix].split(","))
        return mean, std, original_size, crop  # type: ignore[return-value]


class TextCache:
    """Text-encoder outputs of each caption in one caption mode, under ``folder``."""

    def __init__(self, folder: Path, model_key: str, mode: str) -> None:
        self.folder = folder / "text"
        self.model_key = model_key
        self.mode = mode

    def path(self, caption: str) -> Path:
        key = _digest(CACHE_VERSION, self.model_key, "text", cache_name(self.mode), caption)
        return self.folder / f"{key}.safetensors"

    def missing(self, captions: Sequence[str]) -> list[str]:
        return sorted({caption for caption in captions if not self.path(caption).is_file()})

    def build(self, captions: Sequence[str], encoder, batch_size: int,
              report: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Encode the captions not cached yet (``encoder``: a :class:`CaptionEncoder`); ``(encoded, reused)``."""
        import torch

        missing = self.missing(captions)
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            with torch.no_grad():
                encoded = encoder.encode(batch)
            for caption, output in zip(batch, encoded):
                tensors = {"hidden": output.hidden.float()}
                if output.pooled is not None:
                    tensors["pooled"] = output.pooled.float()
                _save_tensors(self.path(caption), tensors)
            if report:
                report(min(start + batch_size, len(missing)), len(missing))
        return len(missing), len(set(captions)) - len(missing)

    def load(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        from safetensors import safe_open

        with safe_open(str(self.path(caption)), framework="pt") as stored:
            pooled = stored.get_tensor("pooled") if "pooled" in stored.keys() else None
            return stored.get_tensor("hidden"), pooled


# ------------------------------------------------------------------------------------------ order

def derived_seed(seed: int, purpose: str, *numbers: int) -> int:
    """A 63-bit seed for one purpose at one place in the run, independent of every other."""
    digest = hashlib.blake2b(f"{seed}|{purpose}|{'|'.join(map(str, numbers))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class StepPlan:
    """Which dataset items each micro-batch of each step trains on.

    The run walks through epochs: epoch ``e`` is a permutation of the dataset drawn from
    ``(seed, e)``. Optimizer step ``s`` takes the next ``global_batch`` positions; the micro-batch
    ``a`` of process ``r`` takes its own slice of them.
    """

    seed: int
    dataset_size: int
    micro_batch: int
    accumulation: int
    processes: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.processes

    def micro_batch_index(self, accumulation_index: int, process_index: int = 0) -> int:
        """The micro-batch's place in its step's global batch: P processes with accumulation A share out
        the micro-batches one process with accumulation P·A would train, in that order."""
        return accumulation_index * self.processes + process_index

    def indices(self, step: int, accumulation_index: int, process_index: int = 0) -> list[int]:
        first = step * self.global_batch + self.micro_batch_index(accumulation_index, process_index) * self.micro_batch
        return [self._item_at(position) for position in range(first, first + self.micro_batch)]

    def generator(self, step: int, accumulation_index: int, process_index: int = 0) -> torch.Generator:
        """The generator of a micro-batch's flips, timesteps and noise (on the CPU), keyed like :meth:`indices`
        by the micro-batch's place in the global batch, so the process count does not change the draws.

        The trailing 0 stands where the process index stood before: one process draws what it always drew,
        and a run started before resumes identically.
        """
        import torch

        return torch.Generator().manual_seed(derived_seed(self.seed, "micro-batch", step,
                                                          self.micro_batch_index(accumulation_index, process_index),
                                                          0))

    def _item_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        return self._permutation(epoch)[offset]

    def _permutation(self, epoch: int) -> list[int]:
        cached = _PERMUTATIONS.get((self.seed, self.dataset_size, epoch))
        if cached is None:
            import torch

            generator = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            cached = torch.randperm(self.dataset_size, generator=generator).tolist()
            _PERMUTATIONS[(self.seed, self.dataset_size, epoch)] = cached
            while len(_PERMUTATIONS) > 4:
                _PERMUTATIONS.popitem(last=False)
        return cached


_PERMUTATIONS: OrderedDict[tuple[int, int, int], list[int]] = OrderedDict()
