"""Long captions are encoded the way ComfyUI encodes prompts: 77-token pieces, concatenated.

The reference below is written from ComfyUI's ``SDTokenizer.tokenize_with_weights`` (a plain
caption is one weighted segment: its tokens are cut every 75, each piece gets the start and end
token and is padded to 77) and ``ClipTokenWeightEncoder.encode_token_weights`` (pieces encoded
as a batch, outputs concatenated along the sequence, pooled output of the first piece). The
integration tier checks the token pieces against ComfyUI's own tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_selma.trainer.text.encoding import (
    CaptionEncoder,
    caption_chunks,
    chunk_token_ids,
    split_sentences,
    stack_conditioning,
)
from comfyui_selma.trainer import cli
from comfyui_selma.trainer.families.loading import load_pipeline
from comfyui_selma.trainer.train.config import TrainConfig, config_from_dict, read_config, write_config
from comfyui_selma.trainer.train.data import TextCache
from comfyui_selma.trainer.train.launch import prepare_run_folder

SHORT = "a photo of a cat"
LONG = ("A paragraph caption about a kitchen. " + " ".join(f"item {index} is a small red wooden spoon" for index in
                                                           range(19)) + ". The light comes from the left!")


@pytest.fixture(scope="module")
def pipelines(tiny_sd1_folder, tiny_sdxl_folder):
    torch.set_num_threads(1)
    return {"sd1": load_pipeline(tiny_sd1_folder), "sdxl": load_pipeline(tiny_sdxl_folder, architecture="sdxl")}


def reference_pieces(tokenizer, caption: str) -> list[list[int]]:
    ids = tokenizer(caption, add_special_tokens=False, verbose=False, split_special_tokens=True)["input_ids"]
    pieces = []
    for start in range(0, max(len(ids), 1), 75):
        piece = [tokenizer.bos_token_id, *ids[start:start + 75], tokenizer.eos_token_id]
        pieces.append(piece + [tokenizer.pad_token_id] * (77 - len(piece)))
    return pieces


def test_a_long_caption_is_cut_every_75_tokens_each_piece_with_start_end_and_padding(pipelines):
    tokenizer = pipelines["sd1"].tokenizer
    assert 150 < len(tokenizer(LONG, add_special_tokens=False, verbose=False)["input_ids"]) <= 225  # three pieces
    pieces = caption_chunks(tokenizer, LONG)
    assert pieces == reference_pieces(tokenizer, LONG)
    assert len(pieces) == 3 and all(len(piece) == 77 for piece in pieces)
    assert caption_chunks(tokenizer, "") == [[49406, 49407] + [49407] * 75]  # as ComfyUI encodes an empty prompt


def test_each_tokenizer_pads_with_its_own_pad_token_and_reads_a_written_exclamation_mark_as_text(pipelines):
    """CLIP-L pads with the end token, OpenCLIP (SDXL's second encoder, SD 2.x) with '!' (id 0), as ComfyUI does;
    a '!' in the caption is the text token '!</w>' (256) for both, as in ComfyUI, not the pad id."""
    caption = SHORT + "!"
    first = caption_chunks(pipelines["sdxl"].tokenizer, caption)
    second = caption_chunks(pipelines["sdxl"].tokenizer_2, caption)
    assert first[0][-1] == 49407 and second[0][-1] == 0
    assert first[0][:8] == second[0][:8] == [49406, 320, 1125, 539, 320, 2368, 256, 49407]


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_long_caption_encoding_matches_the_piecewise_reference(pipelines, architecture):
    pipeline = pipelines[architecture]
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if architecture == "sdxl" else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if architecture == "sdxl" else [])
    with torch.no_grad():
        encoded = CaptionEncoder(architecture, tokenizers, encoders).encode([LONG, SHORT])
        reference_hidden, reference_pooled = [], None
        for index, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
            ids = torch.tensor(reference_pieces(tokenizer, LONG))
            if architecture == "sdxl":
                output = encoder(ids, output_hidden_states=True)
                reference_hidden.append(output.hidden_states[-2].reshape(-1, output.hidden_states[-2].shape[-1]))
                reference_pooled = output[0][0] if index == 1 else reference_pooled
            else:
                reference_hidden.append(encoder(ids)[0].reshape(-1, encoder.config.hidden_size))
        reference = torch.cat(reference_hidden, dim=-1)
    assert encoded[0].hidden.shape == (3 * 77, reference.shape[-1])
    torch.testing.assert_close(encoded[0].hidden, reference)
    if architecture == "sdxl":
        torch.testing.assert_close(encoded[0].pooled, reference_pooled)
    assert encoded[1].hidden.shape[0] == 77


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_a_short_caption_encodes_exactly_as_the_diffusers_pipeline_encodes_a_prompt(pipelines, architecture):
    pipeline = pipelines[architecture]
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if architecture == "sdxl" else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if architecture == "sdxl" else [])
    with torch.no_grad():
        ours = CaptionEncoder(architecture, tokenizers, encoders).encode([SHORT])[0]
        if architecture == "sdxl":
            prompt_embeds, _, pooled, _ = pipeline.encode_prompt(SHORT, device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=False)
            torch.testing.assert_close(ours.pooled, pooled[0])
        else:
            prompt_embeds, _ = pipeline.encode_prompt(SHORT, "cpu", 1, False)
    torch.testing.assert_close(ours.hidden, prompt_embeds[0])


def test_truncate_keeps_the_first_piece_and_sentences_encode_each_sentence_alone(pipelines):
    tokenizer = pipelines["sd1"].tokenizer
    assert caption_chunks(tokenizer, LONG, "truncate") == reference_pieces(tokenizer, LONG)[:1]
    sentences = split_sentences(LONG)
    assert len(sentences) == 3 and sentences[-1] == "The light comes from the left!"
    expected = [piece for sentence in sentences for piece in reference_pieces(tokenizer, sentence)]
    assert caption_chunks(tokenizer, LONG, "sentences") == expected


RENAMED_NOTICE = "caption_encoding 'segments' is the old name of 'sentences'; read as 'sentences'"


def old_config_file(folder, **settings):
    """A run's config.toml as the pack wrote it before 'sentences' was called 'segments'."""
    path = write_config(TrainConfig(caption_encoding="sentences", **settings), folder)
    path.write_text(path.read_text().replace('caption_encoding = "sentences"', 'caption_encoding = "segments"'))
    assert 'caption_encoding = "segments"' in path.read_text()
    return path


def test_a_config_file_holding_the_old_name_segments_loads_as_sentences_with_a_notice(tmp_path, capsys):
    path = old_config_file(tmp_path)
    notices = []
    assert read_config(path, notify=notices.append).caption_encoding == "sentences"
    assert notices == [f"{path}: {RENAMED_NOTICE}"]
    assert read_config(path).caption_encoding == "sentences"  # without a listener the notice goes to stderr
    assert capsys.readouterr().err == f"{path}: {RENAMED_NOTICE}\n"
    assert read_config(write_config(TrainConfig(caption_encoding="sentences"), tmp_path / "new"),
                       notify=notices.append).caption_encoding == "sentences" and len(notices) == 1


def test_a_run_folder_written_with_segments_is_continued_with_sentences_and_rewritten(tmp_path, capsys):
    settings = dict(pretrained_model_name_or_path="/models/base.safetensors", train_data_dir="/data/counting")
    run = tmp_path / "run"
    path = old_config_file(run, **settings)
    assert prepare_run_folder(TrainConfig(caption_encoding="sentences", **settings), run) == path
    assert 'caption_encoding = "sentences"' in path.read_text()
    assert capsys.readouterr().err == ""  # the user already asks for 'sentences': nothing to tell


def test_the_selma_train_flag_value_segments_is_read_as_sentences_with_a_notice(tmp_path, capsys):
    exit_code = cli.main(["train", "--dataset", str(tmp_path / "missing"), "--model", str(tmp_path / "base.safetensors"),
                          "--out", str(tmp_path / "run"), "--caption-encoding", "segments"])
    error = capsys.readouterr().err
    assert exit_code == 2 and "missing" in error  # refused for the dataset, not for the encoding
    assert f"selma train: {RENAMED_NOTICE}" in error


def test_segments_and_sentences_are_one_encoding_with_one_text_cache(tmp_path):
    old = config_from_dict({"caption_encoding": "segments"}, notify=lambda message: None)
    assert old == config_from_dict({"caption_encoding": "sentences"})
    # Text caches written before the rename (keyed 'segments') are found under the new name.
    assert TextCache(tmp_path, "model", "sentences").path(LONG) == TextCache(tmp_path, "model", "segments").path(LONG)
    assert TextCache(tmp_path, "model", "sentences").path(LONG) != TextCache(tmp_path, "model", "chunks").path(LONG)


def test_captions_of_different_lengths_batch_with_a_mask_that_hides_the_padding():
    long, short = torch.randn(154, 8), torch.randn(77, 8)
    batch, mask = stack_conditioning([long, short])
    assert batch.shape == (2, 154, 8)
    assert mask[0].all() and mask[1, :77].all() and not mask[1, 77:].any()
    torch.testing.assert_close(batch[1, :77], short)
    same, no_mask = stack_conditioning([short, short])
    assert same.shape == (2, 77, 8) and no_mask is None


def test_chunking_cuts_every_75_tokens_wherever_a_word_ends_as_comfyui_does():
    assert chunk_token_ids([]) == [[]]
    assert chunk_token_ids(list(range(74))) == [list(range(74))]
    assert chunk_token_ids(list(range(160))) == [list(range(75)), list(range(75, 150)), list(range(150, 160))]
