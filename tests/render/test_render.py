"""``selma render``: the diffusers renderer on tiny models — seeding rule, batching, chunking, resume, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_selma.trainer import cli
from comfyui_selma.trainer.render.dataset import DatasetError, RenderRequest, pending_indices, prepare_dataset, render_pending
from comfyui_selma.trainer.families.hashing import model_sha256
from comfyui_selma.trainer.prompts.prompt_set import PromptRecord, prompt_set_of
from comfyui_selma.trainer.render.run import (
    DiffusersRenderer,
    RenderConfig,
    encode_prompt,
    load_renderer_pipeline,
    render_dataset,
)

LONG_PROMPT = "A long paragraph caption: " + " ".join(
    f"then a small wooden toy number {index} stands beside the red box" for index in range(8))
PROMPTS = ["a red cube on a table", LONG_PROMPT, "two green apples in a bowl", "a cat on a sofa", "a boat at dawn"]
SIZE = 64
STEPS = 2
TOLERANCE = 2  # 8-bit pixels: batched and single calls differ only by float rounding


def write_prompt_set(path: Path, prompts=PROMPTS, skill="counting") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(PromptRecord(prompt, skill, "seed", 0.0).to_json() + "\n" for prompt in prompts))
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return write_prompt_set(tmp_path_factory.mktemp("prompts") / "counting.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prompt_file, tiny_sd1_folder) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted") / "dataset"
    render_dataset(prompt_set_of(prompt_file), folder, tiny_sd1_folder,
                   RenderConfig(steps=STEPS, batch_size=2, seed=7), show_progress=False)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_short_prompts_encode_exactly_as_diffusers_and_long_ones_in_77_token_chunks(architecture, request):
    pipeline = load_renderer_pipeline(request.getfixturevalue(f"tiny_{architecture}_folder"), "cpu")
    ours = encode_prompt(pipeline, PROMPTS[0])
    theirs = pipeline.encode_prompt(PROMPTS[0], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
    assert ours.hidden.shape[1] == 77 and np.array_equal(ours.hidden.numpy(), theirs[0].detach().numpy())
    if architecture == "sdxl":
        assert np.array_equal(ours.pooled.numpy(), theirs[2].detach().numpy())
    assert encode_prompt(pipeline, LONG_PROMPT).hidden.shape[1] == 2 * 77


@pytest.mark.parametrize(("architecture", "sampler"), [("sd1", "default"), ("sd1", "euler_ancestral"),
                                                       ("sdxl", "default")])
@pytest.mark.slow
def test_an_image_is_the_same_alone_or_in_a_batch_of_4(architecture, sampler, request):
    pipeline = load_renderer_pipeline(request.getfixturevalue(f"tiny_{architecture}_folder"), "cpu", sampler=sampler)
    renderer = DiffusersRenderer(pipeline, SIZE, SIZE, STEPS, 7.5, negative_prompt="blurry")
    prompts, seeds = [PROMPTS[0], *PROMPTS[2:]], [7, 8, 9, 10]
    together = renderer(prompts, seeds)
    for index in range(4):
        alone = renderer([prompts[index]], [seeds[index]])[0]
        assert np.abs(pixels(together[index]) - pixels(alone)).max() <= TOLERANCE, f"image {index}"
    assert np.abs(pixels(together[0]) - pixels(renderer([prompts[0]], [8])[0])).max() > TOLERANCE, \
        "another seed gave the same image"


def test_prompts_of_different_lengths_never_share_a_sampler_call_and_match_their_images_alone(tmp_path,
                                                                                             tiny_sd1_folder):
    pipeline = load_renderer_pipeline(tiny_sd1_folder, "cpu", sampler="euler")
    renderer = DiffusersRenderer(pipeline, 32, 32, 1, 7.5, negative_prompt="blurry")
    phrases = ("a red cube on a wooden table", "two green apples in a bowl")  # 7 and 6 tokens
    prompts = [" ".join([phrase] * repeats) for phrase in phrases for repeats in (1, 14, 30)]
    assert [renderer.conditioning_length(prompt) // 77 for prompt in prompts] == [1, 2, 3, 1, 2, 3]  # chunks
    conditioning_shapes = []
    pipeline.unet.register_forward_pre_hook(
        lambda unet, args, kwargs: conditioning_shapes.append(tuple(kwargs["encoder_hidden_states"].shape[:2])),
        with_kwargs=True)
    request = RenderRequest(prompts=tuple(prompts), skill="counting", generator={"engine": "diffusers", "model": "t"},
                            sampler="euler", scheduler=None, steps=1, cfg=7.5, width=32, height=32,
                            negative_prompt="blurry", seed=7, batch_size=3)
    render_pending(prepare_dataset(tmp_path / "d", request), renderer)
    # one sampler step per batch, prompt and negative together: a batch per length, no 6-chunk (LCM) tensor
    assert sorted(conditioning_shapes) == [(4, 77), (4, 154), (4, 231)]
    for index, prompt in enumerate(prompts):
        alone = renderer([prompt], [7 + index])[0]
        assert np.abs(pixels(tmp_path / "d" / f"{index:06d}.png") - pixels(alone)).max() <= TOLERANCE, index
    with pytest.raises(ValueError, match=r"conditionings of \[77, 154, 231\] tokens; expected one length"):
        renderer(prompts[:3], [7, 8, 9])


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_an_empty_negative_prompt_is_zeros_on_sdxl_as_diffusers_and_the_empty_text_elsewhere(architecture, request):
    pipeline = load_renderer_pipeline(request.getfixturevalue(f"tiny_{architecture}_folder"), "cpu")
    negative = DiffusersRenderer(pipeline, SIZE, SIZE, STEPS, 7.5, negative_prompt="").negative
    empty_text = encode_prompt(pipeline, "")
    assert negative.hidden.shape == empty_text.hidden.shape == (1, 77, empty_text.hidden.shape[-1])
    if architecture == "sdxl":  # diffusers' force_zeros_for_empty_prompt, what SELMA's renders used
        _, theirs, _, theirs_pooled = pipeline.encode_prompt(PROMPTS[0], device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
        assert not negative.hidden.any() and not negative.pooled.any()
        assert np.array_equal(negative.hidden.numpy(), theirs.numpy())
        assert np.array_equal(negative.pooled.numpy(), theirs_pooled.numpy())
    else:
        assert np.array_equal(negative.hidden.numpy(), empty_text.hidden.numpy()) and negative.hidden.any()


def test_width_or_height_0_is_the_models_native_size(tmp_path, tiny_sd1_folder, capsys):
    prompts = write_prompt_set(tmp_path / "one.jsonl", PROMPTS[:1])
    out = tmp_path / "auto"
    assert cli.main(["render", str(prompts), "--model", str(tiny_sd1_folder), "--out", str(out), "--width", "0",
                     "--height", "32", "--steps", "1", "--quiet"]) == 0, capsys.readouterr().err
    settings = json.loads((out / "dataset.json").read_text())
    assert (settings["width"], settings["height"]) == (SIZE, 32)  # the tiny model's native size is 64
    assert Image.open(out / "000000.png").size == (SIZE, 32)


def test_selma_render_cli_writes_the_dataset_from_a_single_file_checkpoint(tmp_path, prompt_file, tiny_sd1_checkpoint,
                                                                          tiny_sd1_folder, uninterrupted, capsys):
    out = tmp_path / "from-checkpoint"
    exit_code = cli.main(["render", str(prompt_file), "--model", str(tiny_sd1_checkpoint), "--model-config",
                          str(tiny_sd1_folder), "--out", str(out), "--steps", str(STEPS), "--batch-size", "2",
                          "--seed", "7", "--quiet"])
    assert exit_code == 0, capsys.readouterr().err
    assert f"5 of 5 images done (0 were already there, 5 rendered" in capsys.readouterr().out
    settings = json.loads((out / "dataset.json").read_text())
    assert settings["generator"] == {"engine": "diffusers", "model": tiny_sd1_checkpoint.name,
                                     "sha256": hashlib.sha256(tiny_sd1_checkpoint.read_bytes()).hexdigest(),
                                     "model_config_sha256": model_sha256(tiny_sd1_folder)}
    assert (settings["width"], settings["height"]) == (SIZE, SIZE)  # the tiny model's native size
    assert (settings["steps"], settings["cfg"], settings["sampler"], settings["seeds"]) == \
        (STEPS, 7.5, "default", [7, 8, 9, 10, 11])
    assert settings["prompts_file"] == str(prompt_file)
    for index, prompt in enumerate(PROMPTS):
        assert (out / f"{index:06d}.txt").read_text() == prompt
        # the same weights as a folder or as one file: the same images
        assert np.abs(pixels(out / f"{index:06d}.png") - pixels(uninterrupted / f"{index:06d}.png")).max() <= 1

    assert cli.main(["render", str(prompt_file), "--model", str(tiny_sd1_checkpoint), "--model-config",
                     str(tiny_sd1_folder), "--out", str(out), "--steps", str(STEPS), "--seed", "7", "--quiet"]) == 0
    assert "5 of 5 images done (5 were already there, 0 rendered" in capsys.readouterr().out


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, prompt_file, tiny_sd1_folder, uninterrupted):
    folder = tmp_path / "dataset"
    config = RenderConfig(steps=STEPS, batch_size=2, seed=7)

    def interrupt(batch):
        raise KeyboardInterrupt  # Ctrl-C after the first batch was written

    with pytest.raises(KeyboardInterrupt):
        render_dataset(prompt_set_of(prompt_file), folder, tiny_sd1_folder, config, show_progress=False,
                       on_batch=interrupt)
    assert pending_indices(folder, len(PROMPTS)) == (1, 3, 4)  # the first batch: short prompts 0 and 2
    summary = render_dataset(prompt_set_of(prompt_file), folder, tiny_sd1_folder, config, show_progress=False)
    assert (summary.already_done, summary.rendered_here, summary.done_now) == (2, 3, 5)
    for index in range(len(PROMPTS)):
        assert np.abs(pixels(folder / f"{index:06d}.png") - pixels(uninterrupted / f"{index:06d}.png")).max() \
            <= TOLERANCE


def test_accelerate_launch_splits_the_prompts_across_processes_each_writing_its_share(tmp_path, prompt_file,
                                                                                    tiny_sd1_folder, uninterrupted):
    out = tmp_path / "two-processes"
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    render = ["-m", "comfyui_selma.trainer.cli", "render", str(prompt_file), "--model", str(tiny_sd1_folder),
              "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--seed", "7", "--device", "cpu",
              "--quiet"]
    result = subprocess.run(launch + render, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    shares = sorted(int(count) for count in re.findall(r"(\d+) rendered by this process", result.stdout))
    assert shares == [2, 3], result.stdout
    assert pending_indices(out, len(PROMPTS)) == ()
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]
    for index in range(len(PROMPTS)):
        assert np.abs(pixels(out / f"{index:06d}.png") - pixels(uninterrupted / f"{index:06d}.png")).max() \
            <= TOLERANCE


def test_a_second_render_into_a_dataset_being_rendered_is_refused_and_the_first_dataset_survives(tmp_path,
                                                                                                  tiny_sd1_folder,
                                                                                                  capsys):
    first = write_prompt_set(tmp_path / "first.jsonl", PROMPTS[:3])
    second = write_prompt_set(tmp_path / "second.jsonl", ["a blue ball", "a dog in a park", "three pears"])
    out = tmp_path / "dataset"
    small = ["--steps", "1", "--width", "32", "--height", "32", "--batch-size", "1", "--quiet"]
    second_exit_codes = []

    def start_the_second_render(batch):
        if not second_exit_codes:  # while the first render holds the folder, after its first image
            second_exit_codes.append(cli.main(["render", str(second), "--model", str(tiny_sd1_folder), "--out",
                                               str(out), *small]))

    render_dataset(prompt_set_of(first), out, tiny_sd1_folder, RenderConfig(steps=1, width=32, height=32,
                                                                             batch_size=1),
                   show_progress=False, on_batch=start_the_second_render)
    assert second_exit_codes == [1]
    assert f"{out}: in use by process {os.getpid()}" in capsys.readouterr().err
    assert [(out / f"{index:06d}.txt").read_text() for index in range(3)] == PROMPTS[:3]
    assert json.loads((out / "dataset.json").read_text())["prompts_file"] == str(first)
    assert not (tmp_path / "dataset.lock").exists()  # released when the render ended


def test_a_dataset_is_continued_only_by_the_model_file_that_started_it(tmp_path, prompt_file, tiny_sd1_checkpoint,
                                                                      tiny_sd1_folder, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_sd1_checkpoint, model)
    started = write_prompt_set(tmp_path / "started.jsonl", PROMPTS[:2])
    out = tmp_path / "dataset"
    settings = ["--model", str(model), "--model-config", str(tiny_sd1_folder), "--out", str(out), "--steps", "1",
                "--width", "32", "--height", "32", "--quiet"]
    assert cli.main(["render", str(started), *settings]) == 0, capsys.readouterr().err
    first_sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
    generator = json.loads((out / "dataset.json").read_text())["generator"]
    assert generator == {"engine": "diffusers", "model": "model.safetensors", "sha256": first_sha256,
                         "model_config_sha256": generator["model_config_sha256"]}

    weights = load_file(model)  # another model under the same file name: a fine-tune of it
    weights = {name: tensor + 0.01 if name.endswith("out.2.bias") else tensor for name, tensor in weights.items()}
    save_file(weights, model)
    other_sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
    before = files_of(out)
    assert cli.main(["render", str(prompt_file), *settings]) == 1
    assert (f'generator.sha256: the folder has "{first_sha256}", this run asks "{other_sha256}"'
            in capsys.readouterr().err)
    assert files_of(out) == before


def test_a_dataset_from_before_model_fingerprints_is_continued_with_a_notice(tmp_path, prompt_file, tiny_sd1_folder,
                                                                             capsys):
    out = tmp_path / "dataset"
    settings = ["--model", str(tiny_sd1_folder), "--out", str(out), "--steps", "1", "--width", "32", "--height", "32",
                "--quiet"]
    assert cli.main(["render", str(write_prompt_set(tmp_path / "two.jsonl", PROMPTS[:2])), *settings]) == 0
    recorded = json.loads((out / "dataset.json").read_text())
    fingerprint = recorded["generator"]
    recorded["generator"] = {"engine": "diffusers", "model": tiny_sd1_folder.name}  # what older versions wrote
    (out / "dataset.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert cli.main(["render", str(prompt_file), *settings]) == 0
    err = capsys.readouterr().err
    assert "selma render: notice:" in err and "records no generator." in err and "generator.sha256" in err
    assert json.loads((out / "dataset.json").read_text())["generator"] == fingerprint
    assert pending_indices(out, len(PROMPTS)) == ()


def test_other_settings_on_an_existing_dataset_are_refused_by_the_cli(prompt_file, tiny_sd1_folder, uninterrupted,
                                                                      capsys):
    before = sorted(path.stat().st_mtime_ns for path in uninterrupted.iterdir())
    exit_code = cli.main(["render", str(prompt_file), "--model", str(tiny_sd1_folder), "--out", str(uninterrupted),
                          "--steps", "3", "--batch-size", "2", "--seed", "7", "--quiet"])
    assert exit_code == 1
    assert "steps: the folder has 2, this run asks 3" in capsys.readouterr().err
    assert sorted(path.stat().st_mtime_ns for path in uninterrupted.iterdir()) == before


@pytest.mark.parametrize(("arguments", "message"), [
    (["--width", "100"], "width: 100 pixels; expected a positive multiple of 8"),
    (["--height", "-8"], "height: -8 pixels; expected a positive multiple of 8"),
    (["--steps", "0"], "steps: 0; expected a whole number of sampling steps"),
    (["--batch-size", "0"], "batch_size: 0; expected at least 1"),
])
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, prompt_file, tiny_sd1_folder, capsys, arguments,
                                                         message):
    out = tmp_path / "dataset"
    assert cli.main(["render", str(prompt_file), "--model", str(tiny_sd1_folder), "--out", str(out), *arguments]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_empty_prompt_set_and_pickles_are_refused_with_a_clear_error(tmp_path, prompt_file, capsys):
    out = tmp_path / "dataset"
    assert cli.main(["render", str(prompt_file), "--model", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "nope does not exist; expected a diffusers folder or a .safetensors checkpoint" in capsys.readouterr().err
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not unpickled")
    assert cli.main(["render", str(prompt_file), "--model", str(pickle), "--out", str(out)]) == 1
    assert "model.ckpt is not a .safetensors checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["render", str(empty), "--model", str(tmp_path), "--out", str(out)]) == 1
    assert "empty.jsonl: holds no prompts" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("device", "message"), [
    ("foo", "device: 'foo' is not a device torch knows; expected e.g. cpu, cuda, cuda:1 or mps"),
    ("cuda:99", "device: 'cuda:99' is not available on this machine ("),
])
def test_a_device_that_does_not_exist_is_refused_before_anything_is_written(tmp_path, prompt_file, tiny_sd1_folder,
                                                                            capsys, device, message):
    out = tmp_path / "dataset"
    assert cli.main(["render", str(prompt_file), "--model", str(tiny_sd1_folder), "--out", str(out), "--device",
                     device, "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_corrupt_checkpoint_or_a_pickle_named_safetensors_is_refused_before_anything_is_written(tmp_path,
                                                                                                 prompt_file, capsys):
    import torch

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    renamed_pickle = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, renamed_pickle)  # a .ckpt, renamed
    out = tmp_path / "dataset"
    for model, hint in ((corrupt, ""), (renamed_pickle, "it looks like a pickle (.ckpt) renamed .safetensors")):
        assert cli.main(["render", str(prompt_file), "--model", str(model), "--out", str(out), "--steps", "1",
                         "--width", "32", "--height", "32", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"model: {model} is not a readable .safetensors checkpoint" in err and hint in err
        assert "Traceback" not in err
        assert not out.exists()  # no stray dataset.json


def test_a_model_that_renders_nan_stops_with_an_error_naming_it_and_records_no_image(tmp_path, prompt_file,
                                                                                     tiny_sd1_checkpoint,
                                                                                     tiny_sd1_folder, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_sd1_checkpoint)
    weights["model.diffusion_model.out.2.bias"].fill_(float("nan"))  # a broken fine-tune
    broken = tmp_path / "broken.safetensors"
    save_file(weights, broken)
    out = tmp_path / "dataset"
    assert cli.main(["render", str(prompt_file), "--model", str(broken), "--model-config", str(tiny_sd1_folder),
                     "--out", str(out), "--steps", "1", "--width", "32", "--height", "32", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model 'broken.safetensors': rendered NaN or infinite pixels for prompts 0, 2, 3, 4" in err  # the short ones
    assert "Traceback" not in err
    assert pending_indices(out, len(PROMPTS)) == tuple(range(len(PROMPTS)))
    assert not list(out.glob("*.png"))


def test_render_help_lists_the_paper_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["render", "--help"])
    text = capsys.readouterr().out
    assert "(default: 50)" in text and "(default: 7.5)" in text and "--batch-size" in text
