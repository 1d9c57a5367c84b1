"""The prompt-set file: JSONL, one ``{"prompt", "skill", "source", "max_rouge_l"}`` object a line.

``source`` is ``seed`` (a seed prompt the pool started from), ``llm`` (written by an LLM) or
``template`` (the offline writer); ``max_rouge_l`` is the prompt's highest ROUGE-L F-measure
against the prompts before it in the file (0.0 for the first).

The file grows one line per accepted prompt, so a run that dies leaves every prompt it accepted.
Reading it back: a torn final line (no newline and not valid JSON: the process died mid-write) is
dropped, and :func:`repair_torn_tail` cuts it off before a resumed run appends; any other malformed
line is an error naming the file and the line number, because it means the file was edited or
damaged and guessing would silently lose or invent prompts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("seed", "llm", "template")


class PromptSetError(ValueError):
    """A prompt-set or prompt-list file that cannot be read as one; the message names file and line."""


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompt-set file."""

    prompt: str
    skill: str
    source: str
    max_rouge_l: float

    def to_json(self) -> str:
        return json.dumps({"prompt": self.prompt, "skill": self.skill, "source": self.source,
                           "max_rouge_l": self.max_rouge_l}, ensure_ascii=False)


@dataclass(frozen=True)
class PromptSet:
    """A finished list of prompts for one skill, and the file it came from: what the Render stage reads.

    In ComfyUI this travels between nodes as the ``SELMA_PROMPTS`` type.
    """

    prompts: tuple[str, ...]
    skill: str
    path: str

    def __len__(self) -> int:
        return len(self.prompts)


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line; a torn final line is skipped, other bad lines raise."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    last_complete = len(lines) - 1  # text after the final newline (b"" if the file ends with one)
    for index, raw in enumerate(lines):
        line_number = index + 1
        if index == last_complete:
            if not raw.strip():
                return
            try:
                value = json.loads(raw)
            except ValueError:
                return  # torn final line: the writer died mid-line
        else:
            if not raw.strip():
                raise PromptSetError(f"{path}:{line_number}: empty line; every line must hold one JSON object "
                                     "(delete the empty line)")
            try:
                value = json.loads(raw)
            except ValueError as error:
                raise PromptSetError(f"{path}:{line_number}: not valid JSON ({error}); expected one object "
                                     'like {"prompt": "...", ...} per line') from None
        if not isinstance(value, dict):
            raise PromptSetError(f"{path}:{line_number}: expected a JSON object, found {type(value).__name__}")
        yield line_number, value


def _prompt_of(path: Path, line_number: int, value: dict[str, Any]) -> str:
    prompt = value.get("prompt")
    if not isinstance(prompt, str):
        raise PromptSetError(f"{path}:{line_number}: field 'prompt' is {prompt!r}; expected a string")
    return prompt


def read_prompt_set(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Every record of a prompt-set file (none if it does not exist), validated field by field."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line_number, value in _jsonl_objects(path):
        prompt = _prompt_of(path, line_number, value)
        if not prompt.strip():
            raise PromptSetError(f"{path}:{line_number}: field 'prompt' is empty; expected a prompt")
        skill, source, max_rouge_l = value.get("skill"), value.get("source"), value.get("max_rouge_l")
        if not isinstance(skill, str) or not skill:
            raise PromptSetError(f"{path}:{line_number}: field 'skill' is {skill!r}; expected a skill name")
        if source not in SOURCES:
            raise PromptSetError(f"{path}:{line_number}: field 'source' is {source!r}; expected one of "
                                 f"{', '.join(SOURCES)}")
        if (isinstance(max_rouge_l, bool) or not isinstance(max_rouge_l, (int, float))
                or not math.isfinite(max_rouge_l) or not 0 <= max_rouge_l <= 1):
            raise PromptSetError(f"{path}:{line_number}: field 'max_rouge_l' is {max_rouge_l!r}; expected a "
                                 "number from 0 to 1")
        records.append(PromptRecord(prompt, skill, source, float(max_rouge_l)))
    return records


def read_prompt_objects(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every object of a JSONL file whose lines carry at least a string ``prompt`` (other fields kept)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: no such file; expected a JSONL file with one {{\"prompt\": ...}} per line")
    objects = []
    for line_number, value in _jsonl_objects(path):
        _prompt_of(path, line_number, value)
        objects.append(value)
    return objects


def read_prompt_lines(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a plain list (one a line; blank lines skipped) or, for ``.jsonl``, its ``prompt`` fields.

    Used for blocklists: a benchmark's prompts as text, or another prompt set.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: no such file; expected a text file with one prompt per line, or a .jsonl "
                             "prompt set")
    if path.suffix.lower() == ".jsonl":
        return [value["prompt"] for value in read_prompt_objects(path)]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def repair_torn_tail(path: str | os.PathLike[str]) -> bool:
    """Cut a torn final line off ``path`` (and end a complete one with its newline); True if it changed."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        complete = isinstance(json.loads(tail), dict)
    except ValueError:
        complete = False
    with path.open("r+b") as stream:
        if complete:
            stream.seek(0, os.SEEK_END)
            stream.write(b"\n")
        else:
            stream.truncate(cut)
        stream.flush()
        os.fsync(stream.fileno())
    return True


class PromptSetWriter:
    """Appends records to a prompt-set file: each line written and flushed at once, synced on :meth:`sync`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = self.path.open("a", encoding="utf-8")

    def write(self, record: PromptRecord) -> None:
        self._stream.write(record.to_json() + "\n")
        self._stream.flush()

    def sync(self) -> None:
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        if not self._stream.closed:
            self.sync()
            self._stream.close()

    def __enter__(self) -> "PromptSetWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def prompt_set_of(path: str | os.PathLike[str], records: Sequence[PromptRecord] | None = None) -> PromptSet:
    """The :class:`PromptSet` of a prompt-set file (its records may be passed if already read)."""
    records = read_prompt_set(path) if records is None else records
    if not records:
        raise PromptSetError(f"{path}: holds no prompts")
    return PromptSet(prompts=tuple(record.prompt for record in records), skill=records[0].skill, path=str(path))
