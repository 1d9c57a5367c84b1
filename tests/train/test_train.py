"""The LoRA trainer, run through its real entry points on tiny models at 64 px for a few steps.

Like diffusers' ``test_text_to_image_lora.py``: what a user relies on is asserted on the files a
user gets — the LoRA's keys, shapes, alphas and metadata, the checkpoints, ``log.jsonl``, that the
file loads in diffusers and changes its images, that a run killed in the middle and started again
ends with the same LoRA as a run left alone, that two processes train the LoRA of one process with
twice the gradient accumulation.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from ldm_checkpoint import unet_to_ldm
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import CAPTIONS, SKILL, events_of, one_torch_thread, tiny_config, write_dataset  # noqa: F401

from comfyui_selma.trainer import cli
from comfyui_selma.trainer.families.hashing import model_sha256
from comfyui_selma.trainer.train.loop import TrainError, diffusion_target, run_training, train
from comfyui_selma.trainer.train.config import CONFIG_FILE, TrainConfig, config_fields, read_config
from comfyui_selma.trainer.train.data import StepPlan
from comfyui_selma.trainer.train.launch import (
    LOG_FILE,
    TrainerProcess,
    absolute_paths,
    checkpoints,
    launch_command,
    prepare_run_folder,
)


@dataclass
class Run:
    config: TrainConfig
    folder: Path
    lora: Path
    events: list[dict]


def quiet() -> tuple[list[str], callable]:
    lines: list[str] = []
    return lines, lines.append


@pytest.fixture(scope="module")
def training_root(tmp_path_factory) -> Path:
    """The folder of this module's finished runs: one dataset and one cache folder that they all share."""
    root = tmp_path_factory.mktemp("train-runs")
    write_dataset(root / "dataset")
    return root


def finished_run(root: Path, name: str, model: Path, **changes) -> Run:
    lines, echo = quiet()
    config = tiny_config(model, root / "dataset", root / "cache", **changes)
    lora = run_training(config, root / name, echo=echo)
    return Run(config, root / name, lora, events_of(lines))


