"""The Render node with ComfyUI stand-ins: what it checks before any sampling (the sampling itself
runs only in a real ComfyUI: tests/test_render_comfyui.py)."""

from __future__ import annotations

import pytest

from comfyui_selma.nodes.render import SelmaRenderDataset
from comfyui_selma.trainer.dataset import DatasetError
from comfyui_selma.trainer.prompt_set import PromptSet

PROMPTS = PromptSet(prompts=("a red cube", "two apples"), skill="counting", path="")
SETTINGS = dict(negative_prompt="", width=64, height=64, steps=2, cfg=7.5, sampler_name="euler",
                scheduler="normal", seed=0, batch_size=2)


def _render(**changes):
    settings = {**SETTINGS, **changes}
    return SelmaRenderDataset().render(object(), object(), object(), settings.pop("prompts", PROMPTS), **settings)


@pytest.mark.parametrize(("changes", "message"), [
    ({"dataset_name": "../escape"}, "dataset"),
    ({"dataset_name": "a/b"}, "dataset"),
    ({"width": 60}, "width"),
    ({"height": 0}, "height"),
    ({"prompts": PromptSet(prompts=(), skill="counting", path="")}, "prompt"),
    ({"prompts": "a red cube"}, "SELMA Skill Prompts"),
])
def test_bad_input_is_refused_before_anything_is_written(comfy, changes, message):
    with pytest.raises((DatasetError, ValueError), match=message):
        _render(**changes)
    assert not (comfy.output_dir / "selma").exists() or not any((comfy.output_dir / "selma").rglob("*.png"))
    assert comfy.progress == []
