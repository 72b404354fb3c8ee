"""Output folders of commands: never written over without --force, and with it only the files a command
owns are replaced."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError


def check_out(out: Path, force: bool, what: str) -> list[str]:
    """Refuse a file, or a non-empty directory unless forced; creates nothing. Returns what it holds."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file. Fix: choose a directory path")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not force:
        raise ConversionError(
            f"--out {out} is not empty (it holds {', '.join(present[:3])}"
            f"{', ...' if len(present) > 3 else ''}). Fix: choose a new directory, or pass "
            f"--force to {what}"
        )
    return present


def prepare_out(out: Path, force: bool, owned: tuple[str, ...], what: str) -> Path:
    """check_out, then with force delete only the files this command owns, and create the directory."""
    present = check_out(out, force, what)
    for pattern in owned if present else ():
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def script_out(out: str, force: bool, name: str) -> Path:
    """A benchmark script's --out for its one file `name`: prepare_out, with errors (a non-empty folder
    without --force, a path that is a file, OS errors) as one line."""
    try:
        return prepare_out(Path(out), force, (name,), f"replace {name}")
    except (ConversionError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
