"""The dataset folder: one rendered image per prompt, its caption beside it, and how it was made.

Layout (the kohya convention every LoRA trainer reads)::

    <dataset>/000000.png   image of prompt 0
    <dataset>/000000.txt   its caption: prompt 0, exactly
    ...
    <dataset>/dataset.json skill, generator model, sampler, steps, CFG, size, negative prompt, seeds

Rules both renderers (the ComfyUI node and ``selma render``) follow, so a dataset can be started by
one run and finished by another:

- **Seeding.** Image ``i`` is rendered from seed ``(seed + i) mod 2**64`` (:func:`image_seed`), with
  its own noise, so it is the same image alone or in a batch, and a resumed run matches an
  uninterrupted one. In ComfyUI, a KSampler with that seed and batch size 1 gives the same image.
- **Done means both files.** An image is written to a temporary name and renamed, then its caption
  the same way; it counts as done only when ``NNNNNN.png`` and ``NNNNNN.txt`` both exist. A killed
  run leaves whole files or hidden ``.*.tmp`` leftovers (removed by the next run), never half an image.
- **Resume.** Rendering skips done images. It continues a folder only when its ``dataset.json``
  records the same settings and every caption on disk is the prompt of its index; anything else is
  refused before rendering, with the difference named.
- **One writer.** A render holds the folder's lock (``<dataset>.lock`` beside it,
  :func:`.locks.exclusive_lock`) from its checks to its last image, so a second render into the
  same folder — node or CLI, this process or another — is refused with "in use by process N".

This module is pure (PIL and numpy only): the engines plug in as a :data:`BatchRenderer`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..storage.files import atomic_open, atomic_write_json, check_name

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

DATASET_FILE = "dataset.json"
FORMAT = "selma-dataset"
FORMAT_VERSION = 1
SEED_MODULUS = 2**64
SEED_RULE = "image i is rendered from seed (seed + i) mod 2**64"
STEM_DIGITS = 6
IMAGE_SUFFIX = ".png"
CAPTION_SUFFIX = ".txt"
# The settings that decide what an image looks like: a folder is continued only when these match.
MATCHED_SETTINGS = ("skill", "generator", "sampler", "scheduler", "steps", "cfg", "width", "height",
                    "negative_prompt", "seed")



class BatchRenderer(Protocol):
    """An engine: renders a batch of prompts in one sampler call.

    Prompts of different conditioning lengths (77 tokens per CLIP chunk) could only share a call by
    padding each to the least common multiple of their lengths — for 29, 31 and 33 chunks that is
    29,667 chunks per prompt — so :func:`render_pending` batches only prompts of one length, told by
    :meth:`conditioning_length`; a renderer may refuse a mixed batch.
    """

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per prompt, in order, each width x height, image i from ``seeds[i]`` alone."""

    def conditioning_length(self, prompt: str) -> int:
        """The length of the prompt's text conditioning in tokens (77 per CLIP chunk); no encoding needed."""


class DatasetError(ValueError):
    """A render request or dataset folder that cannot be used; the message names what and why."""


