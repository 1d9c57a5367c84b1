"""The dataset folder contract, engine-free: seeding, files, resume, refusals, atomic writes after a kill.

A fake renderer stands in for a model: each image's pixels come from its prompt and seed only, so
what these tests compare is exactly what the contract promises.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_selma.trainer.render.dataset import (
    DATASET_FILE,
    NonFiniteImages,
    batches,
    float_images_to_pil,
    DatasetError,
    RenderRequest,
    done_image_paths,
    image_seed,
    pending_indices,
    prepare_dataset,
    render_pending,
    resolve_dataset_folder,
)

PROMPTS = ("a red cube", "two green apples", "a cat on a sofa", "three birds on a wire", "a boat at dawn")


def fake_image(prompt: str, seed: int, size: tuple[int, int] = (16, 8)) -> Image.Image:
    colour = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()[:3]
    return Image.new("RGB", size, tuple(colour))


def fake_conditioning_length(prompt: str) -> int:
    """77 tokens per 40 characters begun: what a long prompt's CLIP chunks are to a real engine."""
    return 77 * (1 + len(prompt) // 40)


class FakeRenderer:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def conditioning_length(self, prompt: str) -> int:
        return fake_conditioning_length(prompt)

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        assert len({self.conditioning_length(prompt) for prompt in prompts}) == 1, "a batch of mixed lengths"
        self.calls.append((prompts, seeds))
        return [fake_image(prompt, seed) for prompt, seed in zip(prompts, seeds)]


def request(**changes) -> RenderRequest:
    values = dict(prompts=PROMPTS, skill="counting", generator={"engine": "fake", "model": "m"}, sampler="euler",
                  scheduler="normal", steps=2, cfg=7.5, width=16, height=8, negative_prompt="", seed=100,
                  batch_size=2, prompts_file="prompts.jsonl")
    values.update(changes)
    return RenderRequest(**values)


def render(folder: Path, renderer=None, **changes):
    plan = prepare_dataset(folder, request(**changes))
    return render_pending(plan, renderer or FakeRenderer()), plan


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_image_seed_is_base_seed_plus_index_wrapping_at_2_to_the_64():
    assert [image_seed(100, index) for index in range(3)] == [100, 101, 102]
    assert image_seed(2**64 - 1, 2) == 1


def test_render_writes_image_and_caption_per_prompt_and_dataset_json(tmp_path):
    folder = tmp_path / "counting"
    written, _ = render(folder)

    assert written == [0, 1, 2, 3, 4]
    for index, prompt in enumerate(PROMPTS):
        assert (folder / f"{index:06d}.txt").read_text() == prompt
        with Image.open(folder / f"{index:06d}.png") as image:
            assert image.size == (16, 8)
            assert image.getpixel((0, 0)) == fake_image(prompt, 100 + index).getpixel((0, 0))
    settings = json.loads((folder / DATASET_FILE).read_text())
    assert {key: settings[key] for key in ("skill", "sampler", "scheduler", "steps", "cfg", "width", "height",
                                           "seed", "images")} == {
        "skill": "counting", "sampler": "euler", "scheduler": "normal", "steps": 2, "cfg": 7.5, "width": 16,
        "height": 8, "seed": 100, "images": 5}
    assert settings["generator"] == {"engine": "fake", "model": "m"}
    assert settings["seeds"] == [100, 101, 102, 103, 104]


def test_prompts_are_batched_in_calls_of_batch_size_with_their_own_seeds(tmp_path):
    renderer = FakeRenderer()
    render(tmp_path / "d", renderer, batch_size=2)
    assert [seeds for _, seeds in renderer.calls] == [[100, 101], [102, 103], [104]]


def test_a_batch_holds_prompts_of_one_conditioning_length_filled_in_index_order():
    lengths = {0: 77, 1: 154, 2: 77, 3: 231, 4: 77, 5: 154, 6: 77, 7: 77}
    assert list(batches(range(8), 3, lengths)) == [[0, 2, 4], [1, 5], [3], [6, 7]]
    assert list(batches([5, 6, 7], 2, lengths)) == [[6, 7], [5]]
    assert list(batches(range(8), 1, lengths)) == [[index] for index in range(8)]
    assert list(batches([], 4, lengths)) == []


def test_prompts_of_different_lengths_are_rendered_in_batches_of_one_length(tmp_path):
    prompts = ("a red cube", "a long caption that runs past forty characters", "two green apples",
               "another caption that runs well past forty characters", "a boat")
    renderer = FakeRenderer()
    written, _ = render(tmp_path / "d", renderer, prompts=prompts, batch_size=2)
    assert [seeds for _, seeds in renderer.calls] == [[100, 102], [101, 103], [104]]
    assert sorted(written) == [0, 1, 2, 3, 4]
    assert [(tmp_path / "d" / f"{index:06d}.txt").read_text() for index in range(5)] == list(prompts)


class NonFiniteAfterFirstBatch(FakeRenderer):
    """Decodes like an engine (floats → :func:`float_images_to_pil`); from the second batch on the model gives NaN."""

    def __call__(self, prompts, seeds):
        pixels = np.full((len(prompts), 8, 16, 3), 0.5 if not self.calls else np.nan, dtype=np.float32)
        if self.calls:
            pixels[:, 0, 0, 0] = 0.5  # NaN in all but one pixel: a black image once clipped
        self.calls.append((prompts, seeds))
        return float_images_to_pil(pixels)


def test_non_finite_pixels_stop_the_render_naming_the_model_and_the_batch_is_not_recorded(tmp_path):
    folder = tmp_path / "d"
    with pytest.raises(DatasetError, match=r"model 'm': rendered NaN or infinite pixels for prompts 2, 3 "
                                           r"\(000002.png, 000003.png\).*not written"):
        render(folder, NonFiniteAfterFirstBatch(), batch_size=2)
    assert pending_indices(folder, len(PROMPTS)) == (2, 3, 4)
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_decoding_refuses_non_finite_pixels_rather_than_clipping_them_to_black(value):
    pixels = np.zeros((3, 2, 2, 3), dtype=np.float32)
    pixels[1, 1, 0, 2] = value
    with pytest.raises(NonFiniteImages) as refusal:
        float_images_to_pil(pixels)
    assert refusal.value.positions == (1,)


def test_rerun_skips_images_already_on_disk(tmp_path):
    folder = tmp_path / "d"
    render(folder)
    before = files_of(folder)
    renderer = FakeRenderer()
    written, plan = render(folder, renderer)
    assert written == [] and renderer.calls == [] and plan.done == 5
    assert files_of(folder) == before


def test_an_image_counts_as_done_only_when_png_and_caption_both_exist(tmp_path):
    folder = tmp_path / "d"
    render(folder)
    (folder / "000001.txt").unlink()
    (folder / "000003.png").unlink()
    assert pending_indices(folder, 5) == (1, 3)
    renderer = FakeRenderer()
    render(folder, renderer)
    assert [seeds for _, seeds in renderer.calls] == [[101, 103]]
    assert pending_indices(folder, 5) == ()


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "whole"
    render(uninterrupted)

    interrupted = tmp_path / "resumed"
    plan = prepare_dataset(interrupted, request())

    def cancel_after_first_batch(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render_pending(plan, FakeRenderer(), on_batch=cancel_after_first_batch)
    assert pending_indices(interrupted, 5) == (2, 3, 4)
    render(interrupted)
    assert files_of(interrupted) == files_of(uninterrupted)


def test_a_grown_prompt_set_continues_the_dataset(tmp_path):
    folder = tmp_path / "d"
    render(folder, prompts=PROMPTS[:3])
    renderer = FakeRenderer()
    written, _ = render(folder, renderer, prompts=PROMPTS)
    assert written == [3, 4]
    assert json.loads((folder / DATASET_FILE).read_text())["images"] == 5


@pytest.mark.parametrize(("setting", "value"), [
    ("steps", 3), ("cfg", 5.0), ("width", 24), ("sampler", "dpmpp_2m"), ("seed", 7), ("negative_prompt", "blurry"),
    ("skill", "spatial_relations"), ("generator", {"engine": "fake", "model": "other"}),
])
def test_dataset_json_with_different_settings_is_refused_naming_the_setting(tmp_path, setting, value):
    folder = tmp_path / "d"
    render(folder)
    before = files_of(folder)
    renderer = FakeRenderer()
    with pytest.raises(DatasetError, match=rf"dataset.json was rendered with different settings.*{setting}\b"):
        render(folder, renderer, **{setting: value})
    assert renderer.calls == [] and files_of(folder) == before


def test_another_model_fingerprint_is_refused_naming_the_field_and_both_values(tmp_path):
    folder = tmp_path / "d"
    render(folder, generator={"engine": "fake", "model": "m.safetensors", "sha256": "aaaa"})
    before = files_of(folder)
    with pytest.raises(DatasetError, match=r'generator.sha256: the folder has "aaaa", this run asks "bbbb"'):
        render(folder, prompts=(*PROMPTS, "a sixth prompt"),
               generator={"engine": "fake", "model": "m.safetensors", "sha256": "bbbb"})
    assert files_of(folder) == before


def test_a_dataset_recorded_without_a_fingerprint_continues_with_a_notice_and_records_it(tmp_path):
    folder = tmp_path / "d"
    render(folder, prompts=PROMPTS[:3], generator={"engine": "fake", "model": "m.safetensors"})  # an older version
    fingerprinted = {"engine": "fake", "model": "m.safetensors", "sha256": "aaaa"}
    plan = prepare_dataset(folder, request(generator=fingerprinted))
    (notice,) = plan.notices
    assert "records no generator.sha256" in notice and "3 images there were not checked" in notice
    assert plan.pending == (3, 4)
    assert json.loads((folder / DATASET_FILE).read_text())["generator"] == fingerprinted
    with pytest.raises(DatasetError, match=r'generator.sha256: the folder has "aaaa", this run asks "bbbb"'):
        prepare_dataset(folder, request(generator={**fingerprinted, "sha256": "bbbb"}))


def test_a_changed_prompt_set_is_refused(tmp_path):
    folder = tmp_path / "d"
    render(folder)
    changed = (PROMPTS[0], "something else entirely", *PROMPTS[2:])
    with pytest.raises(DatasetError, match=r"000001.txt holds the caption 'two green apples' but prompt 1 is"):
        render(folder, prompts=changed)
    with pytest.raises(DatasetError, match=r"holds 000003.png but the prompt list has only 3 prompts"):
        render(folder, prompts=PROMPTS[:3])


def test_a_folder_that_is_not_a_dataset_is_not_taken_over(tmp_path):
    folder = tmp_path / "holiday-photos"
    folder.mkdir()
    (folder / "beach.jpg").write_bytes(b"jpeg")
    with pytest.raises(DatasetError, match=r"not empty and holds no dataset.json.*'beach.jpg'"):
        render(folder)
    (folder / DATASET_FILE).write_text(json.dumps({"some": "other tool"}))
    with pytest.raises(DatasetError, match=r"not a SELMA dataset description"):
        render(folder)


@pytest.mark.parametrize(("changes", "message"), [
    ({"prompts": ()}, r"prompts: the prompt list from prompts.jsonl is empty"),
    ({"prompts": ("a cat", "  ")}, r"prompts: prompt 1 from prompts.jsonl is '  '; expected non-empty text"),
    ({"width": 0}, r"width: 0 pixels; expected a positive multiple of 8"),
    ({"height": -64}, r"height: -64 pixels; expected a positive multiple of 8"),
    ({"width": 100}, r"width: 100 pixels; expected a positive multiple of 8"),
    ({"steps": 0}, r"steps: 0; expected a whole number of sampling steps, at least 1"),
    ({"cfg": -1.0}, r"cfg: -1.0; expected a guidance scale of 0 or more"),
    ({"batch_size": 0}, r"batch_size: 0; expected at least 1"),
    ({"seed": -1}, r"seed: -1; expected a whole number from 0 to 2\*\*64 - 1"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, changes, message):
    folder = tmp_path / "d"
    renderer = FakeRenderer()
    with pytest.raises(DatasetError, match=message):
        render(folder, renderer, **changes)
    assert not folder.exists() and renderer.calls == []


@pytest.mark.parametrize("name", ["..", "../escape", "a/b", "a\\b", "", ".hidden"])
def test_a_dataset_name_with_dots_or_separators_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=r"dataset name: .* is not a plain name"):
        resolve_dataset_folder(name, tmp_path / "datasets")


def test_a_dataset_name_goes_under_the_root_and_an_absolute_path_is_used_as_given(tmp_path):
    assert resolve_dataset_folder("counting v2", tmp_path) == tmp_path / "counting v2"
    assert resolve_dataset_folder(str(tmp_path / "x" / "y"), tmp_path / "root") == tmp_path / "x" / "y"


def test_an_unwritable_folder_is_refused_before_rendering(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    renderer = FakeRenderer()
    with pytest.raises(DatasetError, match=r"a-file/d.*cannot write there"):
        render(blocker / "d", renderer)
    assert renderer.calls == []
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DatasetError, match=r"cannot write there"):
            render(locked / "d", renderer)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_dataset import FakeRenderer, request
    from comfyui_selma.trainer.render.dataset import prepare_dataset, render_pending

    class DiesWhileWriting:
        # An image whose PNG encoding is cut off by SIGKILL halfway through the file.
        def __init__(self, image):
            self.image, self.size = image, image.size

        def save(self, stream, format):
            stream.write(b"\\x89PNG\\r\\n\\x1a\\n half an image")
            stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    class DiesAtImage2(FakeRenderer):
        def __call__(self, prompts, seeds):
            images = super().__call__(prompts, seeds)
            if 102 in seeds:
                images[seeds.index(102)] = DiesWhileWriting(images[seeds.index(102)])
            return images

    render_pending(prepare_dataset(Path({folder!r}), request()), DiesAtImage2())
""")


def test_a_run_killed_mid_write_leaves_no_half_image_and_a_rerun_completes(tmp_path):
    folder = tmp_path / "killed"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), folder=str(folder))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -9, result.stderr

    assert pending_indices(folder, 5) == (2, 3, 4)
    assert not (folder / "000002.png").exists()
    leftovers = [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".000002.png."), leftovers
    for path in done_image_paths(folder):
        with Image.open(path) as image:
            image.load()  # a whole PNG

    render(folder)
    uninterrupted = tmp_path / "whole"
    render(uninterrupted)
    assert files_of(folder) == files_of(uninterrupted)
