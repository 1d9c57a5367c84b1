"""Merging files end to end: the written LoRA, bad input refused before writing, the CLI and the node."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_factories import attention_modules, random_lora, text_encoder_modules, write_expert, one_torch_thread  # noqa: F401 (fixture)
from safetensors import safe_open
from safetensors.torch import save_file
from unwritable import read_only_folder  # noqa: F401 (fixture)

from comfyui_selma.trainer.cli import main
from comfyui_selma.trainer.storage.locks import LockHeldError, exclusive_lock
from comfyui_selma.trainer.lora.file import kohya_state_dict, read_lora
from comfyui_selma.trainer.merge.run import MergeConfig, merge_files

SD1_LAYERS = attention_modules("sd1", 6) + text_encoder_modules("sd1", mlp=False)[:2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def experts(tmp_path: Path) -> list[Path]:
    """Three SD 1.x experts; the third lacks the last text-encoder layer."""
    paths = []
    for index, skill in enumerate(("counting", "spatial", "text")):
        layers = SD1_LAYERS[:-1] if index == 2 else SD1_LAYERS
        paths.append(write_expert(tmp_path / f"{skill}.safetensors",
                                  random_lora("sd1", layers, rank=4, seed=index, alpha=2, title=f"{skill} expert")))
    return paths


def test_merged_file_is_the_weighted_sum_with_merge_metadata(experts, tmp_path):
    output = tmp_path / "merged.safetensors"
    result = merge_files(experts, output, MergeConfig(method="linear", weights="0.5,0.3,0.2"))
    merged, sources = read_lora(output), [read_lora(path) for path in experts]
    for name, module in merged.modules.items():
        expected = sum(weight * source.modules[name].delta_weight()
                       for source, weight in zip(sources, (0.5, 0.3, 0.2), strict=True) if name in source.modules)
        torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-5, atol=1e-7)
    metadata = merged.metadata
    assert metadata["modelspec.merged_from"] == "counting expert, spatial expert, text expert"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "merged" and metadata["ss_network_dim"] == "12"
    assert metadata["selma.merge.method"] == "linear"
    assert json.loads(metadata["selma.merge.weights"]) == [0.5, 0.3, 0.2]
    assert result.lora.architecture.name == "sd1"


def test_a_module_missing_in_one_expert_is_merged_as_zero_and_listed(experts, tmp_path):
    result = merge_files(experts, tmp_path / "merged.safetensors", MergeConfig(method="svd", rank=4))
    missing_name = SD1_LAYERS[-1][0]
    assert result.missing == {missing_name: ["text expert"]}
    assert f"{missing_name}: missing in text expert" in result.summary()
    metadata = read_lora(result.path).metadata
    assert json.loads(metadata["selma.merge.missing_modules"]) == {missing_name: ["text expert"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean_ab", "linear", "svd", "ties", "dare"])
def test_every_method_writes_a_readable_lora_of_the_expected_rank(method, experts, tmp_path):
    result = merge_files(experts, tmp_path / f"{method}.safetensors", MergeConfig(method=method, rank=3, density=0.5))
    assert read_lora(result.path).ranks == {"mean_ab": [4], "linear": [8, 12], "svd": [3], "ties": [3],
                                             "dare": [3]}[method]


def _sdxl_expert(tmp_path: Path) -> Path:
    return write_expert(tmp_path / "sdxl-expert.safetensors", random_lora("sdxl", attention_modules("sdxl", 2), 4, 9))


def _damaged(tmp_path: Path, experts: list[Path], damage: str) -> tuple[list[Path], MergeConfig, str]:
    """Experts with one problem, the config to merge them with, and what the error must say."""
    if damage == "different architectures":
        return ([experts[0], _sdxl_expert(tmp_path)], MergeConfig(),
                r"sdxl-expert\.safetensors is a SDXL LoRA but .*counting\.safetensors is SD 1\.x")
    if damage == "different ranks for mean_ab":
        other = write_expert(tmp_path / "rank8.safetensors", random_lora("sd1", SD1_LAYERS, rank=8, seed=5))
        return ([experts[0], other], MergeConfig(method="mean_ab"),
                r"rank8\.safetensors: module '.*' has rank 8, .*rank 4; mean_ab")
    if damage == "weights that do not match the experts":
        return experts, MergeConfig(weights="0.5,0.5"), r"weights: '0\.5,0\.5' gives 2 weight\(s\) for 3 experts"
    if damage == "NaN":
        tensors = kohya_state_dict(read_lora(experts[1]))
        key = sorted(tensors)[1]
        tensors[key].view(-1)[3] = float("nan")
        save_file(tensors, experts[1])
        return experts, MergeConfig(), re.escape(f"{experts[1]}: key {key!r} holds 1 NaN/Inf")
    if damage == "truncated file":
        experts[2].write_bytes(experts[2].read_bytes()[:1000])
        return experts, MergeConfig(), re.escape(str(experts[2])) + ": not a .*safetensors file"
    if damage == "pickle":
        pickled = tmp_path / "old.ckpt"
        torch.save({"state_dict": {}}, pickled)
        return [experts[0], pickled], MergeConfig(), re.escape(str(pickled)) + ": a Python pickle"
    if damage == "output is an input":
        return experts, MergeConfig(), "is also expert"
    raise AssertionError(damage)


DAMAGES = ["different architectures", "different ranks for mean_ab", "weights that do not match the experts", "NaN",
           "truncated file", "pickle", "output is an input"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_bad_input_is_an_error_naming_file_and_key_and_nothing_is_written(damage, experts, tmp_path):
    paths, config, message = _damaged(tmp_path, experts, damage)
    output = paths[0] if damage == "output is an input" else tmp_path / "merged.safetensors"
    before = output.read_bytes() if output.exists() else None
    with pytest.raises(ValueError, match=message):
        merge_files(paths, output, config)
    assert (output.read_bytes() if output.exists() else None) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_merges_and_lora_info_describes_the_result(experts, tmp_path, capsys):
    output = tmp_path / "cli-merged.safetensors"
    assert main(["merge", *map(str, experts), "--method", "svd", "--weights", "0.5,0.25,0.25", "--rank", "4",
                 "--out", str(output)]) == 0
    assert "merged 3 experts (svd, weights 0.5, 0.25, 0.25)" in capsys.readouterr().out
    assert main(["lora", "info", str(output)]) == 0
    printed = capsys.readouterr().out
    with safe_open(output, framework="pt") as handle:
        key_count = len(list(handle.keys()))
    assert "architecture: sd1 (SD 1.x)" in printed and "layout:       kohya" in printed
    assert "rank:         4" in printed and "alpha:        4" in printed and f"keys:         {key_count}" in printed
    assert "modelspec.merged_from: counting expert, spatial expert, text expert" in printed
    assert main(["lora", "info", "--json", str(output)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["architecture"] == "sd1" and described["keys"] == key_count
    assert described["metadata"]["selma.merge.method"] == "svd"


@pytest.mark.parametrize("flags", [["--method", "linear"], ["--method", "ties", "--rank", "3"],
                                   ["--method", "dare", "--seed", "3"]])
@pytest.mark.slow
def test_the_same_merge_twice_gives_the_same_bytes(experts, tmp_path, flags, capsys):
    written = []
    for run in ("first", "second"):
        output = tmp_path / run / "merged.safetensors"
        assert main(["merge", *map(str, experts), *flags, "--out", str(output)]) == 0
        written.append(output.read_bytes())
    assert written[0] == written[1]
    if "dare" in flags:  # the seed is what reproduces the drop masks: another seed, another file
        other = tmp_path / "other" / "merged.safetensors"
        assert main(["merge", *map(str, experts), "--method", "dare", "--seed", "4", "--out", str(other)]) == 0
        assert other.read_bytes() != written[0]


KILLED_ONCE_WRITTEN = """
import os, signal, sys
os.replace = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)  # the whole file written, not renamed
from comfyui_selma.trainer.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_merge_leaves_a_temporary_that_the_next_merge_removes(experts, tmp_path):
    output = tmp_path / "out" / "merged.safetensors"
    command = ["merge", *map(str, experts), "--out", str(output)]
    killed = subprocess.run([sys.executable, "-c", KILLED_ONCE_WRITTEN, *command])
    assert killed.returncode == -signal.SIGKILL
    left = [path for path in output.parent.iterdir() if path.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].stat().st_size > 10_000, "a temporary as large as the merged LoRA"
    assert main(command) == 0
    assert [path.name for path in output.parent.iterdir()] == ["merged.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask 022", "umask 077"])
