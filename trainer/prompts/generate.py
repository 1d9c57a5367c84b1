"""Stage 1: grow a skill's prompt set with an LLM, kept diverse by ROUGE-L (SELMA §3.1, as released).

The pool starts from the skill's 3 seed prompts. Each request shows the skill's instruction and 3
examples sampled at random from every prompt kept so far, and asks for 20 more; the numbered reply
is parsed and each candidate goes through the greedy filter (:mod:`.prompt_filter`). Accepted
prompts are appended to the prompt-set JSONL (:mod:`.prompt_set`) as they are accepted; the loop
stops when ``count`` prompts are kept or ``max_requests`` requests were made.

Reproducible: request ``i`` samples its examples with a generator seeded by (``seed``, ``i``), and
the template and transformers backends seed their output the same way, so a run is a function of
the settings and the reply stream. A ``<name>.summary.json`` beside the JSONL, rewritten atomically
after each request, holds the request count, the rejection counts and the settings that shape the
set, so a run that was cancelled or killed continues where it stopped and ends with the same file
as one that was not. Continuing with other settings is refused, naming each difference
(:mod:`.prompt_resume`). One process writes a set at a time (:func:`.locks.exclusive_lock`); a
second is refused with the first one's pid.

:class:`PromptConfig` is the one set of settings: the ``selma prompts generate`` flags and the
SELMA Skill Prompts node's tooltips read their help text from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.endpoints import APIS, check_env_name, is_http_url
from ..storage.files import atomic_open, atomic_write_json
from ..backends.llm import (
    BACKENDS,
    Backend,
    LLMError,
    OpenAIBackend,
    TemplateBackend,
    TransformersBackend,
    api_key_from_environment,
    check_model_folder,
    parse_numbered_list,
)
from ..storage.locks import exclusive_lock
from .filter import REJECTION_REASONS, PromptFilter, check_threshold
from .resume import (
    check_kept_against_blocklist,
    check_same_settings,
    check_seeds_against_blocklist,
    read_summary,
    shaping_settings,
)
from .prompt_set import (
    PromptList,
    PromptRecord,
    PromptSetError,
    PromptSetWriter,
    read_prompt_lines,
    read_prompt_objects,
    read_prompt_set,
)
from ..settings import add_config_arguments, config_from_arguments, setting
from .skills import SKILLS, Skill, get_skill, request_text, skill_names
from ..backends.templates import template_prompts


@dataclass
class PromptConfig:
    """Settings of prompt expansion; defaults are the SELMA paper's (GPT-3.5, 1,000 prompts, ROUGE-L 0.8)."""

    skill: str = setting("everyday_objects", "Skill preset to write prompts for, or 'custom' to use your own "
                         "description and seed prompts.", choices=skill_names())
    description: str = setting("", "For skill 'custom': the rules the LLM follows, e.g. 'Photos of kitchen tools "
                               "on a counter, one tool per image.'")
    seeds: list = setting([], "Seed prompts the pool starts from, at least 3 (one per line); empty: the preset's "
                          "own. Required for skill 'custom'.")
    count: int = setting(1000, "Prompts to keep, seed prompts included; the run stops when the set has this many.")
    threshold: float = setting(0.8, "ROUGE-L threshold in (0, 1]: a candidate whose ROUGE-L F-measure against any "
                               "kept (or blocklisted) prompt is above it is dropped.")
    max_words: int = setting(0, "Drop candidates with more words than this; 0: the preset's limit (30 or 50), "
                             "none for a custom skill.")
    blocklist: str = setting("", "Eval-leak guard: a file of prompts (one a line, or a .jsonl prompt set) that "
                             "generated prompts must not come close to, e.g. a benchmark's test prompts; empty: none.")
    backend: str = setting("openai", "Where prompts come from: 'openai' (any OpenAI-compatible endpoint: OpenAI, "
                           "Ollama, vLLM, LM Studio, llama.cpp server), 'transformers' (a local model folder) or "
                           "'template' (offline, deterministic, no model).", choices=BACKENDS)
    base_url: str = setting("https://api.openai.com/v1", "Base URL of the OpenAI-compatible endpoint, e.g. "
                            "http://127.0.0.1:11434/v1 for Ollama.")
    model: str = setting("gpt-3.5-turbo-instruct", "Model name the endpoint serves; for backend 'transformers', "
                         "the path of a local causal LM folder.")
    api: str = setting("completions", "Endpoint API: 'completions' (the model continues the numbered list, as in "
                       "SELMA's release) or 'chat'.", choices=APIS)
    api_key_env: str = setting("OPENAI_API_KEY", "NAME of the environment variable that holds the API key (never "
                               "the key itself); empty: no key. Local servers need none, so it may be unset. A key "
                               "is never sent over plain http except to this machine.")
    temperature: float = setting(1.0, "Sampling temperature of the LLM.")
    top_p: float = setting(1.0, "Nucleus sampling top-p of the LLM.")
    max_tokens: int = setting(3072, "Most tokens the LLM may write per reply.")
    prompts_per_request: int = setting(20, "Prompts asked for in each request.")
    examples_per_request: int = setting(3, "Kept prompts shown as examples in each request, sampled at random "
                                        "from all prompts kept so far.")
    max_requests: int = setting(500, "Request budget, counted over resumed runs too; the run stops when it is "
                                "spent and says how many prompts were reached.")
    max_retries: int = setting(3, "Retries of a failed request (connection error, timeout, 429, 5xx) with "
                               "exponential backoff, honouring the server's retry-after.")
    request_timeout: float = setting(120.0, "Seconds to wait for one reply before retrying.")
    device: str = setting("auto", "Device for backend 'transformers': auto, cpu, cuda, cuda:1 ...")
    seed: int = setting(0, "Seed for sampling the examples (and the template and transformers backends).")

    def validate(self) -> None:
        """Raise a message naming the field for any setting that cannot work; nothing else runs first."""
        if self.skill not in skill_names():
            raise ValueError(f"skill: unknown skill {self.skill!r}; known skills: {', '.join(skill_names())}")
        check_threshold(self.threshold)
        for name, lowest in (("count", 1), ("prompts_per_request", 1), ("examples_per_request", 1),
                             ("max_requests", 1), ("max_tokens", 1), ("max_words", 0), ("max_retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name}: {value!r}; expected a whole number >= {lowest}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.api not in APIS:
            raise ValueError(f"api: {self.api!r}; expected one of {', '.join(APIS)}")
        if self.backend == "openai":
            if self.api_key_env:
                check_env_name(self.api_key_env)
            if not is_http_url(self.base_url):
                raise ValueError("base_url: expected an http(s) URL such as https://api.openai.com/v1 or "
                                 "http://127.0.0.1:11434/v1; the value given is not one (not shown: it may hold a key)")
        if not _finite(self.request_timeout) or self.request_timeout <= 0:
            raise ValueError(f"request_timeout: {self.request_timeout!r}; expected seconds > 0")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: {self.temperature!r}; expected a number >= 0")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p!r}; expected a number in (0, 1]")

    def resolved_skill(self) -> Skill:
        return get_skill(self.skill, self.description, self.seeds, self.max_words)


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class PromptSummary:
    """What a run (and the runs it resumed) did; written beside the JSONL as ``<name>.summary.json``."""

    skill: str
    path: str
    target: int
    kept: int = 0
    requests: int = 0
    max_requests: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in REJECTION_REASONS})
    replies_without_list: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    backend: str = ""
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def reached_target(self) -> bool:
        return self.kept >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reached_target": self.reached_target}

    def message(self) -> str:
        rejected = ", ".join(f"{reason} {number}" for reason, number in self.rejected.items() if number) or "none"
        head = (f"kept {self.kept} of {self.target} prompts" if self.reached_target else
                f"request budget spent: {self.requests} of max_requests={self.max_requests} requests reached "
                f"{self.kept} of {self.target} prompts (raise max_requests and run again to continue)")
        tokens = ""
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            tokens = f"; tokens: {self.prompt_tokens or 0} prompt + {self.completion_tokens or 0} completion"
        unparsed = f"; {self.replies_without_list} replies had no numbered list" if self.replies_without_list else ""
        return f"{head} in {self.path} after {self.requests} requests; rejected: {rejected}{unparsed}{tokens}"