# One fixture per configuration, so a configuration that breaks errors only its own tests.
@pytest.fixture(scope="module")
def sd1_run(training_root, tiny_sd1_folder) -> Run:
    """SD 1.x: attention, 4 steps of micro-batch 1 x accumulation 2, a save point at 2."""
    return finished_run(training_root, "sd1", tiny_sd1_folder, max_train_steps=4, save_every_n_steps=2,
                        train_batch_size=1, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def sdxl_run(training_root, tiny_sdxl_folder) -> Run:
    """SDXL: attention + 3x3 convolutions + both text encoders."""
    return finished_run(training_root, "sdxl", tiny_sdxl_folder, conv_dim=2, conv_alpha=1.0, train_text_encoder=True)


@pytest.fixture(scope="module")
def sd1_again_run(sd1_run, training_root, tiny_sd1_folder) -> Run:
    """SD 1.x again into another folder, after ``sd1_run``: it reads the caches that run filled."""
    return finished_run(training_root, "sd1-again", tiny_sd1_folder, max_train_steps=1, seed=7)


@pytest.fixture(params=["sd1", "sdxl"])
def sd1_or_sdxl_run(request: pytest.FixtureRequest) -> Run:
    """The SD 1.x run, then the SDXL run: a test over both architectures, each half needing only its own run."""
    return request.getfixturevalue(f"{request.param}_run")


def lora_modules(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as stored:
        metadata = stored.metadata()
        for key in stored.keys():
            module, _, part = key.partition(".")
            modules.setdefault(module, {})[part] = stored.get_tensor(key)
    return modules, metadata


def expected_modules(run: Run, tiny_sdxl: bool) -> dict[str, tuple[tuple[int, ...], float]]:
    """kohya module name → (layer weight shape, alpha), derived from the model itself and, for SDXL, from the
    test suite's own diffusers→LDM renaming (an implementation independent of the trainer's)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_folder = Path(run.config.pretrained_model_name_or_path)
    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    conv_targets = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv") if run.config.conv_dim else ()
    chosen = {name: module.weight.shape for name, module in unet.named_modules()
              if name.endswith(targets + conv_targets)}
    # The LDM name of each UNet weight, from the whole state dict (block numbering depends on the neighbours).
    ldm_names = {diffusers_key: ldm_key for ldm_key, diffusers_key in
                 unet_to_ldm({key: key for key in unet.state_dict()}, unet.config.layers_per_block).items()}
    expected = {}
    for name, shape in chosen.items():
        is_conv = len(shape) == 4 and shape[2:] != (1, 1)
        alpha = run.config.effective_conv_alpha() if is_conv else run.config.network_alpha
        if tiny_sdxl:
            ldm_key = ldm_names[name + ".weight"]
            module_path = ldm_key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            kohya = "lora_unet_" + module_path.replace(".", "_")
        else:
            kohya = "lora_unet_" + name.replace(".", "_")
        expected[kohya] = (tuple(shape), alpha)
    if run.config.train_text_encoder:
        prefixes = ("lora_te1_", "lora_te2_") if tiny_sdxl else ("lora_te_",)
        for prefix, folder, model_class in zip(prefixes, ("text_encoder", "text_encoder_2"),
                                               (CLIPTextModel, CLIPTextModelWithProjection)):
            encoder = model_class.from_pretrained(model_folder / folder)
            # SDXL conditions on CLIP-L's penultimate layer: its last layer cannot matter, so it gets no LoRA.
            unused = f"layers.{encoder.config.num_hidden_layers - 1}." if prefix == "lora_te1_" else None
            for name, module in encoder.named_modules():
                if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) and not (unused and unused in name):
                    path = name if name.startswith("text_model.") else "text_model." + name  # transformers 5
                    expected[prefix + path.replace(".", "_")] = (tuple(module.weight.shape), run.config.network_alpha)
    return expected


@pytest.mark.slow
def test_every_key_is_a_kohya_lora_key_with_the_right_shape_and_alpha(sd1_or_sdxl_run):
    run, name = sd1_or_sdxl_run, sd1_or_sdxl_run.folder.name
    modules, _ = lora_modules(run.lora)
    expected = expected_modules(run, tiny_sdxl=name == "sdxl")
    assert set(modules) == set(expected)
    rank = run.config.network_dim
    for module, parts in modules.items():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}, module
        (out_features, in_features, *kernel), alpha = expected[module]
        module_rank = run.config.conv_dim if kernel and kernel != [1, 1] else rank
        assert tuple(parts["lora_down.weight"].shape) == (module_rank, in_features, *kernel), module
        assert tuple(parts["lora_up.weight"].shape) == (out_features, module_rank, *([1, 1] if kernel else [])), module
        assert parts["alpha"].item() == alpha, module
        assert parts["lora_up.weight"].abs().sum() > 0, f"{module} was never trained"
    if name == "sdxl":
        assert any(key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2") for key in modules)


def test_the_lora_metadata_names_architecture_rank_alpha_steps_dataset_base_model_and_skill(sd1_run):
    sd1 = sd1_run
    _, metadata = lora_modules(sd1.lora)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == \
        ("networks.lora", "4", "2")
    assert (metadata["ss_steps"], metadata["ss_total_batch_size"], metadata["ss_num_train_images"]) == ("4", "2", "4")
    assert metadata["ss_sd_model_name"] == Path(sd1.config.pretrained_model_name_or_path).name
    assert metadata["ss_new_sd_model_hash"] == model_sha256(sd1.config.pretrained_model_name_or_path)
    assert metadata["selma.skill"] == SKILL and SKILL in metadata["modelspec.description"]
    assert metadata["selma.dataset"] == Path(sd1.config.train_data_dir).name
    assert json.loads(metadata["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 4}}
    assert metadata["ss_mixed_precision"] == "bf16"  # fp16 asked, on a CPU: bf16, and the log says why
    assert any(event["event"] == "notice" and "bf16" in event["message"] for event in sd1.events)


def test_the_sdxl_lora_metadata_names_its_architecture_conv_layers_and_text_encoders(sdxl_run):
    _, xl_metadata = lora_modules(sdxl_run.lora)
    assert xl_metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(xl_metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert xl_metadata["ss_network_train_unet_only"] == "False"


def peft_layers(module) -> int:
    return sum(1 for _, layer in module.named_modules() if hasattr(layer, "lora_A") and len(layer.lora_A))


@pytest.mark.slow
def test_the_saved_lora_loads_in_diffusers_every_module_applied_and_changes_its_output(sd1_or_sdxl_run):
    from comfyui_selma.trainer.families.loading import load_pipeline

    run, name = sd1_or_sdxl_run, sd1_or_sdxl_run.folder.name
    modules, _ = lora_modules(run.lora)
    pipeline = load_pipeline(run.config.pretrained_model_name_or_path)
    pipeline.set_progress_bar_config(disable=True)

    def image() -> torch.Tensor:
        return pipeline("a red cube on a wooden table", num_inference_steps=2, height=64, width=64,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = image()
    pipeline.load_lora_weights(str(run.lora))
    assert peft_layers(pipeline.unet) == sum(key.startswith("lora_unet_") for key in modules)
    if name == "sdxl":
        assert peft_layers(pipeline.text_encoder) == sum(key.startswith("lora_te1_") for key in modules) > 0
        assert peft_layers(pipeline.text_encoder_2) == sum(key.startswith("lora_te2_") for key in modules) > 0
    after = image()
    assert (after - before).abs().max() > 1e-4


def test_checkpoints_log_and_a_lora_at_every_save_point(sd1_run):
    run = sd1_run
    assert [step for step, _ in checkpoints(run.folder)] == [2, 4]
    for _, checkpoint in checkpoints(run.folder):
        assert (checkpoint / "lora_parameters.safetensors").is_file()
        assert (checkpoint / "optimizer.bin").is_file()
        assert not list(checkpoint.glob("model*.safetensors")), "the frozen UNet must not be saved"
    assert (run.folder / "selma-expert-step00000002.safetensors").is_file() and run.lora.is_file()
    records = [json.loads(line) for line in (run.folder / LOG_FILE).read_text().splitlines()]
    steps = [record for record in records if record["event"] == "step"]
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    assert all(record["loss"] > 0 and record["lr"] == 3e-4 and record["images_per_s"] > 0 for record in steps)
    assert records[-1]["event"] == "done" and records[-1]["lora"] == str(run.lora)
    assert read_config(run.folder / CONFIG_FILE) == absolute_paths(run.config)


def cache_ready(run: Run) -> dict[str, tuple[int, int]]:
    return {event["kind"]: (event["encoded"], event["reused"]) for event in run.events
            if event["event"] == "cache_ready"}


def model_cache_files(run: Run) -> list[Path]:
    """Every file in the cache folder of the run's base model (the parent of its latent and text caches)."""
    folders = {Path(event["folder"]).parent for event in run.events if event["event"] == "cache_ready"}
    assert len(folders) == 1, folders
    return list(folders.pop().rglob("*.safetensors"))


def test_caches_are_reused_by_a_run_on_the_same_data_and_model(sd1_run, sd1_again_run):
    assert cache_ready(sd1_run) == {"latents": (4, 0), "text": (4, 0)}
    assert cache_ready(sd1_again_run) == {"latents": (0, 4), "text": (0, 4)}
    cached = model_cache_files(sd1_run)
    assert len(cached) == 4 + 4  # SD 1.x latents and captions
    with safe_open(str(next(path for path in cached if "latents" in str(path))), framework="pt") as stored:
        assert {"mean", "std", "mean_flipped", "std_flipped"} <= set(stored.keys())


def test_a_text_encoder_lora_caches_the_latents_but_not_the_captions(sdxl_run):
    assert cache_ready(sdxl_run) == {"latents": (4, 0)}  # text-encoder LoRA: captions are encoded every step
    assert len(model_cache_files(sdxl_run)) == 4  # SDXL latents


def test_loss_falls_on_a_fixed_batch(tmp_path, tiny_sd1_folder):
    """One image, no flip: every step sees the same batch. Measured with fixed noise and timesteps before and
    after, through diffusers with the saved LoRA loaded, so the file holds what was learned."""
    from diffusers import DDPMScheduler

    from comfyui_selma.trainer.text.encoding import CaptionEncoder
    from comfyui_selma.trainer.families.loading import load_pipeline
    from comfyui_selma.trainer.train.data import prepare_image

    dataset = write_dataset(tmp_path / "one", captions=CAPTIONS[:1])
    config = tiny_config(tiny_sd1_folder, dataset, tmp_path / "cache", flip_aug=False, learning_rate=3e-2,
                         network_dim=8, network_alpha=8.0, train_batch_size=2, max_train_steps=6)
    lora = run_training(config, tmp_path / "run", echo=lambda line: None)
    pipeline = load_pipeline(tiny_sd1_folder)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    with torch.no_grad():
        pixels = prepare_image(dataset / "000000.png", 64).pixels[None].repeat(8, 1, 1, 1)
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        hidden = CaptionEncoder("sd1", [pipeline.tokenizer], [pipeline.text_encoder]).encode([CAPTIONS[0]])[0].hidden
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.linspace(50, 950, 8).long()

    def fixed_batch_loss() -> float:
        with torch.no_grad():
            prediction = pipeline.unet(scheduler.add_noise(latents, noise, timesteps), timesteps,
                                       hidden[None].repeat(8, 1, 1)).sample
        return torch.nn.functional.mse_loss(prediction, noise).item()

    before = fixed_batch_loss()
    pipeline.load_lora_weights(str(lora))
    after = fixed_batch_loss()
    assert after < 0.9 * before, (before, after)


def test_the_other_options_train_random_crop_without_latent_cache_min_snr_offset_noise_checkpointing(tmp_path,
                                                                                                    tiny_sd1_folder):
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:3], size=80)  # larger than 64: crops differ
    lines, echo = quiet()
    lora = run_training(tiny_config(tiny_sd1_folder, dataset, tmp_path / "cache", random_crop=True,
                                    cache_latents=False, min_snr_gamma=5.0, noise_offset=0.05,
                                    gradient_checkpointing=True, caption_encoding="sentences", lr_scheduler="cosine",
                                    lr_warmup_steps=1, max_grad_norm=0.0, max_train_steps=2),
                        tmp_path / "run", echo=echo)
    events = events_of(lines)
    assert [event["kind"] for event in events if event["event"] == "cache_ready"] == ["text"]  # latents: every step
    steps = [event for event in events if event["event"] == "step"]
    assert len(steps) == 2 and all(event["loss"] > 0 for event in steps)
    _, metadata = lora_modules(lora)
    assert (metadata["ss_random_crop"], metadata["ss_min_snr_gamma"], metadata["ss_noise_offset"]) == \
        ("True", "5.0", "0.05")
    assert metadata["ss_gradient_checkpointing"] == "True" and metadata["selma.caption_encoding"] == "sentences"


