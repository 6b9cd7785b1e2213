"""Checkpoint files that survive a full disk, a kill and a move.

- :func:`atomic_save`: ``torch.save`` through a temporary file in the target's own directory, fsynced, then
  renamed over the target and the directory fsynced. A crash or a full disk at any moment leaves either the old
  file or the new one, whole. (A temporary file elsewhere, e.g. in ``$TMPDIR`` on another filesystem, would turn
  the final move into an in-place copy that a full disk or a kill cuts off.)
- :func:`read_checkpoint`: ``torch.load`` with an error that names the file, the role it was given in, and the
  fix when the file is truncated or not a checkpoint.
- Side files: large state that rarely changes (DisBack's recorded degradation path) is marked with
  :func:`side_file`; :func:`write_side_files` writes it once, next to the checkpoint, and leaves a reference in the
  checkpoint; :func:`side_file_state` reads either form back.
- :func:`check_writable`: fail at the start of a run, not after hours of training, when an output directory
  cannot be written.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SIDE_FILE = "lit_distill_side_file"  # the key that marks a side-file entry: {SIDE_FILE: name, "state" | "path": ...}
TEMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous file at that path is intact."""


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where the filesystem cannot fsync directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def temporary_files_of(path: Path) -> list[Path]:
    """Temporary files that :func:`atomic_save` of ``path`` leaves behind when it is killed mid-write."""
    return sorted(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see the module docstring); returns ``path``.

    Raises :class:`CheckpointWriteError` (an ``OSError`` with the original errno) naming ``path`` when the write
    fails, after removing the temporary file; whatever was at ``path`` before is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in temporary_files_of(path):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a failed write as a RuntimeError whose context is the OSError (ENOSPC, EFBIG, ...)
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointWriteError(
            cause.errno or errno.EIO,
            f"writing {path} failed ({cause.strerror or cause}); the previous {path.name}, if any, is intact. Free "
            "disk space (or fix the directory's permissions), then resume with --ckpt_path last (or that file)") from e
    fsync_directory(path.parent)
    return path


def read_checkpoint(path: str | Path, role: str = "checkpoint", weights_only: bool = False) -> dict:
    """``torch.load`` a checkpoint file onto the CPU. ``role`` names where the path was given (``"ckpt_path"``,
    ``"model"``, ``"teachers['brightness']"``) for the error, raised for a missing, truncated or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{role}={str(path)!r}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch reports truncation as RuntimeError, EOFError, UnpicklingError, ...
        text = str(e).strip()
        first_line = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise ValueError(
            f"{role}={str(path)!r} cannot be read as a checkpoint ({path.stat().st_size} bytes; {first_line}). It is "
            "truncated or corrupt, e.g. cut off by a full disk or a killed copy. Use an earlier checkpoint; "
            "DurableCheckpoint replaces last.ckpt atomically, so the last.ckpt it wrote is whole.") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{role}={str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


def check_writable(directory: str | Path, role: str) -> Path:
    """Create ``directory`` (and its parents) and write a test file in it; raise a ``ValueError`` naming
    ``role`` and the directory when that fails. Returns the directory."""
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ValueError(f"{role}: cannot write in {str(directory)!r} ({e.strerror or e}); choose a directory you "
                         "can write to or fix its permissions (checked before training, so no work is lost)") from e
    return directory


# -- side files -------------------------------------------------------------------------------------
def side_file(name: str, state: Any) -> dict:
    """Mark ``state`` (e.g. a state dict) to be kept in a file ``name`` of its own next to each checkpoint that
    contains it. ``name`` must be unique to this content (written once: an existing file is never rewritten)."""
    if Path(name).name != name:
        raise ValueError(f"side file name {name!r} must be a plain file name")
    return {SIDE_FILE: name, "state": state}


def is_side_file(entry: Any) -> bool:
    return isinstance(entry, dict) and SIDE_FILE in entry


def side_file_state(entry: Any) -> Any:
    """The state an entry stands for: a side file kept inline (``"state"``, what a plain ``torch.save`` of the
    checkpoint keeps) or on disk (``"path"``), a file path, or the state itself."""
    if isinstance(entry, (str, Path)):
        return torch.load(entry, map_location="cpu", weights_only=True)
    if not is_side_file(entry):
        return entry
    if "state" in entry:
        return entry["state"]
    path = Path(entry["path"])
    if not path.is_file():
        raise FileNotFoundError(f"side file {entry[SIDE_FILE]!r} of the checkpoint is missing (looked for {path}): "
                                "copy it along with the checkpoint (it lives in the checkpoint's directory)")
    return torch.load(path, map_location="cpu", weights_only=True)


def missing_side_files(entries: list) -> list[str]:
    """The files that entries of a loaded checkpoint (side files or plain paths) refer to and that do not exist."""
    missing = []
    for entry in entries:
        if isinstance(entry, (str, Path)) and not Path(entry).is_file():
            missing.append(str(entry))
        elif is_side_file(entry) and "state" not in entry and not Path(entry["path"]).is_file():
            missing.append(str(entry["path"]))
    return missing


def _map_side_files(obj: Any, fn) -> Any:
    """``obj`` with every side-file entry replaced by ``fn(entry)`` (dicts and lists copied where they change)."""
    if is_side_file(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_side_files(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_side_files(v, fn) for v in obj]
    return obj


def write_side_files(checkpoint: dict, directory: str | Path) -> dict:
    """The checkpoint with each side file written to ``directory/name`` (atomically, once: an existing file is
    kept) and replaced by a reference ``{SIDE_FILE: name, "path": absolute path}``."""
    directory = Path(directory).absolute()

    def write(entry: dict) -> dict:
        name = entry[SIDE_FILE]
        target = directory / name
        if not target.is_file():
            if "state" in entry:
                atomic_save(entry["state"], target)
            else:  # a reference into another directory (a resumed run that saves elsewhere): copy it once
                source = Path(entry["path"])
                if not source.is_file():
                    raise FileNotFoundError(f"side file {name!r} is missing at {source}: restore it to save checkpoints")
                tmp = target.with_name(f".{name}.copy{TEMP_SUFFIX}")
                shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
                fsync_directory(directory)
        return {SIDE_FILE: name, "path": str(target)}

    return _map_side_files(checkpoint, write)


def resolve_side_files(checkpoint: dict, directory: str | Path) -> dict:
    """Point every side-file reference of a loaded checkpoint at ``directory/name`` (the directory it was loaded
    from) when the file is there, so that a checkpoint directory moved as a whole still resolves."""
    directory = Path(directory).absolute()

    def resolve(entry: dict) -> dict:
        local = directory / entry[SIDE_FILE]
        return {**entry, "path": str(local)} if "state" not in entry and local.is_file() else entry

    return _map_side_files(checkpoint, resolve)