@dataclass(frozen=True)
class ProgressUpdate:
    """Reported after the seeds are written and after every request, once the files are on disk."""

    kept: int
    target: int
    requests: int
    max_requests: int
    accepted: tuple[str, ...]  # accepted by the latest request
    rejected: dict[str, int]


ProgressCallback = Callable[[ProgressUpdate], None]


def summary_path_for(output_path: str | Path) -> Path:
    """``<name>.summary.json`` beside ``<name>.jsonl``."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.stem + ".summary.json")


def make_backend(config: PromptConfig, skill: Skill) -> Backend:
    """The backend ``config.backend`` names, built from the config (the key from the environment)."""
    if config.backend == "template":
        return TemplateBackend(skill.name, config.seed, config.prompts_per_request)
    if config.backend == "transformers":
        return TransformersBackend(config.model, config.temperature, config.top_p, config.max_tokens, config.seed,
                                   config.device)
    api_key = api_key_from_environment(config.api_key_env, config.base_url)
    return OpenAIBackend(config.base_url, config.model, config.api, api_key, config.api_key_env, config.temperature,
                         config.top_p, config.max_tokens, config.max_retries, config.request_timeout)


def check_backend(config: PromptConfig, skill: Skill) -> None:
    """The cheap checks of :func:`make_backend` (no model loaded, no request made), so errors come first."""
    if config.backend == "template":
        template_prompts(skill.name, config.seed, 0, 0)
    elif config.backend == "transformers":
        check_model_folder(config.model)
    else:
        api_key_from_environment(config.api_key_env, config.base_url)


def _restore_counts(summary: PromptSummary, stored: dict[str, Any]) -> None:
    """Carry the request, rejection and token counts of earlier runs (checked by ``read_summary``) on."""
    summary.requests = stored["requests"]
    summary.replies_without_list = stored.get("replies_without_list", 0)
    for reason in REJECTION_REASONS:
        summary.rejected[reason] = stored.get("rejected", {}).get(reason, 0)
    for name in ("prompt_tokens", "completion_tokens"):
        if stored.get(name) is not None:
            setattr(summary, name, stored[name])


def _add_tokens(total: int | None, more: int | None) -> int | None:
    return total if more is None else (total or 0) + more


def expand_prompts(config: PromptConfig, output_path: str | Path, progress: ProgressCallback | None = None,
                   backend: Backend | None = None) -> PromptSummary:
    """Grow the prompt set at ``output_path`` to ``config.count`` prompts; continue it if it exists.

    Every setting is checked before any file is touched or any request made; then the set is
    locked against a second writer, and a file there is continued only if it is a prompt set made
    with the same settings (:mod:`.prompt_resume`). The JSONL always holds every prompt accepted so
    far, whatever stops the run (budget, error, cancel raised by ``progress``); calling again
    continues it.
    """
    config.validate()
    skill = config.resolved_skill()
    if config.count < len(skill.seeds):
        raise ValueError(f"count: {config.count} is fewer than the {len(skill.seeds)} seed prompts the set starts "
                         "from; expected at least that many")
    if backend is None:
        check_backend(config, skill)
    blocklist = read_prompt_lines(config.blocklist) if config.blocklist else None
    output_path = Path(output_path)
    with exclusive_lock(output_path):
        return _expand_locked(config, skill, blocklist, output_path, progress, backend)


def _expand_locked(config: PromptConfig, skill: Skill, blocklist: PromptList | None, output_path: Path,
                   progress: ProgressCallback | None, backend: Backend | None) -> PromptSummary:
    """:func:`expand_prompts` once this process holds the set's lock: check what is on disk, then grow it."""
    summary_path = summary_path_for(output_path)
    records = read_prompt_set(output_path)
    stored = read_summary(summary_path)
    if records and records[0].skill != skill.name:
        held = f"skill {records[0].skill!r}" if records[0].skill in skill_names() else "an unknown skill"
        raise PromptSetError(f"{output_path}: holds prompts of {held}, not {skill.name!r}; choose another output name")
    prompt_filter = PromptFilter(config.threshold, blocklist.prompts if blocklist else (), skill.max_words)
    settings = shaping_settings(config, skill, blocklist)
    summary = PromptSummary(skill=skill.name, path=str(output_path), target=config.count,
                            max_requests=config.max_requests, backend=config.backend,
                            model=config.model if config.backend != "template" else "", settings=settings)
    if records:
        if stored is not None and stored.get("settings") is not None:
            check_same_settings(output_path, summary_path, stored["settings"], settings)
        else:  # a set from an older version or from `selma prompts filter`: continued with these settings
            check_kept_against_blocklist(output_path, records, prompt_filter, blocklist)
        if stored is not None:
            _restore_counts(summary, stored)
        for record in records:
            prompt_filter.keep(record.prompt)
    else:
        check_seeds_against_blocklist(skill, prompt_filter, blocklist)
        summary_path.unlink(missing_ok=True)  # a summary without its prompt set counts nothing
    summary.kept = len(records)

    owns_backend = backend is None
    writer = PromptSetWriter(output_path)
    try:
        if not records:
            for seed_prompt in skill.seeds:
                score, _ = prompt_filter.kept_score(seed_prompt)
                prompt_filter.keep(seed_prompt)
                writer.write(PromptRecord(seed_prompt, skill.name, "seed", score))
            writer.sync()
            summary.kept = prompt_filter.kept_count
        atomic_write_json(summary_path, summary.to_dict())
        _report(progress, summary, ())
        if summary.reached_target or summary.requests >= config.max_requests:
            return summary
        if backend is None:
            backend = make_backend(config, skill)

        while summary.kept < config.count and summary.requests < config.max_requests:
            request_index = summary.requests
            kept_prompts = prompt_filter.kept
            examples = random.Random(f"selma-examples/{config.seed}/{request_index}").sample(
                kept_prompts, min(config.examples_per_request, len(kept_prompts)))
            request = request_text(skill, examples, config.prompts_per_request)
            reply = backend.complete(request, next_number=len(examples) + 1, request_index=request_index)
            summary.requests += 1
            summary.prompt_tokens = _add_tokens(summary.prompt_tokens, reply.prompt_tokens)
            summary.completion_tokens = _add_tokens(summary.completion_tokens, reply.completion_tokens)
            candidates = parse_numbered_list(reply.text)
            if not candidates:
                summary.replies_without_list += 1
            rejected_before = dict(prompt_filter.rejected)
            verdicts = prompt_filter.consider_many(candidates, accept_at_most=config.count - summary.kept)
            accepted = tuple(verdict.prompt for verdict in verdicts if verdict.accepted)
            for verdict in verdicts:
                if verdict.accepted:
                    writer.write(PromptRecord(verdict.prompt, skill.name, backend.source, verdict.max_rouge_l))
            writer.sync()
            for reason in REJECTION_REASONS:
                summary.rejected[reason] += prompt_filter.rejected[reason] - rejected_before[reason]
            summary.kept = prompt_filter.kept_count
            atomic_write_json(summary_path, summary.to_dict())
            _report(progress, summary, accepted)
        return summary
    finally:
        writer.close()
        if owns_backend and backend is not None:
            backend.close()