def test_a_merged_lora_gets_the_mode_the_users_umask_gives(experts, tmp_path, umask, mode):
    output = tmp_path / "merged.safetensors"
    subprocess.run([str(Path(sys.executable).parent / "selma"), "merge", *map(str, experts), "--out", str(output)],
                   umask=umask, check=True, capture_output=True)
    assert stat.S_IMODE(output.stat().st_mode) == mode


UNWRITABLE_OUTPUTS = {
    "a folder": (lambda tmp_path, read_only: tmp_path / "loras",
                 r"output: .*/loras is a folder; expected the path of a file to write"),
    "in a read-only folder": (lambda tmp_path, read_only: read_only / "merged.safetensors",
                              r"output: cannot write in .*/read-only \(.*\); expected a folder you can write to"),
    "under a file": (lambda tmp_path, read_only: tmp_path / "counting.safetensors" / "merged.safetensors",
                     r"output: .*/counting.safetensors is a file, so .*/merged.safetensors cannot be written in it"),
}


@pytest.mark.parametrize("case", list(UNWRITABLE_OUTPUTS))
def test_an_output_that_cannot_be_written_is_refused_before_any_expert_is_read(case, experts, tmp_path, capsys,
                                                                               read_only_folder):
    output_of, message = UNWRITABLE_OUTPUTS[case]
    (tmp_path / "loras").mkdir()
    output = output_of(tmp_path, read_only_folder)
    not_a_lora = tmp_path / "notes.safetensors"
    not_a_lora.write_text("an expert that would be refused when read")
    code = main(["merge", *map(str, experts), str(not_a_lora), "--out", str(output)])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert re.search(message, error), error
    assert "notes.safetensors" not in error, "the output is checked before any expert is read"
    assert not output.is_file()


