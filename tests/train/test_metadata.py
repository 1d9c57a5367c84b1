"""A trained LoRA's metadata: the keys sd-scripts writes and A1111/Forge and model sites read, and nothing
that shows where the dataset and the base model sit on the training machine."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from lora_factories import attention_modules, random_lora
from safetensors import safe_open
from safetensors.torch import save
from train_helpers import CAPTIONS, one_torch_thread, tiny_config, write_dataset  # noqa: F401

from comfyui_selma.trainer.lora.file import write_lora
from comfyui_selma.trainer.train.loop import run_training

TAGGED_CAPTIONS = ("1girl, Red Hair, smiling", "1girl, blue hair", CAPTIONS[2], "a red cube, 1girl")


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def tensor_bytes_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's tensor data: every byte after the 8-byte length and the JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def additional_networks_legacy_hash(path: Path) -> str:
    """sd-webui-additional-networks' old hash, taken as sd-scripts takes it: of the file as written with only
    its ``ss_*`` metadata, the 64 KiB at offset 1 MiB, SHA-256, first 8 hex digits."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        training_keys = {key: value for key, value in handle.metadata().items() if key.startswith("ss_")}
    return hashlib.sha256(save(tensors, training_keys)[0x100000:0x110000]).hexdigest()[:8]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd1_folder) -> tuple[Path, Path, Path]:
    """A finished 3-step run (batch 2) on 4 captions with tags, one of them over 75 tokens: (LoRA, dataset, root)."""
    root = tmp_path_factory.mktemp("metadata-run")
    dataset = write_dataset(root / "skill images", captions=TAGGED_CAPTIONS)
    lora = run_training(tiny_config(tiny_sd1_folder, dataset, root / "cache", max_train_steps=3),
                        root / "run", echo=lambda line: None)
    return lora, dataset, root


def test_the_lora_carries_the_training_keys_sd_scripts_writes(trained):
    lora, _, _ = trained
    metadata = metadata_of(lora)
    assert metadata["ss_clip_skip"] == "None"  # each family's own layer, sd-scripts' "no clip skip"
    assert metadata["ss_max_token_length"] == "150"  # the long caption is trained as two 75-token pieces
    assert metadata["ss_num_epochs"] == str(math.ceil(3 * 2 / 4))
    assert metadata["ss_session_id"].isdigit() and int(metadata["ss_session_id"]) < 2**32
    assert json.loads(metadata["ss_tag_frequency"]) == {"skill images": {
        "1girl": 3, "red hair": 1, "smiling": 1, "blue hair": 1, "a red cube": 1, CAPTIONS[2].lower(): 1}}
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.resolution"] == "64x64"


def test_the_sshs_hashes_are_those_a1111_computes_from_the_file(trained, tmp_path):
    lora, _, _ = trained
    metadata = metadata_of(lora)
    assert metadata["sshs_model_hash"] == tensor_bytes_sha256(lora)
    assert metadata["sshs_legacy_hash"] == additional_networks_legacy_hash(lora)

    # The legacy hash reads bytes past 1 MiB: a LoRA that large (rank 32 over 40 SD 1.x attention layers).
    large = write_lora(random_lora("sd1", attention_modules("sd1", 40), rank=32, seed=3), tmp_path / "large.safetensors")
    assert large.stat().st_size > 0x110000
    large_metadata = metadata_of(large)
    assert large_metadata["sshs_model_hash"] == tensor_bytes_sha256(large)
    assert large_metadata["sshs_legacy_hash"] == additional_networks_legacy_hash(large)
    assert large_metadata["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    written_fp16 = write_lora(random_lora("sd1", attention_modules("sd1", 40), rank=32, seed=3),
                              tmp_path / "large-fp16.safetensors", dtype=torch.float16)
    assert metadata_of(written_fp16)["sshs_model_hash"] == tensor_bytes_sha256(written_fp16) != \
        large_metadata["sshs_model_hash"]


def test_no_metadata_value_names_where_the_dataset_or_the_model_is(trained, tiny_sd1_folder):
    lora, dataset, root = trained
    metadata = metadata_of(lora)
    assert metadata["selma.dataset"] == "skill images"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"skill images": {"n_repeats": 1, "img_count": 4}}
    for folder in (dataset, root, Path(tiny_sd1_folder), Path(tiny_sd1_folder).parent):
        leaked = {key: value for key, value in metadata.items() if str(folder.resolve()) in value or
                  str(folder) in value}
        assert not leaked, f"{folder} appears in {sorted(leaked)}"
