"""The local transformers backend: a causal LM from a folder, generating offline and reproducibly."""

from __future__ import annotations

import pytest

from comfyui_selma.trainer.backends.llm import LLMError, TransformersBackend
from comfyui_selma.trainer.prompts.prompt_set import read_prompt_set
from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts

WORDS = ("a the red blue green cat dog kite lamp boat tree sky on under beside with two three one of in and at "
         "small old wooden glass table window river street").split()


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A 1-layer GPT-2 with random weights and a word-level tokenizer, saved like any hub model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocabulary = ["[UNK]", "<eos>", ".", ",", *[str(number) for number in range(25)], *WORDS]
    word_level = Tokenizer(models.WordLevel({word: index for index, word in enumerate(vocabulary)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="<eos>",
                                        pad_token="<eos>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocabulary), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=1))
    folder = tmp_path_factory.mktemp("tiny-causal-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model_folder, **overrides) -> PromptConfig:
    settings = dict(backend="transformers", model=str(model_folder), skill="everyday_objects", count=8,
                    max_requests=3, max_tokens=16, device="cpu", seed=5)
    settings.update(overrides)
    return PromptConfig(**settings)


@pytest.mark.slow
def test_a_local_model_folder_writes_prompts_offline_and_the_same_seed_writes_the_same_file(tiny_causal_lm,
                                                                                           tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    summary = expand_prompts(_config(tiny_causal_lm), first)
    expand_prompts(_config(tiny_causal_lm), second)
    assert first.read_bytes() == second.read_bytes()
    records = read_prompt_set(first)
    assert summary.requests == 3 and summary.completion_tokens == 3 * 16 and summary.prompt_tokens > 3 * 100
    assert [record.source for record in records[3:]] == ["llm"] * (len(records) - 3)
    # the vocabulary has no line break, so each reply is one numbered item: kept or counted
    assert (summary.kept - 3) + sum(summary.rejected.values()) + summary.replies_without_list == 3
    assert len(records) == summary.kept > 3


def test_each_request_samples_differently(tiny_causal_lm):
    backend = TransformersBackend(str(tiny_causal_lm), max_tokens=12, seed=1, device="cpu")
    request = "Write 20 new image descriptions.\nExamples:\n1. a red cat\n2. a blue dog\n3. a kite\n"
    first = backend.complete(request, next_number=4, request_index=0)
    assert first.text.startswith("4. ")
    assert backend.complete(request, next_number=4, request_index=0) == first
    assert backend.complete(request, next_number=4, request_index=1) != first


def test_a_chat_model_gets_the_request_as_a_user_message(tiny_causal_lm, tmp_path):
    import shutil

    folder = tmp_path / "chat-model"
    shutil.copytree(tiny_causal_lm, folder)
    backend = TransformersBackend(str(folder), max_tokens=8, device="cpu")
    backend._tokenizer.chat_template = "{% for m in messages %}user {{ m['content'] }} {% endfor %}assistant"
    reply = backend.complete("a red cat", next_number=4, request_index=0)
    assert not reply.text.startswith("4.")
    assert reply.prompt_tokens == len(backend._tokenizer("user a red cat assistant")["input_ids"])


def test_a_path_that_is_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LLMError, match="is not a model folder \\(no config.json in it\\)"):
        expand_prompts(_config(tmp_path / "missing"), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
