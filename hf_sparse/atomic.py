"""Atomic writes that never lose a user's files: one helper for files, one for whole output directories.

Files: written to a temp file beside the target, fsynced, then ``os.replace``d over it (readers never see half a
file). Directories (exports, one-shot outputs): written into a temp directory beside the target, fsynced, then
renamed into place. An existing target is replaced only when that is safe:

- it is empty, or it is a previous output of hf_sparse (it holds the :data:`MARKER_NAME` file this module
  writes, listing the files it wrote, and nothing else has been added since; or, for outputs written before
  the marker existed, an ``hf_sparse`` config / one-shot report), or the caller passed ``overwrite=True``;
- and never when it is the source being read, contains the source, or is the current directory or a parent of it
  (not even with ``overwrite=True``).

Otherwise :class:`OutputDirectoryError` names the path and says what to do. Leftovers of a killed run
(``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) are cleaned by the next run, and a kill between the two renames of a
replacement (target moved aside, new one not yet in place) is recovered: the previous output is put back.
Stdlib only: every layer of the package may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

__all__ = [
    "MARKER_NAME", "OutputDirectoryError", "atomic_directory", "atomic_write", "atomic_write_json", "atomic_write_text",
    "fsync_tree", "is_previous_output", "recover_interrupted",
]

PathLike = Union[str, "os.PathLike[str]"]

#: written into every directory :func:`atomic_directory` produces: what wrote it and which files it holds.
MARKER_NAME = "_hf_sparse_output.json"
_LEGACY_REPORTS = ("hf_sparse_oneshot.json",)


class OutputDirectoryError(FileExistsError):
    """An output directory cannot be written without destroying something that is not ours to delete."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a crash after the rename cannot expose empty files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(temp_path)`` (e.g. ``save_file``, ``fig.savefig``) on a temp file beside ``path``, fsync it, then
    rename it over ``path``: readers see the old file or the new one, never half of one; a failure leaves no temp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(text: str, path: PathLike) -> Path:
    """``text`` written atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(obj: object, path: PathLike, **dumps_kwargs) -> Path:
    """JSON written atomically (see :func:`atomic_write_text`); ``dumps_kwargs`` go to ``json.dumps``."""
    dumps_kwargs.setdefault("indent", 2)
    dumps_kwargs.setdefault("default", str)
    return atomic_write_text(json.dumps(obj, **dumps_kwargs) + "\n", path)


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def is_previous_output(directory: Path) -> bool:
    """True when ``directory`` holds an hf_sparse output and nothing a user added to it since."""
    marker = directory / MARKER_NAME
    if marker.is_file():
        try:
            written = set(json.loads(marker.read_text(encoding="utf-8")).get("files", []))
        except (OSError, ValueError, AttributeError):
            return False
        return _files_under(directory) - {MARKER_NAME} <= written
    # outputs written before the marker: an hf_sparse export config, or a one-shot report
    if any((directory / name).is_file() for name in _LEGACY_REPORTS):
        return True
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "hf_sparse"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[tuple[Path, Optional[int]]]:
    """``(path, pid)`` of ``.NAME.<kind>-PID-TAG`` folders beside ``out`` (pid None when unparsable)."""
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}-*"):
        pid_text = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
        found.append((p, int(pid_text) if pid_text.isdigit() else None))
    return found


def recover_interrupted(out_dir: PathLike) -> None:
    """Clean what a killed run left beside ``out_dir``; put back a previous output that a kill left aside."""
    out = Path(out_dir).resolve()
    if not out.parent.is_dir():
        return
    dead = lambda pid: pid is None or not _pid_alive(pid)  # noqa: E731
    for tmp, pid in _leftovers(out, "tmp"):
        if dead(pid):
            shutil.rmtree(tmp, ignore_errors=True)
    olds = [p for p, pid in _leftovers(out, "old") if dead(pid)]
    if olds and not out.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, out)  # the kill came between "target aside" and "new one in place"
        olds.remove(newest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _is_same_or_inside(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output_directory(out: Path, overwrite: bool = False, sources: Iterable[PathLike] = (),
                           argument: str = "out_dir") -> None:
    """Raise :class:`OutputDirectoryError` unless writing ``out`` can destroy nothing of the user's."""
    cwd = Path.cwd().resolve()
    if _is_same_or_inside(cwd, out):
        raise OutputDirectoryError(
            f"argument `{argument}`={str(out)!r} is the current directory or a parent of it; replacing it would delete "
            f"your working files. Choose a new subdirectory, e.g. {str(out / 'export')!r}"
        )
    for source in sources:
        src = Path(source).resolve()
        if _is_same_or_inside(src, out):
            raise OutputDirectoryError(
                f"argument `{argument}`={str(out)!r} is or contains the source being exported ({str(src)!r}); "
                f"replacing it would delete the source. Choose another output directory"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirectoryError(f"argument `{argument}`={str(out)!r} exists and is not a directory")
    if overwrite or not any(out.iterdir()) or is_previous_output(out):
        return
    raise OutputDirectoryError(
        f"argument `{argument}`={str(out)!r} exists and holds files that hf_sparse did not write; nothing was changed. "
        f"Choose a new directory, or pass overwrite=True (CLI: --overwrite) to replace it and everything in it"
    )


@contextlib.contextmanager
def atomic_directory(out_dir: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = (),
                     writer: str = "hf_sparse", argument: str = "out_dir") -> Iterator[Path]:
    """Yield a fresh temp directory; on success it replaces ``out_dir`` (if that is safe, see the module), on error
    it disappears and ``out_dir`` is untouched.

    ``sources``: local paths being read (never replaced); ``writer``: recorded in the marker file.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    check_output_directory(out, overwrite, sources, argument)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(_files_under(tmp) - {MARKER_NAME})
        (tmp / MARKER_NAME).write_text(json.dumps({"writer": writer, "files": files}, indent=1) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        check_output_directory(out, overwrite, sources, argument)  # the target may have changed while we wrote
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # put the earlier output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
