"""SHA-256 of a base model, computed once per file version and remembered.

A LoRA's metadata names the base model by its SHA-256 (what A1111, Civitai and kohya's
``ss_new_sd_model_hash`` use; A1111's short "AutoV2" hash is its first 10 hex digits), and the
training caches are keyed by it. Hashing a 7 GB SDXL checkpoint takes a while, so the result is kept
in ``<SELMA cache>/model-hashes.json`` under the file's path, size and modification time: a changed
file is hashed again, an unchanged one never.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..storage.files import atomic_write_json
from .configs import cache_root

_CHUNK = 16 * 1024 * 1024
_RECORD_FILE = "model-hashes.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of one file (hex), remembered across runs while the file is unchanged."""
    source = Path(path).resolve()
    status = source.stat()
    record_key = f"{source}|{status.st_size}|{status.st_mtime_ns}"
    record_path = cache_root() / _RECORD_FILE
    records = _read_records(record_path)
    if record_key in records:
        return records[record_key]
    digest = hashlib.sha256()
    with source.open("rb") as stream:
        while block := stream.read(_CHUNK):
            digest.update(block)
    records = _read_records(record_path)  # another process may have added entries meanwhile
    records[record_key] = digest.hexdigest()
    try:
        atomic_write_json(record_path, records)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return digest.hexdigest()


def model_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a single-file checkpoint, or of a diffusers folder (over its files' names and hashes)."""
    source = Path(path)
    if source.is_file():
        return file_sha256(source)
    digest = hashlib.sha256()
    for file_path in sorted(source.rglob("*")):
        relative = file_path.relative_to(source)
        if file_path.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{file_sha256(file_path)}\0".encode())
    return digest.hexdigest()


def _read_records(record_path: Path) -> dict[str, str]:
    try:
        records = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}
