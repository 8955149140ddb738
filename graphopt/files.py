"""Files written whole or not at all, and their checksums (artifacts, the TVM compile cache)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON with sorted keys (stable diffs), newline-terminated."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def temporary_sibling(out: Path) -> Path:
    """A new hidden folder next to `out`, with the permissions of an ordinary folder, in which
    to build what `move_into_place` then renames to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    temp.chmod(0o777 & ~umask)  # mkdtemp makes it private
    return temp


def move_into_place(temp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder `temp` to `out`; an existing `out` is replaced only with
    `overwrite`, and put back if the rename fails."""
    if not out.exists():
        temp.rename(out)
        return
    if not overwrite:
        raise ValueError(f"{out} appeared while exporting; pass overwrite=True to replace it")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        temp.rename(out)
    except OSError:
        old.rename(out)  # put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)
