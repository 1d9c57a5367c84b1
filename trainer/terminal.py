"""Text from files made elsewhere, made safe to print on a terminal.

A LoRA's metadata, a file name in a shared archive, a prompt from a server: any of them can hold
escape sequences that retitle the terminal, clear it, hide text or (bidirectional overrides)
show characters in another order than they are. :func:`printable` shows such characters as
visible escapes instead, so what is printed is what the file holds.
"""

from __future__ import annotations

import re

# C0 controls (line breaks and tabs too: a value must not fake a line of its own), DEL, C1 controls, and the
# Unicode bidirectional marks, embeddings, overrides and isolates.
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every terminal control character written as ``\\xNN`` / ``\\uNNNN``."""
    return _TERMINAL_CONTROLS.sub(_escape, text)
