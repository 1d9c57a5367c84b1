"""What continuing a prompt set checks: it is continued only by the settings that made it.

A prompt set grows over many runs (cancelled, killed, out of budget). Its ``<name>.summary.json``
records the settings that decide which prompts are written and kept (:func:`shaping_settings`);
a later run with any of them different is refused, naming each difference, and nothing is
changed. Raising ``count`` or ``max_requests`` is what continuing is for, so those are not
recorded. In particular a blocklist (the eval-leak guard) added later was never applied to the
prompts already kept, so it is refused too: filter the set into a new file instead.

A set without recorded settings (written by an older version, or by ``selma prompts filter``) is
continued with the settings given, which are recorded from then on, after its prompts are
checked against the blocklist. Messages name files, lines and settings, never a prompt's text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .filter import PromptFilter
from .prompt_set import PromptList, PromptRecord, PromptSetError
from .skills import CUSTOM, Skill

if TYPE_CHECKING:
    from .generate import PromptConfig

SUMMARY_KEYS = frozenset({"skill", "path", "target", "kept", "requests"})
LINES_SHOWN = 10


def shaping_settings(config: PromptConfig, skill: Skill, blocklist: PromptList | None) -> dict[str, Any]:
    """The settings that decide which prompts a run writes and keeps, as recorded in the summary.

    Not among them: the target and the budget (raised to continue), retries, timeouts, the device,
    where the key comes from and the URL (an endpoint may move and serve the same model).
    """
    settings: dict[str, Any] = {"skill": skill.name}
    if skill.name == CUSTOM:
        settings["description"] = skill.rules
    settings.update(seeds=list(skill.seeds), threshold=config.threshold, max_words=skill.max_words,
                    blocklist=_blocklist_record(blocklist), backend=config.backend)
    if config.backend != "template":
        settings.update(model=config.model, temperature=config.temperature, top_p=config.top_p,
                        max_tokens=config.max_tokens)
    if config.backend == "openai":
        settings["api"] = config.api
    settings.update(prompts_per_request=config.prompts_per_request, examples_per_request=config.examples_per_request,
                    seed=config.seed)
    return settings


def _blocklist_record(blocklist: PromptList | None) -> dict[str, Any] | None:
    """Which blocklist: its path (for messages), size and a digest of its prompts (what is compared)."""
    if blocklist is None:
        return None
    digest = hashlib.sha256("\n".join(blocklist.prompts).encode("utf-8")).hexdigest()
    return {"path": str(blocklist.path), "prompts": len(blocklist), "sha256": digest}


def read_summary(path: Path) -> dict[str, Any] | None:
    """The stored summary beside a prompt set (None if there is none); anything else at its path is refused.

    That path is derived from a user's ``--out``, so a file there that selma did not write is left alone.
    """
    if not path.exists():
        return None
    refusal = (f"{path}: not a prompt-run summary (the JSON selma writes beside a prompt set); it was left alone: "
               "move it away or choose another output name")
    try:
        stored = json.loads(path.read_bytes())
    except ValueError:
        raise PromptSetError(refusal) from None
    if not isinstance(stored, dict) or not SUMMARY_KEYS <= set(stored):
        raise PromptSetError(refusal)
    rejected = stored.get("rejected", {})
    counts = [stored["requests"], stored.get("replies_without_list", 0)]
    counts += list(rejected.values()) if isinstance(rejected, dict) else [None]
    counts += [stored[name] for name in ("prompt_tokens", "completion_tokens") if stored.get(name) is not None]
    if not all(_is_count(value) for value in counts) or not isinstance(stored.get("settings"), (dict, type(None))):
        raise PromptSetError(f"{path}: a prompt-run summary with a damaged count or settings field; delete it to "
                             "start the count afresh (the prompt set itself is kept)")
    return stored


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _blocklist_digest(record: object) -> str | None:
    return record.get("sha256") if isinstance(record, dict) else None


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if name == "blocklist" and isinstance(value, dict):
        count = value.get("prompts")
        return f"{value.get('path')} ({count} prompt{'' if count == 1 else 's'})"
    return repr(value)


def check_same_settings(output_path: Path, summary_path: Path, stored: dict[str, Any], given: dict[str, Any]) -> None:
    """Refuse to continue a set with settings other than those that made it, naming each difference."""
    differences = []
    for name in [*given, *(name for name in stored if name not in given)]:
        before, after = stored.get(name), given.get(name)
        if name == "blocklist" and _blocklist_digest(before) == _blocklist_digest(after):
            continue
        if before == after:
            continue
        if name == "seeds":
            differences.append("seeds differ")
        elif name == "description":
            differences.append("description differs")
        else:
            differences.append(f"{name} {_shown(name, before)} -> {_shown(name, after)}")
    if not differences:
        return
    blocklist_note = ""
    if _blocklist_digest(stored.get("blocklist")) != _blocklist_digest(given.get("blocklist")):
        blocklist_note = (" (and the prompts already kept were never checked against the new blocklist; to apply "
                          f"it, filter them into a new file: selma prompts filter {output_path} --blocklist FILE "
                          "--out NEW.jsonl, and continue that)")
    raise PromptSetError(f"{output_path}: was made with other settings: {', '.join(differences)}; continuing would "
                         f"mix prompts made under different settings{blocklist_note}; nothing was changed: run "
                         f"again with the settings recorded in {summary_path}, or choose another output name for "
                         "a new set")


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(number) for number in numbers[:LINES_SHOWN])
    more = f" and {len(numbers) - LINES_SHOWN} more" if len(numbers) > LINES_SHOWN else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def check_kept_against_blocklist(output_path: Path, records: list[PromptRecord], prompt_filter: PromptFilter,
                                 blocklist: PromptList | None) -> None:
    """Refuse a set with no recorded settings that holds a prompt too close to the blocklist it never saw."""
    if blocklist is None:
        return
    kept_lines, blocklist_lines = [], []
    for line_number, record in enumerate(records, start=1):
        score, closest = prompt_filter.blocklist_score(record.prompt)
        if score > prompt_filter.threshold:
            kept_lines.append(line_number)
            blocklist_lines.append(blocklist.line_of(closest))
    if not kept_lines:
        return
    several = len(kept_lines) > 1
    raise PromptSetError(
        f"{output_path}: {len(kept_lines)} kept prompt{'s' if several else ''} ({_lines(kept_lines)}) "
        f"{'have' if several else 'has'} ROUGE-L above {prompt_filter.threshold} against the blocklist "
        f"{blocklist.path} ({_lines(sorted(set(blocklist_lines)))}). The set has no recorded settings, so it was "
        "never checked against this blocklist; nothing was changed: remove those prompts (selma prompts filter "
        f"{output_path} --blocklist {blocklist.path} --out NEW.jsonl) or choose another output name")


def check_seeds_against_blocklist(skill: Skill, prompt_filter: PromptFilter, blocklist: PromptList | None) -> None:
    """A new set may not start from a seed prompt too close to the blocklist."""
    if blocklist is None:
        return
    for index, seed_prompt in enumerate(skill.seeds, start=1):
        score, closest = prompt_filter.blocklist_score(seed_prompt)
        if score > prompt_filter.threshold:
            raise ValueError(f"seeds: seed prompt {index} of {len(skill.seeds)} has ROUGE-L {score:.3f} against line "
                             f"{blocklist.line_of(closest)} of the blocklist {blocklist.path} (above threshold "
                             f"{prompt_filter.threshold}); choose other seeds")
