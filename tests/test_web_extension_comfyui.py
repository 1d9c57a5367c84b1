"""Integration tier: the web extension in ComfyUI's frontend, in headless Chromium, during a real run.

``selma_one_skill`` is opened as a user opens it, its widgets are set to tiny settings (template
prompts, 64 px, 2 sampling steps, a short training run on a random-weight SD 1.5), and it is queued
from the page. The page is reloaded while the trainer runs. The test then reads the extension's state
(``window.SELMA``) and the nodes' DOM: the loss curve received points, the prompt counter reached its
target, the render strip shows the images. Screenshots are kept in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "selma_one_skill.json"
TRAIN_STEPS = 30
PROMPTS = 4
RUN_TIMEOUT_MS = 900_000

SET_WIDGETS = """([nodeType, values]) => {
    const node = app.graph._nodes.find(candidate => candidate.type === nodeType);
    for (const [name, value] of Object.entries(values)) {
        const widget = node.widgets.find(candidate => candidate.name === name);
        if (!widget) throw new Error(`${nodeType} has no widget ${name}`);
        widget.value = value;
    }
    return node.id;
}"""


def open_one_skill_with_tiny_prompts_and_render(frontend, checkpoint: str, tag: str) -> tuple[int, int]:
    """Open selma_one_skill as a user does and set template prompts and 64 px renders; the nodes' ids."""
    page = frontend.page
    frontend.load_workflow(json.loads(WORKFLOW.read_text()))
    page.evaluate(SET_WIDGETS, ["CheckpointLoaderSimple", {"ckpt_name": checkpoint}])
    prompts_id = page.evaluate(SET_WIDGETS, ["SelmaSkillPrompts", {"backend": "template", "count": PROMPTS,
                                                                  "name": tag}])
    render_id = page.evaluate(SET_WIDGETS, ["SelmaRenderDataset", {"width": 64, "height": 64, "steps": 2,
                                                                   "batch_size": 2, "dataset_name": tag}])
    return prompts_id, render_id


def test_a_queued_run_shows_prompt_counts_render_previews_and_a_live_loss_curve(checkpoint_in_comfyui, frontend):
    page = frontend.page
    tag = "web-extension"
    prompts_id, render_id = open_one_skill_with_tiny_prompts_and_render(frontend, checkpoint_in_comfyui, tag)
    train_id = page.evaluate(SET_WIDGETS, ["SelmaTrainLoraExpert", {
        "base_checkpoint": checkpoint_in_comfyui, "lora_name": tag, "steps": TRAIN_STEPS, "batch_size": 1,
        "gradient_accumulation": 1, "resolution": 64, "rank": 4, "alpha": 4.0, "save_every": 0, "precision": "no"}])

    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("(id) => (window.SELMA.state(id)?.step ?? 0) >= 2", arg=str(train_id),
                           timeout=RUN_TIMEOUT_MS)
    frontend.show_nodes_at_full_size([render_id, train_id])
    frontend.screenshot("web-extension-training")
    before_reload = page.evaluate("(id) => window.SELMA.state(id).step", str(train_id))
    prompts = page.evaluate("(id) => window.SELMA.state(id)", str(prompts_id))
    assert prompts["done"] and prompts["kept"] == prompts["target"] == PROMPTS
    assert page.evaluate("(id) => window.SELMA.state(id).done", str(render_id)) == PROMPTS

    page.reload()  # mid-run: the workflow comes back from the browser's storage, the states from the next event
    page.wait_for_function("() => window.app && window.app.graph && window.SELMA", timeout=120_000)
    page.wait_for_function("(id) => window.SELMA.state(id)?.done === true", arg=str(train_id),
                           timeout=RUN_TIMEOUT_MS)
    frontend.show_nodes_at_full_size([render_id, train_id])
    frontend.screenshot("web-extension-done")

    train = page.evaluate("(id) => window.SELMA.state(id)", str(train_id))
    assert train["step"] == train["maxSteps"] == TRAIN_STEPS
    assert 1 <= len(train["points"]) <= TRAIN_STEPS - before_reload, "after the reload, points come from new events"
    assert all(math.isfinite(loss) and loss > 0 for _, loss in train["points"])
    assert train["loraName"] == f"{tag}.safetensors"
    chart_pixels = page.evaluate("""(id) => {
        const canvas = app.graph.getNodeById(Number(id)).widgets.find(w => w.name === 'selma_display')
            .element.querySelector('canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let blue = 0;
        for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 200 && data[i] < 160) blue += 1;
        return blue;
    }""", str(train_id))
    assert chart_pixels > 20, "the loss curve is drawn on the Train node's canvas"
    assert page.evaluate("() => window.SELMA.nodes().length") >= 1
    assert all("selma" not in error.lower() for error in frontend.page_errors), frontend.page_errors


def test_prompt_counter_reaches_its_target_and_the_render_strip_loads(checkpoint_in_comfyui, frontend):
    """Prompts and render alone (no training): the counter reaches its target, the strip shows every image."""
    page = frontend.page
    prompts_id, render_id = open_one_skill_with_tiny_prompts_and_render(frontend, checkpoint_in_comfyui,
                                                                        "web-extension-counter")
    page.evaluate("""() => { const train = app.graph._nodes.find(n => n.type === 'SelmaTrainLoraExpert');
                             app.graph.remove(train); }""")  # prompts and render only: quick

    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function(f"(id) => window.SELMA.state(id)?.done >= {PROMPTS}", arg=str(render_id),
                           timeout=RUN_TIMEOUT_MS)
    page.wait_for_timeout(1_500)
    frontend.show_nodes_at_full_size([prompts_id, render_id])
    frontend.screenshot("web-extension-prompts-render")

    prompts = page.evaluate("(id) => window.SELMA.state(id)", str(prompts_id))
    assert prompts["done"] and prompts["kept"] == prompts["target"] == PROMPTS and prompts["reachedTarget"]
    shown = page.evaluate("""(id) => app.graph.getNodeById(Number(id)).widgets.find(w => w.name === 'selma_display')
        .element.innerText""", str(prompts_id))
    assert f"kept {PROMPTS} / {PROMPTS} prompts" in shown and "rejected:" in shown
    render = page.evaluate("(id) => window.SELMA.state(id)", str(render_id))
    assert render["done"] == render["total"] == PROMPTS and len(render["previews"]) == PROMPTS
    loaded = page.evaluate("""(id) => [...app.graph.getNodeById(Number(id)).widgets
        .find(w => w.name === 'selma_display').element.querySelectorAll('img')].map(img => img.naturalWidth)""",
                           str(render_id))
    assert loaded == [64] * PROMPTS, "each preview is the 64 px image, served by ComfyUI's /view"
