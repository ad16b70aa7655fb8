"""The one way semibench writes a file that others read while it runs or after a kill."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], None], *,
                 encoding: str = "utf-8") -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path, e.g. ``torch.save``)
    to a hidden temporary sibling, then rename it over ``path``: a reader, a resumed run or
    Snakemake never sees a partial file, and a failed write leaves no temporary behind. Text is
    written with ``\\n`` line ends on every platform (split files are compared byte for byte)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "w", encoding=encoding, newline="\n") as f:
                f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON (non-JSON values as ``str``), written atomically."""
    return write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


@contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """A folder written whole or not at all: the block fills a hidden temporary sibling (yielded),
    which replaces ``out`` (absent or an empty folder) when the block succeeds; on an error
    nothing is left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