class NonFiniteImages(DatasetError):
    """A renderer decoded NaN or infinite pixels; ``positions`` are the images' places in their batch."""

    def __init__(self, positions: tuple[int, ...]) -> None:
        super().__init__(f"NaN or infinite pixels in the images at batch positions {list(positions)}")
        self.positions = positions


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` in a dataset rendered with base ``seed``."""
    return (seed + index) % SEED_MODULUS


def image_stem(index: int) -> str:
    """``000042`` for image 42: the file name of its image and caption, without suffix."""
    return f"{index:0{STEM_DIGITS}d}"


def image_path(folder: Path, index: int) -> Path:
    return folder / (image_stem(index) + IMAGE_SUFFIX)


def caption_path(folder: Path, index: int) -> Path:
    return folder / (image_stem(index) + CAPTION_SUFFIX)


def resolve_dataset_folder(name_or_path: str, root: str | os.PathLike[str], field: str = "dataset name") -> Path:
    """An absolute path as given, or a plain name under ``root`` (ComfyUI: ``output/selma/datasets``).

    A name with ``..`` or a path separator is refused, naming ``field``: names come from widgets and must not
    escape ``root``. (The nodes also keep absolute paths inside ComfyUI's folders: ``nodes/folders.py``.)
    """
    text = name_or_path.strip()
    if os.path.isabs(text):
        return Path(text)
    return Path(root) / check_name(text, field)


@dataclass(frozen=True)
class RenderRequest:
    """Everything a render needs besides the engine: the prompts, the settings and the batch size.

    ``generator`` describes the model (engine, file name, architecture, …); ``sampler`` and
    ``scheduler`` use the engine's own names (ComfyUI's ``euler``/``normal``, a diffusers scheduler
    class). All of these are stored in ``dataset.json`` and must match to continue a folder.
    """

    prompts: tuple[str, ...]
    skill: str
    generator: dict[str, Any]
    sampler: str
    scheduler: str | None
    steps: int
    cfg: float
    width: int
    height: int
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 1
    prompts_file: str | None = None

    def validate(self) -> None:
        """Raise :class:`DatasetError` naming the first bad field; nothing is written."""
        if not self.prompts:
            raise DatasetError(f"prompts: the prompt list{self._from_file()} is empty; expected at least one prompt "
                               "(run stage 1, SELMA Skill Prompts / `selma prompts generate`, first)")
        for index, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise DatasetError(f"prompts: prompt {index}{self._from_file()} is {prompt!r}; expected non-empty text")
        if not isinstance(self.skill, str) or not self.skill.strip():
            raise DatasetError(f"skill: {self.skill!r}; expected the skill name of the prompt set")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
                raise DatasetError(f"{name}: {value!r} pixels; expected a positive multiple of 8 "
                                   "(the VAE works on 8x8 pixel blocks), e.g. 512")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise DatasetError(f"steps: {self.steps!r}; expected a whole number of sampling steps, at least 1 "
                               "(the paper uses 50)")
        if not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg) or self.cfg < 0:
            raise DatasetError(f"cfg: {self.cfg!r}; expected a guidance scale of 0 or more (the paper uses 7.5)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DatasetError(f"batch_size: {self.batch_size!r}; expected at least 1 image per sampler call")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_MODULUS:
            raise DatasetError(f"seed: {self.seed!r}; expected a whole number from 0 to 2**64 - 1")

    def _from_file(self) -> str:
        return f" from {self.prompts_file}" if self.prompts_file else ""

    @property
    def seeds(self) -> list[int]:
        return [image_seed(self.seed, index) for index in range(len(self.prompts))]

    def settings(self) -> dict[str, Any]:
        """The ``dataset.json`` content for this request."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "skill": self.skill,
            "generator": self.generator,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "cfg": float(self.cfg),
            "width": self.width,
            "height": self.height,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "seed_rule": SEED_RULE,
            "seeds": self.seeds,
            "images": len(self.prompts),
            "prompts_file": self.prompts_file,
            "files": "NNNNNN.png is the image of prompt NNNNNN of the prompt set; NNNNNN.txt its caption",
        }


@dataclass(frozen=True)
class DatasetPlan:
    """A checked dataset folder, what is left to render in it, and what the user should be told first."""

    folder: Path
    request: RenderRequest
    pending: tuple[int, ...]
    done: int = field(default=0)
    notices: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.request.prompts)


def _same_value(key: str, old: Any, new: Any) -> bool:
    if key == "cfg" and isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return math.isclose(old, new, rel_tol=0, abs_tol=1e-6)
    return old == new


def _settings_mismatch(recorded: dict[str, Any], wanted: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The differences that refuse a folder, and the generator fields the folder does not record.

    The generator is compared field by field, so a message says ``generator.sha256`` rather than
    quoting two whole records. A field this run has and the folder lacks was added by a later
    version of the pack (the model's SHA-256): it cannot be checked, so it is returned apart.
    """
    differences, unrecorded = [], []
    for key in MATCHED_SETTINGS:
        old, new = recorded.get(key), wanted.get(key)
        if key == "generator" and isinstance(old, dict) and isinstance(new, dict):
            pairs = [(f"generator.{field_name}", old.get(field_name), new.get(field_name))
                     for field_name in sorted(old.keys() | new.keys())]
            unrecorded += [label for label, _, _ in pairs if label.split(".", 1)[1] not in old]
            pairs = [pair for pair in pairs if pair[0] not in unrecorded]
        else:
            pairs = [(key, old, new)]
        differences += [f"{label}: the folder has {json.dumps(old_value)}, this run asks {json.dumps(new_value)}"
                        for label, old_value, new_value in pairs if not _same_value(key, old_value, new_value)]
    return differences, unrecorded


def _is_leftover(path: Path) -> bool:
    """A hidden temporary file left by a killed write (``atomic_open`` names them ``.<name>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _dataset_index(path: Path) -> int | None:
    if path.suffix not in (IMAGE_SUFFIX, CAPTION_SUFFIX) or len(path.stem) != STEM_DIGITS or not path.stem.isdigit():
        return None
    return int(path.stem)


def read_settings(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``dataset.json`` of ``folder``, or None when there is none."""
    settings_path = Path(folder) / DATASET_FILE
    if not settings_path.is_file():
        return None
    try:
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DatasetError(f"{settings_path}: not valid JSON ({error}); expected a SELMA dataset.json") from None
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
        raise DatasetError(f"{settings_path}: not a SELMA dataset description (no \"format\": \"{FORMAT}\"); "
                           "choose another folder")
    if recorded.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{settings_path}: dataset format version {recorded.get('version')!r}; this version of "
                           f"comfyui-selma reads version {FORMAT_VERSION}")
    return recorded


def check_folder(folder: Path, request: RenderRequest) -> list[str]:
    """Refuse a folder this request must not write into; read-only (safe to call from every process).

    Accepted: a missing or empty folder, or one whose ``dataset.json`` records the same settings and
    whose captions are the request's prompts at the same indices. A folder from an older version that
    does not record a generator field (the model's SHA-256) is continued; the returned notices say so.
    """
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"dataset folder {folder}: exists and is not a folder; expected a folder or a new path")
    if not folder.is_dir():
        return []
    recorded = read_settings(folder)
    entries = [path for path in folder.iterdir() if not _is_leftover(path)]
    if recorded is None:
        if entries:
            raise DatasetError(f"dataset folder {folder}: not empty and holds no {DATASET_FILE}, so it is not a "
                               f"SELMA dataset (found {entries[0].name!r}); choose a new name or an empty folder")
        return []
    differences, unrecorded = _settings_mismatch(recorded, request.settings())
    if differences:
        raise DatasetError(f"dataset folder {folder}: {DATASET_FILE} was rendered with different settings, so "
                           "new images would not match the ones there — " + "; ".join(differences)
                           + ". Use the same settings to continue it, or a new dataset name to start another.")
    notices = []
    if unrecorded:
        done = sum(is_done(folder, index) for index in range(len(request.prompts)))
        fields = " and ".join(unrecorded)
        notices.append(f"dataset folder {folder}: {DATASET_FILE} records no {fields} (it was written by an older "
                       f"version), so the {done} images there were not checked against this run's model; continuing, "
                       f"and recording this run's {fields} from now on")
    for path in sorted(entries):
        index = _dataset_index(path)
        if index is None:
            continue
        if index >= len(request.prompts):
            raise DatasetError(f"dataset folder {folder}: holds {path.name} but the prompt list has only "
                               f"{len(request.prompts)} prompts; the prompt set changed since this dataset was "
                               "rendered. Use a new dataset name.")
        if path.suffix == CAPTION_SUFFIX:
            caption = path.read_text(encoding="utf-8")
            if caption != request.prompts[index]:
                raise DatasetError(f"dataset folder {folder}: {path.name} holds the caption {caption[:80]!r} but "
                                   f"prompt {index} is {request.prompts[index][:80]!r}; the prompt set changed since "
                                   "this dataset was rendered. Use a new dataset name.")
    return notices


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, or raise naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise DatasetError(f"dataset folder {folder}: cannot write there ({error.strerror or error}); "
                           "choose a folder you can write to") from None


def remove_leftovers(folder: Path) -> int:
    """Delete the hidden temporary files of killed writes; return how many."""
    removed = 0
    for path in folder.iterdir():
        if _is_leftover(path) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def is_done(folder: Path, index: int) -> bool:
    return image_path(folder, index).is_file() and caption_path(folder, index).is_file()


def pending_indices(folder: Path, count: int) -> tuple[int, ...]:
    """Indices below ``count`` whose image or caption is missing, in order."""
    return tuple(index for index in range(count) if not is_done(folder, index))


def plan_dataset(folder: str | os.PathLike[str], request: RenderRequest) -> DatasetPlan:
    """Validate the request and check the folder; touch nothing (every process of a launch may call it)."""
    folder = Path(folder)
    request.validate()
    notices = check_folder(folder, request)
    pending = pending_indices(folder, len(request.prompts)) if folder.is_dir() else tuple(range(len(request.prompts)))
    return DatasetPlan(folder=folder, request=request, pending=pending, done=len(request.prompts) - len(pending),
                       notices=tuple(notices))


def start_dataset(plan: DatasetPlan) -> None:
    """Create the checked folder, clear what killed writes left, and write its ``dataset.json``."""
    check_writable(plan.folder)
    remove_leftovers(plan.folder)
    atomic_write_json(plan.folder / DATASET_FILE, plan.request.settings())


def prepare_dataset(folder: str | os.PathLike[str], request: RenderRequest) -> DatasetPlan:
    """Validate everything before rendering (:func:`plan_dataset`), then :func:`start_dataset`."""
    plan = plan_dataset(folder, request)
    start_dataset(plan)
    return plan


def write_image(folder: Path, index: int, image: Image.Image, caption: str) -> None:
    """Write image ``index`` then its caption, each atomically: the pair exists only when both are whole."""
    with atomic_open(image_path(folder, index), "wb") as stream:
        image.save(stream, format="PNG")
    with atomic_open(caption_path(folder, index), "w") as stream:
        stream.write(caption)


def batches(indices: Sequence[int], batch_size: int, lengths: Mapping[int, int]) -> Iterator[list[int]]:
    """Split ``indices`` into batches of at most ``batch_size`` whose prompts share a conditioning length.

    Batches fill in index order, one open batch per length; a full batch is yielded at once, the
    partial ones at the end, in the order of their first index. Every batch then costs what its
    images cost one by one: no prompt is padded for another's sake.
    """
    open_batches: dict[int, list[int]] = {}
    for index in indices:
        batch = open_batches.setdefault(lengths[index], [])
        batch.append(index)
        if len(batch) == batch_size:
            yield open_batches.pop(lengths[index])
    yield from open_batches.values()  # a length's batch re-enters the dict when it restarts: first-index order


def render_pending(plan: DatasetPlan, render_batch: BatchRenderer, indices: Sequence[int] | None = None,
                   on_batch: Callable[[list[int]], None] | None = None) -> list[int]:
    """Render ``indices`` (default: all pending) in batches of at most the request's size, each of
    prompts that share a conditioning length (:func:`batches`); return the indices written.

    Each batch is written before ``on_batch`` is called with its indices, so a progress callback that
    raises (ComfyUI's cancel, Ctrl-C) loses nothing finished.
    """
    request = plan.request
    seeds = request.seeds
    indices = plan.pending if indices is None else indices
    lengths = {index: render_batch.conditioning_length(request.prompts[index]) for index in indices}
    written: list[int] = []
    for batch in batches(indices, request.batch_size, lengths):
        try:
            images = render_batch([request.prompts[index] for index in batch], [seeds[index] for index in batch])
        except NonFiniteImages as error:
            bad = [batch[position] for position in error.positions]
            raise DatasetError(
                f"model {request.generator.get('model')!r}: rendered NaN or infinite pixels for prompts "
                f"{', '.join(map(str, bad))} ({', '.join(image_path(plan.folder, index).name for index in bad)}), "
                "which would be black images; its weights hold NaN or infinite values, or it overflows at this "
                "precision (try float32). That batch was not written; images finished before it are kept."
            ) from None
        if len(images) != len(batch):
            raise RuntimeError(f"the renderer returned {len(images)} images for a batch of {len(batch)} prompts")
        for index, image in zip(batch, images):
            if image.size != (request.width, request.height):
                raise RuntimeError(f"the renderer returned a {image.size[0]}x{image.size[1]} image for prompt {index}; "
                                   f"expected {request.width}x{request.height}")
            write_image(plan.folder, index, image, request.prompts[index])
            written.append(index)
        if on_batch is not None:
            on_batch(batch)
    return written


def float_images_to_pil(images: np.ndarray) -> list[Image.Image]:
    """``[batch, height, width, 3]`` floats in [0, 1] → 8-bit RGB images (rounded, as diffusers does).

    Raises :class:`NonFiniteImages` when a pixel is NaN or infinite: clipped, it would be a black
    image written as done (a model with NaN weights, or one that overflows at half precision).
    """
    import numpy as np
    from PIL import Image

    pixels = np.asarray(images, dtype=np.float32)
    finite = np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
    if not finite.all():
        raise NonFiniteImages(tuple(int(position) for position in np.flatnonzero(~finite)))
    pixels = (np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return [Image.fromarray(pixel_rows) for pixel_rows in pixels]


def done_image_paths(folder: str | os.PathLike[str], limit: int | None = None) -> list[Path]:
    """Paths of finished images in index order (at most ``limit``): what a preview shows."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.glob("[0-9]" * STEM_DIGITS + IMAGE_SUFFIX)):
        index = _dataset_index(path)
        if index is not None and caption_path(folder, index).is_file():
            found.append(path)
            if limit is not None and len(found) >= limit:
                break
    return found
