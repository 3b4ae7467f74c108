"""Atomic file writes: readers see the old file or the new one, never half of either.

Two kinds of file live under ``PROMPT_CAPTURE_HOME``:

* shared files (``private=False``, the default): what another process or Unix user must read —
  model directories, the serving pointer, metadata, cards, metrics, reports. They get the
  permissions the process umask allows (0644 under the usual 022), like any file ``open`` creates.
* private files (``private=True``): what holds raw prompts — the spool, exports, the inbox. 0600.

Every write goes to a temporary file in the same folder, is fsync'd and then ``os.replace``d over
the target, so a crash leaves the old content in place.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def process_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``; else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_file_mode() -> int:
    """Mode of a shared file: what ``open`` would give a new file (0o666 less the umask)."""
    return 0o666 & ~process_umask()


def shared_dir_mode() -> int:
    """Mode of a shared folder: what ``mkdir`` would give (0o777 less the umask)."""
    return 0o777 & ~process_umask()


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing and make it 0700; returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_bytes_atomic(path: Path, data: bytes, *, private: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically; returns ``path``.

    ``private``: 0600 (raw prompts); otherwise the umask's mode (files other users serve).
    Raises ``OSError`` from the file system; the temporary file is removed on any failure.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, PRIVATE_FILE_MODE if private else shared_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str, *, private: bool = False) -> Path:
    """``write_bytes_atomic`` of ``text`` encoded as UTF-8 (no BOM)."""
    return write_bytes_atomic(path, text.encode("utf-8"), private=private)


def write_json_atomic(path: Path, data: Any, *, private: bool = False) -> Path:
    """``data`` as indented, key-sorted JSON (``default=str`` for dates and paths)."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    return write_text_atomic(path, text, private=private)


def write_jsonl_atomic(path: Path, rows: Any, *, private: bool = False) -> Path:
    """One compact JSON object per line (an iterable of JSON-able values)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return write_text_atomic(path, text, private=private)
