"""SELMA Skill Prompts: stage 1 as a ComfyUI node, over ``trainer.prompts.generate.expand_prompts``.

The node writes ``<output>/selma/prompts/<name>.jsonl`` and continues it when queued again, so a
cancelled run (cancel is honoured between LLM requests) keeps every accepted prompt and a re-queue
picks up where it stopped.

Every widget value is untrusted: a workflow may come from anyone, and ComfyUI runs whatever graph
reaches its port. So the workflow never chooses both where a key goes and which key: ``base_url``
picks an endpoint from the server owner's endpoints file (``trainer.backends.endpoints``) and gets that
endpoint's key, or names a URL of its own, called without a key; the blocklist is read only
from ComfyUI's input or output folder, and a transformers model only from its models folder
(``nodes/folders.py``). No widget, event or file ever holds a key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..trainer.backends.endpoints import APIS, Route, endpoints_file, load_endpoints, route_for_workflow
from ..trainer.storage.files import check_name
from ..trainer.backends.llm import BACKENDS
from ..trainer.prompts.prompt_set import PromptSet, prompt_set_of
from ..trainer.prompts.generate import PromptConfig, ProgressUpdate, expand_prompts
from ..trainer.settings import default_of, help_of
from ..trainer.prompts.skills import skill_names
from .comfy_runtime import NodeProgress, selma_output_path, send_event
from .folders import input_folder, model_path, models_root, readable_path

EVENT = "selma.prompts"
LATEST_SHOWN = 5
ENDPOINTS_FILE = ("selma", "endpoints.toml")  # under ComfyUI's user directory, unless $SELMA_ENDPOINTS names one
BASE_URL_TIP = ("Which LLM endpoint: the name of one the server's owner configured (built in: 'openai'; more in "
                "ComfyUI/user/selma/endpoints.toml or the file $SELMA_ENDPOINTS names), which brings its own key, "
                "or any http(s) URL (e.g. http://127.0.0.1:11434/v1 for Ollama), called WITHOUT a key. A configured "
                "endpoint's URL counts as that endpoint.")
API_KEY_ENV_TIP = ("Leave empty: a configured endpoint's key is the one its owner bound to it. A workflow can never "
                   "pick which key is sent, nor send one to a URL of its choosing; this may only repeat the "
                   "endpoint's own variable name (as older workflows do) and is refused otherwise.")
BLOCKLIST_TIP = (help_of(PromptConfig, "blocklist") + " A file in ComfyUI's input folder (a name relative to it, "
                 "e.g. benchmarks/dsg.txt) or a path inside the input or output folder; nothing else is read.")

MODEL_TIP = (help_of(PromptConfig, "model") + " Here that folder must be in ComfyUI's models folder: give its name "
             "relative to it (e.g. LLM/my-model).")


def _tip(name: str) -> str:
    return help_of(PromptConfig, name)


def _blocklist_path(value: str) -> str:
    """A blocklist path a workflow gave, if it lies in ComfyUI's input or output folder (symlinks followed)."""
    if not value.strip():
        return ""
    return str(readable_path(value, "blocklist", input_folder()))


def _model(backend: str, value: str) -> str:
    """The ``model`` widget: a served model's name, or for ``transformers`` a folder in ComfyUI's models folder."""
    if backend != "transformers":
        return value.strip()
    return str(model_path(value, "model", [models_root()], "a causal LM folder saved with save_pretrained "
                          "(e.g. LLM/my-model)"))


def _endpoints_file() -> Path | None:
    import folder_paths

    return endpoints_file(Path(folder_paths.get_user_directory()).joinpath(*ENDPOINTS_FILE))


class SelmaSkillPrompts:
    DISPLAY_NAME = "SELMA Skill Prompts"
    CATEGORY = "SELMA/1 prompts"
    DESCRIPTION = ("Writes a skill's training prompts with an LLM (SELMA stage 1): starting from 3 seed prompts, "
                   "each request shows the skill's instruction and 3 examples sampled from all kept prompts; a "
                   "candidate is kept only if its ROUGE-L against every kept prompt is at most the threshold. "
                   "Writes output/selma/prompts/<name>.jsonl and continues it when queued again; cancel stops "
                   "between requests and keeps what was accepted. API keys live in the server's environment, "
                   "bound to the endpoints its owner configured; a URL of the workflow's own gets no key.")
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
                "base_url": ("STRING", {"default": "openai", "tooltip": BASE_URL_TIP}),
                "model": ("STRING", {"default": default_of(PromptConfig, "model"), "tooltip": MODEL_TIP}),
                "api": (list(APIS), {"default": default_of(PromptConfig, "api"), "tooltip": _tip("api")}),
                "api_key_env": ("STRING", {"default": "", "tooltip": API_KEY_ENV_TIP}),
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
                "blocklist": ("STRING", {"default": "", "tooltip": BLOCKLIST_TIP}),
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
        route = Route(base_url.strip(), "", "")  # the other backends send nothing anywhere
        if backend == "openai":
            route = route_for_workflow(base_url, api_key_env, api, load_endpoints(_endpoints_file()))
        config = PromptConfig(
            skill=skill, description=description, seeds=[line for line in seeds.splitlines() if line.strip()],
            count=count, threshold=threshold, max_words=max_words, blocklist=_blocklist_path(blocklist),
            backend=backend, base_url=route.base_url, model=_model(backend, model), api=api,
            api_key_env=route.api_key_env, seed=seed,
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