def test_v_prediction_models_learn_the_velocity_and_say_so(tmp_path, tiny_sd1_folder):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise, timesteps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, timesteps),
                               scheduler.get_velocity(latents, noise, timesteps))
    assert diffusion_target(DDPMScheduler(), latents, noise, timesteps) is noise

    model = shutil.copytree(tiny_sd1_folder, tmp_path / "tiny-v")
    scheduler_config = model / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()),
                                            "prediction_type": "v_prediction"}))
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:2])
    lora = run_training(tiny_config(model, dataset, tmp_path / "cache", architecture="sd2", max_train_steps=1),
                        tmp_path / "run", echo=lambda line: None)
    _, metadata = lora_modules(lora)
    assert metadata["selma.prediction_type"] == "v_prediction" and metadata["ss_v_parameterization"] == "True"
    assert metadata["ss_v2"] == "True" and metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_resume_after_a_kill_at_a_random_step_gives_the_same_lora(sd1_run, tmp_path):
    """The trainer runs as the node starts it (accelerate launch, own process group) and is SIGKILLed after a
    random step; started again, it resumes from its newest checkpoint and ends with the LoRA of the run that
    was left alone (``sd1_run``: same settings, 4 steps, a checkpoint every 2)."""
    uninterrupted = sd1_run
    config = absolute_paths(uninterrupted.config)
    kill_at = random.randint(1, 3)
    run_dir = tmp_path / "killed"
    process = TrainerProcess(launch_command(prepare_run_folder(config, run_dir)))
    try:
        for event in process.events():
            if event is not None and event["event"] == "step" and event["step"] == kill_at:
                os.killpg(process.process.pid, signal.SIGKILL)  # no goodbye: as a crash or a pulled plug
                break
        else:
            pytest.fail(f"the trainer ended before step {kill_at}:\n{process.tail_text()}")
    finally:
        process.stop()
    assert not (run_dir / "selma-expert.safetensors").exists()
    resumed_from = max((step for step, _ in checkpoints(run_dir)), default=0)
    assert resumed_from <= kill_at

    lines, echo = quiet()
    resumed = train(config, run_dir, echo=echo)
    assert [event["step"] for event in events_of(lines) if event["event"] == "resume"] == \
        ([resumed_from] if resumed_from else [])
    reference, reference_metadata = lora_modules(uninterrupted.lora)
    again, again_metadata = lora_modules(resumed)
    assert set(reference) == set(again)
    for module, parts in reference.items():
        for part, tensor in parts.items():
            assert torch.equal(tensor, again[module][part]), f"{module}.{part} differs (killed at step {kill_at})"
    timing = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date")
    assert {key: value for key, value in reference_metadata.items() if key not in timing} == \
        {key: value for key, value in again_metadata.items() if key not in timing}
    logged = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [record["step"] for record in logged if record["event"] == "step"] == [1, 2, 3, 4]


