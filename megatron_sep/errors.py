"""Errors and error text shared by every layer (imports nothing of the project)."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the fix."""

    def __init__(self, key: str, value, problem: str, fix: str):
        self.key, self.value = key, value
        super().__init__(f"config error: {key}={value!r}: {problem}. Fix: {fix}")


class ConversionError(ValueError):
    """A file to convert, import or write cannot be used; the message names the fix."""


def closest(name: str, options) -> str:
    """The fix for an unknown name: the closest valid one, or the list."""
    hit = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"did you mean '{hit[0]}'?" if hit else "valid keys: " + ", ".join(sorted(options))


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line, for a one-line error (some libraries raise with an empty message)."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