def _report(progress: ProgressCallback | None, summary: PromptSummary, accepted: tuple[str, ...]) -> None:
    if progress is not None:
        progress(ProgressUpdate(summary.kept, summary.target, summary.requests, summary.max_requests, accepted,
                                dict(summary.rejected)))


# ---------------------------------------------------------------------------------------------- CLI


def filter_file(input_path: str | Path, output_path: str | Path, threshold: float = 0.8, blocklist: str = "",
                max_words: int = 0) -> dict[str, Any]:
    """The greedy filter alone over a JSONL file, in file order; kept lines go to ``output_path``.

    Kept objects are written unchanged except ``max_rouge_l``, recomputed against the lines kept
    before them. Returns the counts: read, kept, rejected by reason.
    """
    check_threshold(threshold)
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.exists() and output_path.exists() and os.path.samefile(input_path, output_path):
        raise ValueError(f"out: {output_path} is also the input {input_path}; write the kept lines to a new file")
    objects = read_prompt_objects(input_path)
    prompt_filter = PromptFilter(threshold, read_prompt_lines(blocklist).prompts if blocklist else (), max_words)
    verdicts = prompt_filter.consider_many([value["prompt"] for value in objects])
    with exclusive_lock(output_path), atomic_open(output_path) as stream:
        for value, verdict in zip(objects, verdicts):
            if verdict.accepted:
                stream.write(json.dumps({**value, "max_rouge_l": verdict.max_rouge_l}, ensure_ascii=False) + "\n")
    return {"read": len(objects), "kept": prompt_filter.kept_count, "rejected": dict(prompt_filter.rejected)}


