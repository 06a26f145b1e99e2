"""Where rlvrw keeps its files, and writes that readers see whole or not at all.

The cache directory (generated datasets, converted weights) is ``$RLVRW_CACHE`` when set, else ``~/.cache/rlvrw``.
Every file or directory rlvrw writes for later reading (checkpoints, caches, datasets, results) goes through the
``write_*`` functions: into a temporary sibling, then one rename (``os.replace``). The temporary lives in the target's
directory, so the rename never crosses file systems; it is removed if the write fails. Data reach the disk before the
rename (fsync of the file, and of a directory's files and the directory itself), and the rename itself is made
durable (fsync of the parent directory).

A published directory (``publish_directory``, ``write_directory``: checkpoints, models) holds ``manifest.json``: the
size and sha256 of each of its files. ``verify_directory`` checks them before anything is loaded and names the first
file that is missing, truncated, empty or changed (``CorruptFileError``). Standard library only, so every layer may
import this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from rlvrw.usage import UsageError

CACHE_ENV = "RLVRW_CACHE"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "rlvrw-manifest-1"


class CorruptFileError(UsageError):
    """A file that does not hold what was written (size, checksum) or cannot be read. The message names it."""


def cache_dir(*parts: str) -> Path:
    """The cache directory, or a subdirectory of it, created if missing."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "rlvrw")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex}")


def write_file(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a fresh binary file beside ``path`` (mode 0666 less the umask), flush it to disk, then
    rename it to ``path``. If ``write`` raises, ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_file(path, lambda f: f.write(data))


def write_json(path: str | Path, value) -> Path:
    """``value`` as indented JSON."""
    return write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def fsync_directory(path: str | Path) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable. A no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; there is nothing more to do
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _directory_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def seal_directory(directory: str | Path) -> None:
    """fsync every file under ``directory``, write its ``manifest.json`` (each file's size and sha256), and fsync
    the directories."""
    directory = Path(directory)
    entries = {}
    for path in _directory_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        entries[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    write_json(directory / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": entries})
    for folder in {path.parent for path in _directory_files(directory)} | {directory}:
        fsync_directory(folder)


def read_manifest(directory: str | Path) -> dict | None:
    """The ``{name: {"size", "sha256"}}`` of a sealed directory, None for one without a manifest (written before
    manifests existed); CorruptFileError when the manifest itself is unreadable."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(entries, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        return {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{directory}: {MANIFEST_FILE} cannot be read ({type(err).__name__}: {err})") from err


def verify_directory(directory: str | Path) -> bool:
    """Check every file of ``directory``'s manifest against its recorded size and sha256; CorruptFileError naming
    the first that is missing, truncated, empty or changed. Returns False when there is no manifest (nothing to
    check against), True when every file checked out."""
    directory = Path(directory)
    entries = read_manifest(directory)
    if entries is None:
        return False
    for name, (size, digest) in sorted(entries.items()):
        path = directory / name
        if not path.is_file():
            raise CorruptFileError(f"{path}: missing (the manifest of {directory} lists it)")
        actual = path.stat().st_size
        if actual != size:
            state = "empty (0 bytes)" if actual == 0 else f"truncated ({actual} bytes)" if actual < size \
                else f"{actual} bytes"
            raise CorruptFileError(f"{path}: {state}, but {size} bytes were written")
        if sha256_file(path) != digest:
            raise CorruptFileError(f"{path}: corrupt (its sha256 differs from the one recorded when it was written)")
    return True


def publish_directory(tmp: str | Path, final: str | Path) -> None:
    """Seal the complete directory ``tmp`` (``seal_directory``: fsync and manifest) and rename it to ``final``. A
    directory cannot be replaced in one step, so an existing ``final`` is moved aside first, put back if the rename
    fails, and deleted once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    seal_directory(tmp)
    aside = _sibling(final, "old") if final.exists() else None
    if aside is not None:
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    fsync_directory(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_directory(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory beside ``path``, then publish it as ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        publish_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