def test_micro_batches_are_drawn_by_their_place_in_the_global_batch_whatever_the_process_count():
    one_process = StepPlan(seed=42, dataset_size=10, micro_batch=2, accumulation=4)
    two_processes = StepPlan(seed=42, dataset_size=10, micro_batch=2, accumulation=2, processes=2)
    for step in range(3):
        for accumulation_index in range(2):
            for process_index in range(2):
                place = accumulation_index * 2 + process_index
                assert two_processes.indices(step, accumulation_index, process_index) == \
                    one_process.indices(step, place)
                assert torch.equal(torch.rand(8, generator=two_processes.generator(step, accumulation_index,
                                                                                  process_index)),
                                   torch.rand(8, generator=one_process.generator(step, place)))
    # One process draws what it drew before micro-batches were numbered this way: older runs resume identically.
    assert [StepPlan(42, 4, 1, 2).generator(step, index).initial_seed() for step in (0, 3) for index in (0, 1)] == \
        [5756857390519850928, 6489265344656823436, 420549389494747300, 6230966367235356251]


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]


def run_folder_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def test_two_processes_train_the_lora_of_one_process_with_twice_the_accumulation_and_only_the_main_one_writes(
        sd1_run, tmp_path):
    """``accelerate launch --num_processes 2`` on the CPU (gloo), started as the Train node starts it. Micro-batch 1
    on each of two processes is the global batch of ``sd1_run`` (one process, micro-batch 1 x accumulation 2): the
    same losses, the same LoRA at every save point, and a run folder holding just what that run's holds."""
    single = sd1_run
    config = replace(absolute_paths(single.config), gradient_accumulation_steps=1, num_processes=2)
    run_dir = tmp_path / "two-processes"
    process = TrainerProcess(launch_command(prepare_run_folder(config, run_dir), num_processes=2))
    deadline = time.monotonic() + 300
    try:
        events = []
        for event in process.events():
            if event is not None:
                events.append(event)
            if time.monotonic() > deadline:
                pytest.fail(f"two processes took over 300 s:\n{process.tail_text()}")
    finally:
        process.stop()
    assert process.returncode == 0, process.tail_text()
    assert [event["processes"] for event in events if event["event"] == "start"] == [2]

    logged = log_records(run_dir)
    assert logged == events  # each event once: the second process neither prints nor logs
    steps = [record for record in logged if record["event"] == "step"]
    single_steps = [record for record in log_records(single.folder) if record["event"] == "step"]
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    assert [record["loss"] for record in steps] == pytest.approx([record["loss"] for record in single_steps],
                                                                 rel=1e-4)
    assert [record["lr"] for record in steps] == [record["lr"] for record in single_steps]
    assert run_folder_files(run_dir) == run_folder_files(single.folder)  # one set of checkpoints, nothing more

    for name in ("selma-expert-step00000002.safetensors", single.lora.name):
        reference, _ = lora_modules(single.folder / name)
        two, _ = lora_modules(run_dir / name)
        assert set(reference) == set(two)
        for module, parts in reference.items():
            for part, tensor in parts.items():
                torch.testing.assert_close(two[module][part], tensor, rtol=1e-5, atol=1e-7, msg=f"{name}: {module}")
    _, metadata = lora_modules(run_dir / single.lora.name)
    assert (metadata["ss_num_processes"], metadata["ss_total_batch_size"]) == ("2", "2")