def _read_seeds_file(path: str) -> list[str]:
    """The seed prompts of ``--seeds-file``; a file with none is an error, never "use the preset's seeds"."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--seeds-file: cannot read {path!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--seeds-file: {path} is not UTF-8 text; expected one seed prompt per line") from None
    seeds = [line.strip() for line in text.splitlines() if line.strip()]
    if not seeds:
        raise ValueError(f"--seeds-file: {path} holds no seed prompts (blank lines are skipped); expected at least "
                         "3, one per line")
    return seeds


def _generate(arguments: argparse.Namespace) -> int:
    seeds = list(arguments.seed_prompt or [])
    if arguments.seeds_file:
        seeds += _read_seeds_file(arguments.seeds_file)
    config = config_from_arguments(PromptConfig, arguments, seeds=seeds)
    from tqdm import tqdm

    bar = None

    def show(update: ProgressUpdate) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=update.target, initial=update.kept, unit="prompt", file=sys.stderr,
                       disable=arguments.quiet)
        bar.update(update.kept - bar.n)
        bar.set_postfix(requests=update.requests)

    try:
        summary = expand_prompts(config, arguments.out, progress=show)
    finally:
        if bar is not None:
            bar.close()
    print(summary.message())
    return 0 if summary.reached_target else BUDGET_SPENT_EXIT_CODE


def _filter(arguments: argparse.Namespace) -> int:
    counts = filter_file(arguments.input, arguments.out, arguments.threshold, arguments.blocklist,
                         arguments.max_words)
    rejected = ", ".join(f"{reason} {number}" for reason, number in counts["rejected"].items() if number) or "none"
    print(f"kept {counts['kept']} of {counts['read']} prompts in {arguments.out}; rejected: {rejected}")
    return 0


def _skills(arguments: argparse.Namespace) -> int:
    for skill in SKILLS.values():
        print(f"{skill.name}: {skill.title}")
        if arguments.verbose:
            print("  " + request_text(skill, skill.seeds, 20).replace("\n", "\n  "))
    print("custom: your own --description and at least 3 seed prompts (--seed-prompt or --seeds-file)")
    return 0


BUDGET_SPENT_EXIT_CODE = 2


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(arguments: argparse.Namespace) -> int:
        try:
            return handler(arguments)
        except (ValueError, LLMError, OSError) as error:
            print(f"selma prompts {arguments.prompts_command}: error: {error}", file=sys.stderr)
            return 1
    return run


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    parser = subparsers.add_parser(name, help=summary, description=summary)
    commands = parser.add_subparsers(dest="prompts_command", required=True, metavar="{generate,filter,skills}")

    generate = commands.add_parser(
        "generate", help="Grow a skill's prompt set with an LLM (or templates); re-running continues it.",
        description="Grow a skill's prompt set: each request shows the skill's instruction and 3 examples sampled "
                    "from all kept prompts; a candidate is kept only if its ROUGE-L against every kept prompt is at "
                    f"most the threshold. Exit code 0 when --count prompts are kept, {BUDGET_SPENT_EXIT_CODE} when "
                    "--max-requests ran out first, 1 on an error.")
    generate.add_argument("--out", required=True, help="Prompt-set JSONL to write or continue "
                                                       "(a <name>.summary.json goes beside it).")
    add_config_arguments(generate, PromptConfig, skip=("seeds",))
    generate.add_argument("--seed-prompt", action="append", metavar="PROMPT",
                          help="A seed prompt (repeat, at least 3 in all); replaces the preset's seeds.")
    generate.add_argument("--seeds-file", default="", help="A text file of seed prompts, one per line.")
    generate.add_argument("--quiet", action="store_true", help="No progress bar.")
    generate.set_defaults(handler=_guarded(_generate))

    filter_parser = commands.add_parser(
        "filter", help="The greedy ROUGE-L filter alone over a JSONL file, in file order.",
        description="Keep each line whose prompt has ROUGE-L F-measure (rouge-score tokens, no stemming) at most "
                    "--threshold against every line kept before it and every blocklisted prompt.")
    filter_parser.add_argument("input", help="JSONL file, one object with a 'prompt' field per line.")
    filter_parser.add_argument("--out", required=True, help="JSONL file for the kept lines.")
    filter_parser.add_argument("--threshold", type=float, default=0.8,
                               help=PromptConfig.__dataclass_fields__["threshold"].metadata["help"] + " (default: 0.8)")
    filter_parser.add_argument("--blocklist", default="", help=PromptConfig.__dataclass_fields__["blocklist"]
                               .metadata["help"])
    filter_parser.add_argument("--max-words", type=int, default=0, help="Drop prompts with more words than this "
                                                                        "(default: 0, no limit).")
    filter_parser.set_defaults(handler=_guarded(_filter))

    skills = commands.add_parser("skills", help="List the skill presets.", description="List the skill presets.")
    skills.add_argument("--verbose", action="store_true", help="Also print each preset's request with its seeds.")
    skills.set_defaults(handler=_guarded(_skills))
