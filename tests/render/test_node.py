"""SELMA Render Dataset with the ComfyUI stand-ins: naming, validation, resume, cancel, progress, outputs.

Sampling itself exists only in a real ComfyUI (``test_render_comfyui.py``); here a fake batch
renderer takes its place, so what is checked is the node's own logic around it.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_standins import SD15, SD20, SDXL, SSD1B, ClipStandIn, Flux, ModelType, comfy_model
from PIL import Image

from comfyui_selma.nodes import render as render_node
from comfyui_selma.nodes.render import SelmaRenderDataset, negative_conditioning, stack_conditioning
from comfyui_selma.trainer.render.dataset import DatasetError
from comfyui_selma.trainer.prompts.prompt_set import PromptSet

PROMPTS = ("a red cube", "two green apples", "a cat on a sofa", "three birds on a wire", "a boat at dawn")
SETTINGS = dict(negative_prompt="", width=16, height=8, steps=2, cfg=7.5, sampler_name="euler", scheduler="normal",
                seed=100, batch_size=2)


class FlatImages:
    """A batch renderer for the node's logic: one flat image per prompt, its red the seed mod 256; each
    prompt's conditioning length as the node tells it for a ClipStandIn (77 tokens per 300 characters)."""

    def __init__(self, request, calls: list[list[int]], before_batch=None) -> None:
        self.size, self.calls, self.before_batch = (request.width, request.height), calls, before_batch

    def conditioning_length(self, prompt: str) -> int:
        return render_node.conditioning_length(ClipStandIn(), prompt)

    def __call__(self, prompts, seeds):
        if self.before_batch is not None:
            self.before_batch()
        self.calls.append(list(seeds))
        return [Image.new("RGB", self.size, (seed % 256, 0, 0)) for seed in seeds]


class FakeRenderer:
    """Stands in for ``ComfyBatchRenderer`` (sampling needs a real ComfyUI): builds :class:`FlatImages`."""

    def __init__(self, before_batch=None) -> None:
        self.calls: list[list[int]] = []
        self.before_batch = before_batch

    def __call__(self, model, clip, vae, request):
        return FlatImages(request, self.calls, self.before_batch)


@pytest.fixture
def fake_renderer(monkeypatch) -> FakeRenderer:
    fake = FakeRenderer()
    monkeypatch.setattr(render_node, "ComfyBatchRenderer", fake)
    return fake


def run_node(prompts=PROMPTS, skill="counting", dataset_name="", model=None, **changes):
    settings = {**SETTINGS, **changes}
    prompt_set = PromptSet(prompts=tuple(prompts), skill=skill, path="/prompts/counting.jsonl")
    return SelmaRenderDataset().render(model=model or object(), clip=object(), vae=object(), prompts=prompt_set,
                                       dataset_name=dataset_name, unique_id="7", **settings)


def recorded_size(comfy, skill="counting") -> tuple[int, int]:
    settings = json.loads((comfy.output_dir / "selma" / "datasets" / skill / "dataset.json").read_text())
    return settings["width"], settings["height"]


def test_node_takes_comfyui_model_clip_vae_and_the_prompt_set_and_returns_path_and_preview():
    inputs = SelmaRenderDataset.INPUT_TYPES()["required"]
    assert [inputs[name][0] for name in ("model", "clip", "vae", "prompts")] == ["MODEL", "CLIP", "VAE",
                                                                                  "SELMA_PROMPTS"]
    assert inputs["steps"][1]["default"] == 50 and inputs["cfg"][1]["default"] == 7.5
    assert inputs["width"][1]["step"] == 8 and "euler" in inputs["sampler_name"][0]
    assert SelmaRenderDataset.RETURN_TYPES == ("STRING", "IMAGE") and SelmaRenderDataset.OUTPUT_NODE


def test_node_writes_the_dataset_under_output_selma_datasets_named_after_the_skill(comfy, fake_renderer):
    path, preview = run_node()
    folder = comfy.output_dir / "selma" / "datasets" / "counting"
    assert path == str(folder)
    assert [(folder / f"{index:06d}.txt").read_text() for index in range(5)] == list(PROMPTS)
    settings = json.loads((folder / "dataset.json").read_text())
    assert (settings["sampler"], settings["scheduler"], settings["seeds"]) == ("euler", "normal",
                                                                              [100, 101, 102, 103, 104])
    assert settings["generator"]["engine"] == "comfyui"
    assert fake_renderer.calls == [[100, 101], [102, 103], [104]]
    assert preview.shape == (4, 8, 16, 3) and preview.dtype == torch.float32
    assert preview[1, 0, 0].tolist() == pytest.approx([101 / 255, 0.0, 0.0])