# Should a refusal ever fail to happen, the run that follows stays short.
CHEAP = ["--resolution", "64", "--max-train-steps", "1", "--train-batch-size", "1",
         "--gradient-accumulation-steps", "1"]
BAD_INPUTS = {
    "an empty dataset": ("dataset", lambda folder: [path.unlink() for path in folder.iterdir()],
                         "the dataset is empty"),
    "an image without a caption": ("dataset", lambda folder: (folder / "000001.txt").unlink(),
                                   "1 image(s) without a caption file: 000001.png"),
    "a caption without an image": ("dataset", lambda folder: (folder / "000002.png").unlink(),
                                   "1 caption file(s) without an image: 000002.txt"),
    "a corrupt image": ("dataset", lambda folder: (folder / "000003.png").write_bytes(
        (folder / "000003.png").read_bytes()[:-40]), "1 image(s) cannot be decoded: 000003.png"),
    "a model that is no Stable Diffusion checkpoint": (
        "model", lambda path: save_file({"transformer.blocks.0.weight": torch.zeros(2)}, str(path)),
        "not a Stable Diffusion checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_clear_error_before_training(tmp_path, case, capsys, tiny_sd1_folder):
    kind, damage, message = BAD_INPUTS[case]
    dataset = write_dataset(tmp_path / "dataset")
    model = tmp_path / "model.safetensors" if kind == "model" else tiny_sd1_folder
    damage(dataset if kind == "dataset" else model)
    code = cli.main(["train", "--dataset", str(dataset), "--model", str(model), "--out", str(tmp_path / "run"),
                     "--cache-dir", str(tmp_path / "cache"), *CHEAP])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flags, message", [
    (["--network-dim", "0"], "network_dim: 0 (the LoRA rank); expected a whole number >= 1"),
    (["--output-name", "../escape"], "output_name: '../escape' is not a plain name"),
    (["--output-name", "loras/mine"], "output_name: 'loras/mine' is not a plain name"),
    (["--resolution", "100"], "resolution: 100 pixels; expected a multiple of 8"),
    (["--optimizer-type", "AdamW8bit"], "optimizer_type: AdamW8bit needs the bitsandbytes package"),
])
def test_bad_settings_are_refused_naming_the_setting(tmp_path, tiny_sd1_folder, capsys, flags, message):
    if "AdamW8bit" in flags and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: 8-bit AdamW is available")
    dataset = write_dataset(tmp_path / "dataset")
    code = cli.main(["train", "--dataset", str(dataset), "--model", str(tiny_sd1_folder), "--out",
                     str(tmp_path / "run"), *CHEAP, *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_on_save_stops_clearly_and_keeps_the_checkpoints_already_written(tmp_path, tiny_sd1_folder,
                                                                                  monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save

    def disk_full_at_step_2(tensors, metadata=None):  # the LoRA file of step 2 is serialized, then cannot be written
        if (metadata or {}).get("ss_steps") == "2":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save", disk_full_at_step_2)
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:2])
    config = tiny_config(tiny_sd1_folder, dataset, tmp_path / "cache", max_train_steps=3, save_every_n_steps=1,
                         train_batch_size=1)
    with pytest.raises(TrainError) as raised:
        run_training(config, tmp_path / "run", echo=lambda line: None)
    assert "step 2: could not save" in str(raised.value) and "No space left on device" in str(raised.value)
    assert "kept: checkpoint-1" in str(raised.value)
    assert [step for step, _ in checkpoints(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / "selma-expert-step00000001.safetensors").is_file()
    assert not [path for path in (tmp_path / "run").rglob("*") if path.name.startswith(".")], "temporary files left"


def test_selma_train_on_a_checkpoint_file_writes_every_setting_and_the_same_command_returns_or_continues_the_run(
        tmp_path, tiny_sd1_checkpoint, tiny_sd1_folder, capsys):
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:2])
    run_dir = tmp_path / "run"
    command = ["train", "--dataset", str(dataset), "--model", str(tiny_sd1_checkpoint), "--out", str(run_dir),
               "--model-config-dir", str(tiny_sd1_folder),  # a tiny model's shapes; real ones need no config
               "--resolution", "64", "--network-dim", "4", "--train-batch-size", "2",
               "--gradient-accumulation-steps", "1", "--max-train-steps", "1", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(command) == 0
    text = (run_dir / CONFIG_FILE).read_text()
    assert all(f"\n{name} = " in text for name in config_fields())
    config = read_config(run_dir / CONFIG_FILE)
    assert (config.network_dim, config.network_alpha, config.learning_rate, config.seed) == (4, 128.0, 3e-4, 42)
    assert config.train_data_dir == os.path.abspath(dataset)

    assert cli.main(command) == 0  # finished: returned as it is
    assert cli.main(["train", "--config", str(run_dir / CONFIG_FILE), "--max-train-steps", "2"]) == 0  # continued
    records = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [record["event"] for record in records if record["event"] in ("start", "resume", "done")] == \
        ["start", "done", "done", "start", "resume", "done"]
    assert [record["step"] for record in records if record["event"] == "step"] == [1, 2]
    _, metadata = lora_modules(run_dir / "selma-expert.safetensors")
    assert metadata["ss_sd_model_name"] == tiny_sd1_checkpoint.name and metadata["ss_steps"] == "2"
    capsys.readouterr()

    assert cli.main(command[:-2] + ["--network-dim", "8"]) == 2
    assert "holds a run with other settings (network_dim: 4 -> 8" in capsys.readouterr().err
