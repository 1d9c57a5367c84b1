"""SDXL's crop conditioning tells the UNet where its square lies in the image it sees. For a flipped image
that is the flipped image, so the crop's left edge is mirrored: left' = resized width - left - resolution
(as sd-scripts' ``train_util`` and diffusers' SDXL script give it), from the cache and without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import one_torch_thread  # noqa: F401

from comfyui_selma.trainer.train.data import LatentCache, TrainingItem, prepare_image

RESOLUTION = 64
WIDTH = 75  # 11 pixels wider than the crop: the centre crop starts at 5, its mirror at 6


@pytest.fixture
def wide_image(tmp_path):
    rows, columns = np.indices((RESOLUTION, WIDTH))
    pixels = np.stack([columns * 3 % 256, rows * 4 % 256, (rows + 2 * columns) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "000000.png"
    Image.fromarray(pixels).save(path)
    return path


def crop_of(image: Image.Image, top: int, left: int) -> torch.Tensor:
    """The square at (top, left) of ``image`` as training pixels ([3, H, W] in [-1, 1])."""
    array = np.asarray(image.crop((left, top, left + RESOLUTION, top + RESOLUTION)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.mark.parametrize("offset", [None, (0, 2)], ids=["centre", "random crop at left 2"])
def test_a_flipped_crop_reports_where_its_pixels_lie_in_the_flipped_image(wide_image, offset):
    pick = (lambda free_height, free_width: offset) if offset else None
    straight = prepare_image(wide_image, RESOLUTION, crop_offset=pick)
    flipped = prepare_image(wide_image, RESOLUTION, flip=True, crop_offset=pick)
    with Image.open(wide_image) as opened:
        image = opened.convert("RGB")
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = straight.crop_top_left
    assert flipped.crop_top_left == (top, WIDTH - left - RESOLUTION) != straight.crop_top_left
    torch.testing.assert_close(straight.pixels, crop_of(image, *straight.crop_top_left))
    torch.testing.assert_close(flipped.pixels, crop_of(mirrored, *flipped.crop_top_left))
    assert straight.original_size == flipped.original_size == (RESOLUTION, WIDTH)


def test_the_latent_cache_gives_each_flip_its_own_crop(wide_image, tmp_path, tiny_sdxl_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_folder / "vae")
    item = TrainingItem(wide_image, "a striped test image")
    cache = LatentCache(tmp_path / "cache", "model-key", RESOLUTION, flips=True)
    assert cache.build([item], vae, batch_size=1) == (1, 0)
    *_, original, crop = cache.load(item, flip=False)
    *_, flipped_original, flipped_crop = cache.load(item, flip=True)
    assert (original, crop) == ((RESOLUTION, WIDTH), (0, 5))
    assert (flipped_original, flipped_crop) == ((RESOLUTION, WIDTH), (0, 6))
    assert flipped_crop == prepare_image(wide_image, RESOLUTION, flip=True).crop_top_left