def test_node_progress_advances_per_image_and_each_batch_tells_the_browser_its_images(comfy, fake_renderer):
    run_node()
    assert comfy.progress == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert comfy.events[-1] == ("selma.render", {
        "node": "7", "kind": "batch", "done": 5, "total": 5,
        "folder": str(comfy.output_dir / "selma" / "datasets" / "counting"),
        "images": [{"filename": "000004.png", "subfolder": "selma/datasets/counting", "type": "output"}]})
    assert [(event["kind"], event["done"], [image["filename"] for image in event["images"]])
            for _, event in comfy.events] == [("start", 0, []), ("batch", 2, ["000000.png", "000001.png"]),
                                              ("batch", 4, ["000002.png", "000003.png"]), ("batch", 5, ["000004.png"])]


def test_queueing_again_skips_the_images_on_disk_and_shows_the_newest_at_once(comfy, fake_renderer):
    run_node(prompts=[f"prompt {index}" for index in range(9)], dataset_name="mine")
    fake_renderer.calls.clear()
    comfy.events.clear()
    path, preview = run_node(prompts=[f"prompt {index}" for index in range(9)], dataset_name="mine")
    assert fake_renderer.calls == [] and preview.shape[0] == 4
    assert path.endswith("/selma/datasets/mine")
    ((_, start),) = comfy.events
    assert (start["kind"], start["done"], start["total"]) == ("start", 9, 9)
    assert [image["filename"] for image in start["images"]] == [f"{index:06d}.png" for index in range(3, 9)]


def test_cancel_stops_between_batches_keeps_finished_images_and_a_requeue_finishes(comfy, fake_renderer):
    from comfy.model_management import InterruptProcessingException

    comfy.cancel_after_updates = 3  # the start, the first batch, then cancel while reporting the second
    with pytest.raises(InterruptProcessingException):
        run_node()
    folder = comfy.output_dir / "selma" / "datasets" / "counting"
    assert sorted(path.name for path in folder.glob("*.png")) == [f"{index:06d}.png" for index in range(4)]
    comfy.cancel_after_updates = None
    fake_renderer.calls.clear()
    run_node()
    assert fake_renderer.calls == [[104]]


def test_an_absolute_dataset_path_inside_the_output_folder_is_used_as_given(comfy, fake_renderer):
    folder = comfy.output_dir / "elsewhere" / "set"
    path, _ = run_node(dataset_name=str(folder))
    assert path == str(folder) and (folder / "000004.png").is_file()
    assert comfy.events[-1][1]["images"][-1] == {"filename": "000004.png", "subfolder": "elsewhere/set",
                                                 "type": "output"}


def test_an_absolute_dataset_path_outside_the_output_folder_is_refused(comfy, fake_renderer, tmp_path):
    with pytest.raises(ValueError, match=r"dataset_name: .* is outside ComfyUI's output folder"):
        run_node(dataset_name=str(tmp_path / "elsewhere" / "set"))
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"dataset_name": "../outside"}, r"dataset_name: '../outside' is not a plain name"),
    ({"dataset_name": "a/b"}, r"dataset_name: 'a/b' is not a plain name"),
    ({"width": 100}, r"width: 100 pixels; expected a positive multiple of 8"),
    ({"height": 12}, r"height: 12 pixels; expected a positive multiple of 8"),
    ({"width": 0}, r"width: 0 \(auto\): the native size of this model \(object\) is not known"),
    ({"prompts": ()}, r"prompts: the prompt list from /prompts/counting.jsonl is empty"),
])
def test_bad_input_is_refused_before_rendering(comfy, fake_renderer, changes, message):
    with pytest.raises(ValueError, match=message):
        run_node(**changes)
    assert fake_renderer.calls == [] and comfy.progress == []
    assert not (comfy.output_dir / "selma" / "datasets").exists()


