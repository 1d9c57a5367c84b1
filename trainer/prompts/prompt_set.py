"""The prompt-set file: JSONL, one ``{"prompt", "skill", "source", "max_rouge_l"}`` object a line.

``source`` is ``seed`` (a seed prompt the pool started from), ``llm`` (written by an LLM) or
``template`` (the offline writer); ``max_rouge_l`` is the prompt's highest ROUGE-L F-measure
against the prompts before it in the file (0.0 for the first).

The file grows one line per accepted prompt, so a run that dies leaves every prompt it accepted.
Each line goes to the file in one ``write`` call and a failed write is cut back off, so the writer
leaves no half line behind. Reading it back, every malformed line is an error naming the file and
the line number, the last line included: it means the file was edited or damaged (or is not a
prompt set at all), and guessing would silently lose or invent prompts. A final line that is
whole but lacks its newline is fine; the writer ends it before appending.

Messages name the file, the line and the field, never the text: the file is whatever a user or a
workflow named (a blocklist may be any file on disk), and a message can reach whoever queued the work.
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
    """(line number, object) for each line; any line that is not one JSON object raises."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the text after the final newline
    for index, raw in enumerate(lines):
        line_number = index + 1
        if not raw.strip():
            raise PromptSetError(f"{path}:{line_number}: empty line; every line must hold one JSON object "
                                 "(delete the empty line)")
        try:
            value = json.loads(raw)
        except ValueError as error:
            unended = index == len(lines) - 1 and not data.endswith(b"\n")
            cut = " and no newline at its end: a damaged or cut-off last line" if unended else ""
            raise PromptSetError(f"{path}:{line_number}: not valid JSON ({_json_problem(error)}){cut}; expected "
                                 'one object like {"prompt": "...", ...} per line') from None
        if not isinstance(value, dict):
            raise PromptSetError(f"{path}:{line_number}: expected a JSON object, found {type(value).__name__}")
        yield line_number, value


def _json_problem(error: ValueError) -> str:
    """What is wrong, without the text: a decode error's message quotes the bytes it met."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    return "not UTF-8 text"


def _prompt_of(path: Path, line_number: int, value: dict[str, Any]) -> str:
    prompt = value.get("prompt")
    if not isinstance(prompt, str):
        found = "missing" if prompt is None else f"a {type(prompt).__name__}"
        raise PromptSetError(f"{path}:{line_number}: field 'prompt' is {found}; expected a string")
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
            raise PromptSetError(f"{path}:{line_number}: field 'skill' is missing or not a name; expected a skill "
                                 "name")
        if source not in SOURCES:
            raise PromptSetError(f"{path}:{line_number}: field 'source' is missing or unknown; expected one of "
                                 f"{', '.join(SOURCES)}")
        if (isinstance(max_rouge_l, bool) or not isinstance(max_rouge_l, (int, float))
                or not math.isfinite(max_rouge_l) or not 0 <= max_rouge_l <= 1):
            raise PromptSetError(f"{path}:{line_number}: field 'max_rouge_l' is missing or out of range; expected "
                                 "a number from 0 to 1")
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


@dataclass(frozen=True)
class PromptList:
    """Prompts read from a file someone named (a blocklist), with the line each came from, for messages."""

    path: Path
    prompts: tuple[str, ...]
    line_numbers: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def line_of(self, prompt: str) -> int:
        """The first line holding ``prompt`` (for messages, which name lines, not text)."""
        return self.line_numbers[self.prompts.index(prompt)]


def read_prompt_lines(path: str | os.PathLike[str]) -> PromptList:
    """Prompts from a plain list (one a line; blank lines skipped) or, for ``.jsonl``, its ``prompt`` fields.

    Used for blocklists: a benchmark's prompts as text, or another prompt set.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: no such file; expected a text file with one prompt per line, or a .jsonl "
                             "prompt set")
    numbered = []
    if path.suffix.lower() == ".jsonl":
        for line_number, value in _jsonl_objects(path):
            numbered.append((line_number, _prompt_of(path, line_number, value)))
    else:
        for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise PromptSetError(f"{path}:{line_number}: not UTF-8 text; expected one prompt per line") from None
            if text:
                numbered.append((line_number, text))
    return PromptList(path, tuple(prompt for _, prompt in numbered), tuple(number for number, _ in numbered))


class PromptSetWriter:
    """Appends records to a prompt-set file, one ``write`` call a line; synced on :meth:`sync`.

    Open it only on a file already read as a prompt set: a whole last line without its newline is
    ended first. A write that fails part-way (a full disk) is cut back off, so no half line stays.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._descriptor: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._size = os.fstat(self._descriptor).st_size
        if self._size and not self._ends_with_newline():
            self._append(b"\n")

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as stream:
            stream.seek(-1, os.SEEK_END)
            return stream.read(1) == b"\n"

    def _append(self, data: bytes) -> None:
        assert self._descriptor is not None, "the writer is closed"
        written = 0
        try:
            while written < len(data):
                written += os.write(self._descriptor, data[written:])
        except BaseException:
            os.ftruncate(self._descriptor, self._size)
            raise
        self._size += len(data)

    def write(self, record: PromptRecord) -> None:
        self._append((record.to_json() + "\n").encode("utf-8"))

    def sync(self) -> None:
        if self._descriptor is not None:
            os.fsync(self._descriptor)

    def close(self) -> None:
        if self._descriptor is not None:
            self.sync()
            os.close(self._descriptor)
            self._descriptor = None

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
