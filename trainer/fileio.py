"""File helpers shared by the trainer (no ComfyUI): atomic, durable writes; telling a full disk from other
write errors; cleaning temporary files a killed process left; loading a module from a path."""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

#: errno values of "no room left": a full file system and an exhausted disk quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How libraries that lose the errno say it (safetensors' Rust writer: "... (os error 28)").
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded|"
                             rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b")
#: Temporary names: ``.<name>.tmp-<pid>`` (:func:`atomic_path`), ``.<name>.old-<pid>`` (:func:`remove_atomically`).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)$")


class DiskFullError(Exception):
    """A write failed because the disk (or the user's quota) is full. ``path``: the file being written.
    Not an ``OSError`` on purpose: code that skips unreadable inputs (``except OSError``) must not swallow it."""

    def __init__(self, path, cause: BaseException | None = None, message: str | None = None):
        self.path, self.cause = Path(path), cause
        super().__init__(message or f"the disk is full: could not write {self.path}")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the disk or the quota is full. torch and
    safetensors wrap the OS error (RuntimeError, SafetensorError), so their chain and text are searched too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_disk(path) -> str:
    """"N MB free on <mount point>" for the file system holding ``path`` (best effort: a message helper)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return f"file system of {p}"
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{free / 2 ** 20:.1f} MB free on {mount}"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it is made durable (fsync) and renamed onto
    ``path`` (``os.replace``, then the folder is fsynced), on error it is removed. Readers never see a
    half-written file (or folder), after a crash of the process or - thanks to the fsyncs - of the machine.
    A write that fails because the disk is full raises :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    _remove(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except DiskFullError as e:
        if tmp in e.path.parents:  # a file inside a folder being built: name it where it was going
            raise DiskFullError(path / e.path.relative_to(tmp), e.cause) from e.cause
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(path, e) from e
        raise
    finally:
        _remove(tmp)


def temp_name(path) -> Path:
    """Where :func:`atomic_path` builds ``path``: ``.<name>.tmp-<pid>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_atomically(path) -> None:
    """Remove a file or folder so that it is either all there or gone under its name: it is renamed to
    ``.<name>.old-<pid>`` first (a kill mid-way leaves that, which :func:`remove_stale_temps` cleans)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(trash)
    os.replace(path, trash)
    _remove(trash)


def fsync_path(p) -> None:
    """Flush a file's or a folder's data and metadata to the disk (power loss, not process death: the
    page cache of a killed process is written anyway). Folders: makes renames inside them durable."""
    if os.path.isdir(p):
        if not hasattr(os, "O_DIRECTORY"):  # Windows can't open a folder (NTFS journals the rename itself)
            return
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd = os.open(p, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # (Windows flushes writable handles only)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems can't fsync a folder; the data itself was flushed
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, through Python's own file object, so a full disk arrives as
    ``OSError(ENOSPC)`` (torch's and safetensors' own writers wrap or lose the errno)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def remove_stale_temps(folder, names=None) -> list[Path]:
    """Remove the temporary files and folders :func:`atomic_path` and :func:`remove_atomically` left in
    ``folder`` when their process was killed (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>`` of a process that
    no longer runs); ``names``: only those of these
    target names. Returns what was removed. They are never read (loaders open final names only)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if not m or (names is not None and m["name"] not in names) or _alive(int(m["pid"])):
            continue
        _remove(p)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine). On Windows always assumed to (``os.kill(pid, 0)`` would
    send it Ctrl-C there): its temporaries are then left alone, which is safe, as no loader reads them."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def load_module(path, name: str | None = None, register: bool = False) -> ModuleType:
    """Execute the Python file ``path`` as a module called ``name`` (default: the file's stem).
    ``register`` puts it in ``sys.modules`` (once: a second call returns the registered module)."""
    path = Path(path)
    name = name or path.stem
    if register and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"no Python file at {path}")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if register:
            sys.modules.pop(name, None)
        raise
    return module