def test_other_settings_on_an_existing_dataset_are_refused(comfy, fake_renderer):
    run_node()
    fake_renderer.calls.clear()
    with pytest.raises(DatasetError, match=r"sampler: the folder has \"euler\", this run asks \"dpmpp_2m\""):
        run_node(sampler_name="dpmpp_2m")
    assert fake_renderer.calls == []


def test_a_second_render_into_a_dataset_being_rendered_is_refused_and_the_first_dataset_survives(comfy,
                                                                                                  monkeypatch):
    import os

    from comfyui_selma.trainer.storage.locks import LockHeldError

    second_render = []

    def queue_a_second_render():
        if not second_render:  # while the first render holds the folder
            second_render.append("rendered")
            try:
                run_node(prompts=["a blue ball", "a dog in a park"], dataset_name="shared")
            except LockHeldError as refusal:
                second_render[0] = str(refusal)

    monkeypatch.setattr(render_node, "ComfyBatchRenderer", FakeRenderer(before_batch=queue_a_second_render))
    run_node(dataset_name="shared")
    folder = comfy.output_dir / "selma" / "datasets" / "shared"
    assert f"{folder}: in use by process {os.getpid()}" in second_render[0]
    assert [(folder / f"{index:06d}.txt").read_text() for index in range(5)] == list(PROMPTS)
    assert not (folder.parent / "shared.lock").exists()


def test_a_model_that_decodes_to_nan_stops_the_node_naming_it_and_records_no_image(comfy, monkeypatch):
    import numpy as np

    from comfyui_selma.trainer.render.dataset import float_images_to_pil

    class DecodesToNan(FlatImages):  # what ComfyBatchRenderer does with a VAE's NaN output
        def __call__(self, prompts, seeds):
            return float_images_to_pil(np.full((len(prompts), self.size[1], self.size[0], 3), np.nan))

    monkeypatch.setattr(render_node, "ComfyBatchRenderer",
                        lambda model, clip, vae, request: DecodesToNan(request, []))
    with pytest.raises(DatasetError, match=r"model 'SD15': rendered NaN or infinite pixels for prompts 0, 1"):
        run_node(model=comfy_model(SD15))
    assert not list((comfy.output_dir / "selma" / "datasets" / "counting").glob("*.png"))


def test_a_prompts_input_that_is_not_a_prompt_set_is_refused(comfy, fake_renderer):
    with pytest.raises(DatasetError, match=r"prompts: got list; expected the output of SELMA Skill Prompts"):
        SelmaRenderDataset().render(model=None, clip=None, vae=None, prompts=["a cat"], **SETTINGS)


def test_prompts_of_different_lengths_are_batched_only_with_prompts_of_their_length(comfy, fake_renderer):
    long_prompts = ["a long caption: " + "a small wooden toy beside a red box, " * 10 + f"number {index}"
                    for index in range(2)]
    prompts = ["a red cube", long_prompts[0], "two green apples", long_prompts[1], "a cat on a sofa"]
    run_node(prompts=prompts, batch_size=2)
    assert fake_renderer.calls == [[100, 102], [101, 103], [104]]  # 77 tokens: 0, 2, 4; 154 tokens: 1, 3
    folder = comfy.output_dir / "selma" / "datasets" / "counting"
    assert [(folder / f"{index:06d}.txt").read_text() for index in range(5)] == prompts


@pytest.mark.parametrize("characters", [0, 10, 299, 300, 650])
def test_a_prompts_conditioning_length_is_told_from_its_tokens_as_the_clip_would_encode_it(characters):
    clip, prompt = ClipStandIn(), "x" * characters
    encoded = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, return_dict=True)
    assert render_node.conditioning_length(clip, prompt) == encoded["cond"].shape[1]


def test_conditionings_of_one_length_are_stacked_and_the_negative_keeps_its_own_length():
    first = {"cond": torch.randn(1, 154, 8), "pooled_output": torch.randn(1, 4)}
    second = {"cond": torch.randn(1, 154, 8), "pooled_output": torch.randn(1, 4)}
    negative = {"cond": torch.randn(1, 77, 8), "pooled_output": torch.randn(1, 4)}
    [[positive, extras]], [[negative_cond, negative_extras]] = stack_conditioning([first, second], negative, 64, 32)
    assert torch.equal(positive, torch.cat([first["cond"], second["cond"]]))
    assert torch.equal(extras["pooled_output"], torch.cat([first["pooled_output"], second["pooled_output"]]))
    assert torch.equal(negative_cond, negative["cond"])  # ComfyUI pads it (at most 4x) or runs it apart
    assert (extras["width"], extras["height"], extras["target_width"], negative_extras["height"]) == (64, 32, 64, 32)


