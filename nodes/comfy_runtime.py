"""The few places where nodes touch ComfyUI at run time: output folder, progress bar, browser events.

Every ComfyUI import happens inside a function, so this module (and the pack) imports where ComfyUI
is absent. A cancel press reaches a node through :meth:`NodeProgress.update`, which raises ComfyUI's
``InterruptProcessingException``; stages call it only where stopping loses nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def output_directory() -> Path:
    """ComfyUI's output folder (``--output-directory`` or ``ComfyUI/output``)."""
    import folder_paths

    return Path(folder_paths.get_output_directory())


def selma_output_path(*parts: str) -> Path:
    """A path under ``<output>/selma/``; callers pass names checked with ``trainer.storage.files.check_name``."""
    return output_directory().joinpath("selma", *parts)


def send_event(event: str, data: dict[str, Any]) -> None:
    """Send ``data`` to the browser as ``event`` (the web extension listens); a no-op without a server."""
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except (ImportError, AttributeError) as error:  # headless use, or a server that is not up
        log.debug("selma: event %s not sent: %s", event, error)


def check_interrupted() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` if the user pressed cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class NodeProgress:
    """ComfyUI's progress bar for one node; :meth:`update` raises when the user cancelled."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        import comfy.utils

        try:
            self._bar = comfy.utils.ProgressBar(total, node_id=node_id)
        except TypeError:  # releases whose ProgressBar takes no node_id
            self._bar = comfy.utils.ProgressBar(total)
        self.total = total

    def update(self, value: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self._bar.update_absolute(value, self.total)  # ComfyUI's hook raises here on cancel
        check_interrupted()  # and so do we where no hook is installed