def test_a_merge_into_an_output_another_writer_holds_is_refused_naming_it_and_runs_once_it_is_free(experts, tmp_path,
                                                                                                    capsys):
    output = tmp_path / "merged.safetensors"
    command = ["merge", *map(str, experts), "--out", str(output)]
    with exclusive_lock(output):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert f"merged.safetensors: in use by process {os.getpid()}" in error and "Traceback" not in error
        assert not output.exists()
    assert main(command) == 0
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("merged")) == ["merged.safetensors"]


def test_cli_error_exits_nonzero_and_writes_nothing(experts, tmp_path, capsys):
    output = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, experts), "--weights", "1,2", "--out", str(output)]) == 2
    assert "gives 2 weight(s) for 3 experts" in capsys.readouterr().err
    assert not output.exists()
    assert main(["lora", "info", str(tmp_path / "absent.safetensors")]) == 2


# --- the node, with ComfyUI stand-ins ---------------------------------------------------------------------------


def _node():
    from comfyui_selma.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS["SelmaMergeLoraExperts"]()


@pytest.fixture
def experts_in_comfyui(comfy, experts) -> list[Path]:
    """The experts copied into models/loras: the only folder the node reads LoRAs from."""
    loras = comfy.models_dir("loras")
    for path in experts:
        (loras / path.name).write_bytes(path.read_bytes())
    return [loras / path.name for path in experts]


def test_node_saves_the_merge_into_models_loras(comfy, experts_in_comfyui):
    experts = experts_in_comfyui
    loras = comfy.models_dir("loras")
    model, clip, name, path = _node().merge(method="linear", weights="", rank=0, output_name="multi-skill",
                                            lora_1=experts[0].name, lora_2=experts[1].name,
                                            expert_3=str(experts[2]), lora_4="None", unique_id="7")
    assert (model, clip) == (None, None)
    assert name == "multi-skill.safetensors" and Path(path) == loras / name
    merged = read_lora(path)
    assert merged.metadata["modelspec.merged_from"] == "counting expert, spatial expert, text expert"
    assert comfy.progress[-1] == (len(merged.modules), len(merged.modules))
    assert comfy.events[-1] == ("selma.merge", {
        "node": "7", "method": "linear", "sources": [expert.name for expert in experts[:3]],
        "weights": [pytest.approx(1 / 3)] * 3, "rank": max(merged.ranks), "output": "multi-skill.safetensors",
        "missing_modules": 1})


def test_node_refuses_an_output_another_writer_holds(comfy, experts_in_comfyui):
    experts = experts_in_comfyui
    target = comfy.models_dir("loras") / "multi-skill.safetensors"
    with exclusive_lock(target), pytest.raises(LockHeldError, match=f"in use by process {os.getpid()}"):
        _node().merge(method="linear", weights="", rank=0, output_name="multi-skill", expert_1=str(experts[0]),
                      expert_2=str(experts[1]))
    assert not target.exists()


def test_node_cancel_writes_nothing(comfy, experts_in_comfyui):
    experts = experts_in_comfyui
    from comfy_standins import InterruptProcessingException

    comfy.cancel_after_updates = 2
    with pytest.raises(InterruptProcessingException):
        _node().merge(method="svd", weights="", rank=2, output_name="cancelled", expert_1=str(experts[0]),
                      expert_2=str(experts[1]))
    assert not (comfy.models_dir("loras") / "cancelled.safetensors").exists()


def test_node_explains_every_input_and_refuses_a_path_as_output_name(comfy, experts_in_comfyui):
    experts = experts_in_comfyui
    node_class = type(_node())
    inputs = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for input_name, (_, options) in inputs[section].items():
            assert options.get("tooltip"), input_name
    assert node_class.CATEGORY == "SELMA/4 merge" and len(node_class.OUTPUT_TOOLTIPS) == len(node_class.RETURN_TYPES)
    with pytest.raises(ValueError, match="output_name: '../escape' is not a plain name"):
        _node().merge(method="linear", weights="", rank=0, output_name="../escape", expert_1=str(experts[0]))


def test_source_date_epoch_dates_the_merge_so_another_day_gives_the_same_bytes(experts, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # 2023-11-14 UTC
    output = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, experts), "--out", str(output)]) == 0
    assert read_lora(output).metadata["modelspec.date"] == "2023-11-14"


def test_a_malformed_source_date_epoch_is_refused_before_the_merge_starts(experts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    output = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, experts), "--out", str(output)]) == 2
    assert "SOURCE_DATE_EPOCH" in capsys.readouterr().err and not output.exists()
