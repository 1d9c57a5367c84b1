"""Which files a workflow may make the server read or write: ComfyUI's own folders, nothing else.

Widget values are untrusted (ComfyUI runs any graph that reaches its port, and users load workflows
others shared), so every name or path a node turns into a file goes through one of these checks
before any work starts. Two rules, after ComfyUI's own:

- The input and output folders (uploads, results) are checked with symlinks followed: a link in
  them that points elsewhere is refused, whatever the name says.
- The model folders are the owner's: a name or a path in them is taken as written, and a link the
  owner put there is followed, as ComfyUI's own loaders do. A name or path that leaves them is refused.

Messages name the widget and show the value only as a short ``repr``; they never show a file's content.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..trainer.render.dataset import resolve_dataset_folder
from .comfy_runtime import output_directory, selma_output_path

MAX_PATH = 4096  # PATH_MAX on Linux: longer values are no path any system opens
MAX_COMPONENT = 255  # NAME_MAX, in bytes
SHOWN_CHARACTERS = 200


def shown(value: str) -> str:
    """``value`` for a message: its ``repr`` (control characters escaped), cut short."""
    text = value if len(value) <= SHOWN_CHARACTERS else value[:SHOWN_CHARACTERS] + "…"
    return repr(text)


def _checked_text(value: str, field: str) -> str:
    text = value.strip()
    if any(ord(character) < 32 or ord(character) == 127 for character in text):
        raise ValueError(f"{field}: {shown(text)} holds a control character (NUL, newline, …); expected a file "
                         "name or path")
    if len(text) > MAX_PATH or any(len(part.encode()) > MAX_COMPONENT for part in Path(text).parts):
        raise ValueError(f"{field}: {shown(text)} is too long for a path ({len(text)} characters; at most "
                         f"{MAX_COMPONENT} bytes per name)")
    return text


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path.is_relative_to(folder) for folder in folders)


def input_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def user_path(value: str, field: str, folders: Sequence[Path], relative_to: Path, purpose: str) -> Path:
    """``value`` (absolute, or relative to ``relative_to``; ``~`` is no home folder) with symlinks resolved, if it
    lies in one of ``folders`` (resolved too); raises naming ``field`` otherwise. ``purpose`` says what they are."""
    text = _checked_text(value, field)
    resolved = (Path(text) if os.path.isabs(text) else relative_to / text).resolve()
    if not _inside(resolved, [folder.resolve() for folder in folders]):
        raise ValueError(f"{field}: {shown(text)} is outside {purpose}")
    return resolved


def model_path(value: str, field: str, roots: Sequence[Path], what: str, file_only: bool = False) -> Path:
    """A file (or folder, unless ``file_only``) in one of ComfyUI's model folders ``roots``: a name relative to
    one of them, or an absolute path inside one, taken as written (the owner's links are followed, as ComfyUI's
    loaders follow them); raises naming ``field``."""
    text = _checked_text(value, field)
    where = " or ".join(str(root) for root in roots)
    normal = Path(os.path.normpath(text))
    if normal.is_absolute():
        if not _inside(normal, [Path(os.path.normpath(root)) for root in roots]):
            raise ValueError(f"{field}: {shown(text)} is outside ComfyUI's model folders ({where}); a workflow may "
                             f"load {what} only from there")
        candidates = [normal]
    elif normal.parts and normal.parts[0] == "..":
        raise ValueError(f"{field}: {shown(text)} leaves ComfyUI's model folders ({where}); expected {what} given "
                         "by its name in them")
    else:
        candidates = [Path(root) / normal for root in roots]
    found = next((candidate for candidate in candidates
                  if (candidate.is_file() if file_only else candidate.exists())), None)
    if found is None:
        raise ValueError(f"{field}: {shown(text)} is not in {where}; expected {what} there")
    return found


def writable_path(value: str, field: str) -> Path:
    """A path a node may write to: inside ComfyUI's output folder (symlinks followed)."""
    output = output_directory()
    return user_path(value, field, [output], output,
                     f"ComfyUI's output folder ({output}), the only place a workflow may make the server write to")


def readable_path(value: str, field: str, relative_to: Path) -> Path:
    """An existing path a node may read: inside ComfyUI's input or output folder (symlinks followed)."""
    folders = [input_folder(), output_directory()]
    path = user_path(value, field, folders, relative_to,
                     f"ComfyUI's input and output folders ({folders[0]}, {folders[1]}), the only files a workflow "
                     "may make the server read")
    if not path.exists():
        raise ValueError(f"{field}: {shown(value.strip())} does not exist (looked for {path})")
    return path


def dataset_folder(value: str, field: str, writing: bool) -> Path:
    """A dataset folder a widget names: a plain name under ``output/selma/datasets`` or an absolute path, which
    must lie in the output folder (``writing``; the Render node) or the input or output folder (the Train node).

    The folder is returned as named (links kept: the name is the user's); the check follows the links.
    """
    folder = resolve_dataset_folder(_checked_text(value, field), selma_output_path("datasets"), field)
    if writing:
        writable_path(str(folder), field)
    else:
        readable_path(str(folder), field, selma_output_path("datasets"))
    return folder


def model_folder_paths(*folder_names: str) -> list[Path]:
    """The folders ComfyUI keeps these kinds of model in (``models/<name>`` and any extra model paths)."""
    import folder_paths

    return [Path(path) for name in folder_names for path in folder_paths.get_folder_paths(name)]


def models_root() -> Path:
    """ComfyUI's ``models`` folder."""
    import folder_paths

    return Path(folder_paths.models_dir)
