"""Write-then-rename: every file the project writes appears whole or not at all.

A crash, a full disk or a second process reading mid-write never sees half a file: each writer
fills a temporary file in the same folder and renames it over the target (atomic on POSIX and NTFS).
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(temp path)` in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's mode, as open() gives
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: Path, obj) -> None:
    """Indented JSON; numpy and torch scalars are written as floats."""
    write_text(path, json.dumps(obj, indent=1, default=float))


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """A header and one line per row; `fields` (default: the keys of all rows, in first-seen order)."""
    fields = fields or list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def torch_save(obj, path: Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))
