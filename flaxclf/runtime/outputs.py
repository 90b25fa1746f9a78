"""Folders that flaxclf writes into: written whole, with the process's umask, never touching a file it did not
write."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

MANIFEST = ".flaxclf-export.json"  # names the files of a flaxclf export; marks the folder as flaxclf's
_STAGING = ".flaxclf-export.tmp"  # where an export into an existing folder is written before it is moved in


class OutputError(ValueError):
    """An output path flaxclf must not write to; the message names what is there and what to do."""


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Gives a file or folder the mode a plain open()/mkdir() would have: some writers (safetensors, mkstemp,
    mkdtemp) make them private, and teammates sharing a run folder could not read them."""
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _check_target(out: Path, names: frozenset[str]) -> bool:
    """Whether `out` already exists (then it is empty or a flaxclf export); refuses anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder; name a new or empty folder to export into")
    present = _listing(out)
    ours = MANIFEST in present or _STAGING in present
    foreign = [n for n in present if n not in names | {MANIFEST, _STAGING}]
    if present and (not ours or foreign):
        shown = ", ".join((foreign or present)[:5]) + (", ..." if len(foreign or present) > 5 else "")
        raise OutputError(f"{out} already holds files flaxclf did not write ({shown}); export into a new or empty "
                          "folder, or move those files out first")
    return True


def write_folder(out: str | Path, write: Callable[[Path], None], names: frozenset[str]) -> Path:
    """Runs `write(folder)`, which writes only files named in `names`, and makes them the contents of `out`.

    A new `out` appears whole or not at all (written beside it, then renamed). An existing one must be empty or
    an earlier export of this kind (it has the manifest and only files named in `names`): each file is moved in
    whole, files of the earlier export that this one does not write are removed, and the manifest is written
    last, so an interrupted export is still recognised as flaxclf's and the next one replaces it. Anything else
    is refused before a byte is written. Returns `out` as an absolute path."""
    out = Path(out).expanduser().absolute()
    exists = _check_target(out, names)
    staging = out / _STAGING if exists else out.with_name(f".{out.name}{_STAGING}")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of an interrupted export (ours by its name)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        try:
            write(staging)
        except OSError as e:
            raise OutputError(f"could not write the export to {out} ({e.strerror}); nothing of it was left there: "
                              "free some space or choose another folder") from e
        written = _listing(staging)
        unknown = [n for n in written if n not in names]
        if unknown:
            raise AssertionError(f"export wrote files it did not declare: {unknown}")
        (staging / MANIFEST).write_text(json.dumps({"files": written}, indent=2) + "\n")
        apply_umask(staging)
        if not exists:
            staging.rename(out)
            return out
        previous = _previous_files(out)
        for name in written:
            os.replace(staging / name, out / name)
        for name in previous - set(written):
            if name in names:
                (out / name).unlink(missing_ok=True)
        os.replace(staging / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _previous_files(out: Path) -> set[str]:
    try:
        return set(json.loads((out / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()
