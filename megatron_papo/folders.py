"""Output folders for the tools that never destroy data.

`check_output_folder` refuses an --out that holds something (unless the user said --overwrite) or
that is, contains or sits inside an input folder (always: writing it would delete the input).
Writers fill the folder `staged_folder` gives, next to --out, which is renamed to --out at the end:
a conversion that fails leaves --out as it was, and one killed half-way leaves at most a hidden
`.<name>.partial-*` folder, never a half-written folder under the final name. Single files the same
way: `write_text_atomic`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path


class OutputFolderError(ValueError):
    """--out would destroy data; the message names the folder and what to do."""


def check_output_folder(out: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Raise OutputFolderError unless `out` may be written. `inputs`: option name -> folder read."""
    real = out.resolve()
    for option, folder in inputs.items():
        source = folder.resolve()
        relation = ("is" if real == source else "is inside" if source in real.parents
                    else "contains" if real in source.parents else None)
        if relation:
            raise OutputFolderError(f"--out {out} {relation} {option} {folder}: writing it would destroy the "
                                    f"input, even with --overwrite; choose a folder outside {option}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputFolderError(f"--out {out} exists and is not a plain folder; expected a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(f"--out {out} is not empty; pass --overwrite to replace what it holds, "
                                f"or choose an empty or new folder")


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield a new empty hidden folder next to `out` (same filesystem: publishing is one rename);
    on success it replaces `out` (check_output_folder said that may go), on error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    os.replace(staging, out)  # onto a missing or empty folder: one atomic rename


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` next to its name (`<name>.tmp`), flushed to disk, then renamed onto it: a reader
    (or a kill) sees the old file or the new one, never part of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_folder(path: Path, with_files: bool = False) -> None:
    """Flush a folder's entries (renames into it), and with `with_files` its files, to disk. A
    filesystem that cannot sync a folder (EINVAL on some network and FUSE mounts) is left as it is."""
    if with_files:
        for f in path.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