def test_a_batch_of_conditionings_of_different_lengths_is_refused_not_padded_to_their_common_multiple():
    lengths = (29, 31, 33)  # chunks: padded to a common length, each would be 29 * 31 * 33 chunks long
    encoded = [{"cond": torch.randn(1, 77 * chunks, 8)} for chunks in lengths]
    with pytest.raises(ValueError, match=r"conditionings of \[2233, 2387, 2541\] tokens; expected one length"):
        stack_conditioning(encoded, {"cond": torch.randn(1, 77, 8)}, 64, 64)


def test_the_size_widgets_default_to_auto_and_say_what_auto_is():
    inputs = SelmaRenderDataset.INPUT_TYPES()["required"]
    for name in ("width", "height"):
        options = inputs[name][1]
        assert (options["default"], options["min"], options["step"]) == (0, 0, 8)
        assert all(text in options["tooltip"] for text in ("0 (auto)", "512 for SD 1.x", "768", "1024 for SDXL"))


@pytest.mark.parametrize(("model", "native"), [
    (comfy_model(SD15), 512), (comfy_model(SD20), 512), (comfy_model(SD20, ModelType.V_PREDICTION), 768),
    (comfy_model(SDXL), 1024), (comfy_model(SSD1B), 1024)], ids=["sd1", "sd2-base", "sd2-768-v", "sdxl", "ssd-1b"])
def test_width_and_height_0_render_at_the_model_familys_native_size(comfy, fake_renderer, model, native):
    run_node(prompts=PROMPTS[:1], model=model, width=0, height=0)
    assert recorded_size(comfy) == (native, native)
    image = comfy.output_dir / "selma" / "datasets" / "counting" / "000000.png"
    assert Image.open(image).size == (native, native)


def test_a_size_the_user_set_is_kept_whatever_the_model(comfy, fake_renderer):
    run_node(prompts=PROMPTS[:1], model=comfy_model(SDXL), width=512, height=512)
    assert recorded_size(comfy) == (512, 512)
    run_node(prompts=PROMPTS[:1], model=comfy_model(SDXL), width=0, height=640, dataset_name="tall")
    assert recorded_size(comfy, "tall") == (1024, 640)


def test_auto_size_on_a_model_of_another_family_asks_for_a_size_before_rendering(comfy, fake_renderer):
    with pytest.raises(DatasetError, match=r"height: 0 \(auto\): the native size of this model \(Flux\) is not "
                                           r"known; expected SD 1.x, SD 2.x or SDXL, or set width and height"):
        run_node(model=comfy_model(Flux, ModelType.FLOW), width=1024, height=0)
    assert fake_renderer.calls == [] and not (comfy.output_dir / "selma" / "datasets").exists()


def test_an_empty_negative_prompt_on_sdxl_is_zero_conditioning_as_diffusers_and_the_cli_use():
    clip = ClipStandIn()
    empty_text = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True, return_dict=True)
    zeros = negative_conditioning(comfy_model(SDXL), clip, "")
    assert set(zeros) == set(empty_text) == {"cond", "pooled_output"}
    for key, value in zeros.items():
        assert value.shape == empty_text[key].shape and value.dtype == empty_text[key].dtype
        assert not value.any(), f"{key} is not zeros"
    assert not negative_conditioning(comfy_model(SSD1B), clip, "")["pooled_output"].any()


@pytest.mark.parametrize(("model", "negative_prompt"), [(comfy_model(SDXL), "blurry"), (comfy_model(SD15), ""),
                                                        (comfy_model(SD20, ModelType.V_PREDICTION), "")])
def test_a_written_negative_prompt_and_other_families_empty_one_are_encoded_by_the_clip(model, negative_prompt):
    clip = ClipStandIn(width=768)
    encoded = negative_conditioning(model, clip, negative_prompt)
    expected = clip.encode_from_tokens(clip.tokenize(negative_prompt), return_pooled=True, return_dict=True)
    assert encoded.keys() == expected.keys() and all(torch.equal(encoded[key], expected[key]) for key in expected)
    assert encoded["cond"].abs().sum() > 0
