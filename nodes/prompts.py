"""SELMA Skill Prompts: stage 1 as a ComfyUI node, over ``trainer.prompts.expand_prompts``.

The node writes ``<output>/selma/prompts/<name>.jsonl`` and continues it when queued again, so a
cancelled run (cancel is honoured between LLM requests) keeps every accepted prompt and a re-queue
picks up where it stopped. The API key is read from the environment variable a widget NAMES; no
widget, event or file ever holds the key itself.
"""

from __future__ import annotations

from typing import Any

from ..trainer.files import check_name
from ..trainer.llm_backends import APIS, BACKENDS
from ..trainer.prompt_set import PromptSet, prompt_set_of
from ..trainer.prompts import PromptConfig, ProgressUpdate, expand_prompts
from ..trainer.settings import default_of, help_of
from ..trainer.skills import skill_names
from .comfy_runtime import NodeProgress, selma_output_path, send_event

EVENT = "selma.prompts"
LATEST_SHOWN = 5


def _tip(name: str) -> str:
    return help_of(PromptConfig, name)


class SelmaSkillPrompts:
    DISPLAY_NAME = "SELMA Skill Prompts"
    CATEGORY = "SELMA/1 prompts"
    DESCRIPTION = ("Writes a skill's training prompts with an LLM (SELMA stage 1): starting from 3 seed prompts, "
                   "each request shows the skill's instruction and 3 examples sampled from all kept prompts; a "
                   "candidate is kept only if its ROUGE-L against every kept prompt is at most the threshold. "
                   "Writes output/selma/prompts/<name>.jsonl and continues it when queued again; cancel stops "
                   "between requests and keeps what was accepted. The API key comes from the environment "
                   "variable you name, never from a widget.")
    FUNCTION = "generate"
    RETURN_TYPES = ("SELMA_PROMPTS", "STRING")
    RETURN_NAMES = ("prompts", "path")
    OUTPUT_TOOLTIPS = ("The kept prompts with their skill and file, for the SELMA Render node.",
                       "Path of the prompt-set JSONL file.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "skill": (skill_names(), {"default": default_of(PromptConfig, "skill"), "tooltip": _tip("skill")}),
                "backend": (list(BACKENDS), {"default": default_of(PromptConfig, "backend"),
                                             "tooltip": _tip("backend")}),
                "base_url": ("STRING", {"default": default_of(PromptConfig, "base_url"), "tooltip": _tip("base_url")}),
                "model": ("STRING", {"default": default_of(PromptConfig, "model"), "tooltip": _tip("model")}),
                "api": (list(APIS), {"default": default_of(PromptConfig, "api"), "tooltip": _tip("api")}),
                "api_key_env": ("STRING", {"default": default_of(PromptConfig, "api_key_env"),
                                           "tooltip": _tip("api_key_env")}),
                "count": ("INT", {"default": default_of(PromptConfig, "count"), "min": 1, "max": 1_000_000,
                                  "tooltip": _tip("count")}),
                "threshold": ("FLOAT", {"default": default_of(PromptConfig, "threshold"), "min": 0.01, "max": 1.0,
                                        "step": 0.01, "tooltip": _tip("threshold")}),
                # A frontend control widget would re-randomise the seed after every queue, breaking resume.
                "seed": ("INT", {"default": default_of(PromptConfig, "seed"), "min": 0, "max": 2**63 - 1,
                                 "control_after_generate": False, "tooltip": _tip("seed")}),
                "name": ("STRING", {"default": "", "tooltip": "Output file name under output/selma/prompts/ "
                                    "(.jsonl added); empty: the skill's name. Queueing again with the same name "
                                    "continues that file."}),
            },
            "optional": {
                "description": ("STRING", {"default": "", "multiline": True, "tooltip": _tip("description")}),
                "seeds": ("STRING", {"default": "", "multiline": True, "tooltip": _tip("seeds")}),
                "blocklist": ("STRING", {"default": "", "tooltip": _tip("blocklist")}),
                "max_requests": ("INT", {"default": default_of(PromptConfig, "max_requests"), "min": 1,
                                         "max": 1_000_000, "tooltip": _tip("max_requests")}),
                "max_words": ("INT", {"default": default_of(PromptConfig, "max_words"), "min": 0, "max": 10_000,
                                      "tooltip": _tip("max_words")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(self, skill: str, backend: str, base_url: str, model: str, api: str, api_key_env: str, count: int,
                 threshold: float, seed: int, name: str, description: str = "", seeds: str = "",
                 blocklist: str = "", max_requests: int | None = None, max_words: int = 0,
                 unique_id: str | None = None) -> tuple[PromptSet, str]:
        config = PromptConfig(
            skill=skill, description=description, seeds=[line for line in seeds.splitlines() if line.strip()],
            count=count, threshold=threshold, max_words=max_words, blocklist=blocklist.strip(), backend=backend,
            base_url=base_url.strip(), model=model.strip(), api=api, api_key_env=api_key_env.strip(), seed=seed,
            max_requests=default_of(PromptConfig, "max_requests") if max_requests is None else max_requests)
        file_name = (name.strip() or skill).removesuffix(".jsonl")
        output_path = selma_output_path("prompts", check_name(file_name, "name") + ".jsonl")

        progress_bar = NodeProgress(count, node_id=unique_id)

        def report(update: ProgressUpdate) -> None:
            send_event(EVENT, {"node": unique_id, "kept": update.kept, "target": update.target,
                               "requests": update.requests, "max_requests": update.max_requests,
                               "latest": list(update.accepted[-LATEST_SHOWN:])})
            progress_bar.update(update.kept, update.target)  # raises on cancel: the files are already saved

        summary = expand_prompts(config, output_path, progress=report)
        send_event(EVENT, {"node": unique_id, "done": True, "kept": summary.kept, "target": summary.target,
                           "requests": summary.requests, "reached_target": summary.reached_target,
                           "rejected": dict(summary.rejected), "replies_without_list": summary.replies_without_list,
                           "message": summary.message()})
        if not summary.reached_target:
            print(f"[SELMA Skill Prompts] {summary.message()}")
        return prompt_set_of(output_path), str(output_path)
