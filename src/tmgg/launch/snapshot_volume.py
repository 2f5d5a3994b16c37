"""transport=local: a directory standing in for a Modal Volume, with a volume's semantics.

modal 1.6.4 documents a mounted Volume as a container's own view: changes become
visible to other containers only when committed, and a container sees other
containers' commits only after it reloads (``Volume.commit``, ``Volume.reload``; last
write wins per file). A container lost before committing loses what it wrote since.

Here each local container works on its own copy of ``local_volume_dir`` (its *view*,
taken when it starts and refreshed at each reload) mounted over the volume's path in
a private mount namespace (Linux ``unshare``), so its jobs see the volume at the same
path as every other container and as the launcher, while the real directory (the
committed state, what the launcher and later containers read) is only reachable
through a private mount point used by ``commit``. Uncommitted writes are never in
the real directory; a killed container's vanish with its view.

Where mount namespaces are not available (``supported()`` says), a container works
on the directory in place, as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

SNAPSHOTS_ENV = "TMGG_LOCAL_VOLUME_SNAPSHOTS"  # set (by the launcher) to use views
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

PARTIAL = ".tmgg-partial"  # a file being copied in, not yet in place
Manifest = dict[str, tuple[int, int]]  # relative path -> (mtime_ns, size)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _private_mount_namespace() -> None:
    """Enter a mount namespace of this process's own (as root, or in a user namespace)."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        uid, gid = os.getuid(), os.getgid()
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def _bind(source: Path, target: Path) -> None:
    _check(_libc().mount(str(source).encode(), str(target).encode(), None, MS_BIND, None),
           f"mount --bind {source} {target}")


def supported() -> bool:
    """Whether a process here can have private mounts (probed in a child process)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            _private_mount_namespace()
        except OSError:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _manifest(root: Path) -> Manifest:
    files: Manifest = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if name.endswith(PARTIAL) or path.is_symlink() or not path.is_file():
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
            files[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size)
    return files


def _copy(source: Path, target: Path) -> None:
    """Copy one file, replacing ``target`` atomically (a reader never sees half of it)."""
    _put_in_place(_stage(source, target))


def _stage(source: Path, target: Path) -> tuple[Path, Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}{PARTIAL}")
    shutil.copy2(source, partial)
    return partial, target


def _put_in_place(*staged: tuple[Path, Path]) -> None:
    for partial, target in staged:
        os.replace(partial, target)


class SnapshotVolume:
    """This container's view of the volume at ``path``: see the module docstring."""

    def __init__(self, path: Path, views_dir: Path) -> None:
        self.path = Path(path).resolve()
        own = Path(views_dir) / f"container-{os.getpid()}"
        self.view = own / "view"  # this container's copy, mounted at ``path``
        self.committed = own / "committed"  # the real directory, for commits only
        self.base: Manifest = {}  # the view's files as of the last commit or reload

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.view.mkdir(parents=True, exist_ok=True)
        self.committed.mkdir(parents=True, exist_ok=True)
        _private_mount_namespace()
        _bind(self.path, self.committed)
        _bind(self.view, self.path)
        self.reload()

    def real(self, path: Path) -> Path:
        """Where a path under the volume is in the real directory (bypassing the view)."""
        try:
            return self.committed / Path(path).resolve().relative_to(self.path)
        except ValueError:
            return Path(path)

    def commit(self) -> int:
        """Write this view's changes (since the last commit or reload) to the real
        directory, then reload; files written."""
        now = _manifest(self.view)
        changed = [name for name, seen in now.items() if self.base.get(name) != seen]
        # Copied first, then renamed into place together: a commit lands (nearly) as
        # one, as Modal's does; a container lost while copying commits nothing.
        _put_in_place(*[_stage(self.view / name, self.committed / name)
                        for name in changed])
        for name in set(self.base) - set(now):  # deleted here since the last sync
            with _suppress_missing():
                (self.committed / name).unlink()
        self.base = now
        self.reload()
        return len(changed)

    def reload(self) -> int:
        """Take other containers' commits into this view; files taken. (Writes of this
        container not committed yet are kept: Modal may commit them implicitly here.)"""
        now = _manifest(self.view)
        mine = {name for name, seen in now.items() if self.base.get(name) != seen}
        committed = _manifest(self.committed)
        taken = 0
        for name, seen in committed.items():
            if name in mine or now.get(name) == seen:
                continue
            _copy(self.committed / name, self.view / name)
            taken += 1
        for name in set(self.base) - set(committed) - mine:  # deleted by another's commit
            with _suppress_missing():
                (self.view / name).unlink()
        self.base = {name: seen for name, seen in _manifest(self.view).items()
                     if name not in mine}
        return taken


class _suppress_missing:  # noqa: N801 - a tiny context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, *_: object) -> bool:
        return isinstance(error, OSError) and error.errno == errno.ENOENT


# The view of the container running in this process, once mounted.
_CURRENT: dict[str, SnapshotVolume] = {}


def mount_for_container(volume: str, views_dir: str) -> SnapshotVolume:
    snapshot = SnapshotVolume(Path(volume), Path(views_dir))
    snapshot.mount()
    _CURRENT["volume"] = snapshot
    return snapshot


def current() -> SnapshotVolume | None:
    return _CURRENT.get("volume")


def remove_stale_views(views_dir: Path) -> None:
    """Delete the views of containers that are gone (a lost one's uncommitted writes)."""
    if not Path(views_dir).is_dir():
        return
    for own in Path(views_dir).glob("container-*"):
        try:
            os.kill(int(own.name.split("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(own, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
