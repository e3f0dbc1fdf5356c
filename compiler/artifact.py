"""Write an artifact atomically.

Protocol (THREATS 17-19):
1. Take an exclusive lock `.NAME.lock` beside the output (two compiles to one
   output: the second fails at once instead of interleaving files). The lock
   file exists only while a compile runs.
2. Remove leftovers of killed compiles (`.NAME.tmp-*`), which we may do since we
   hold the lock.
3. Write every file into a fresh temp dir beside the output (same filesystem),
   hashing while writing; fsync each file.
4. Write manifest.json last, fsync the temp dir.
5. Publish: rename the temp dir to the output; if an earlier artifact is there,
   swap the two atomically (renameat2 RENAME_EXCHANGE) and then delete the old
   one. There is never a half-written artifact at the output path, and a
   failure at any step leaves an earlier artifact intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ..errors import CompileError
from ..runtime.manifest import MAGIC, MANIFEST_NAME, MAX_MANIFEST_BYTES, seal

_RENAME_EXCHANGE = 2


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    res = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    """Remove a directory tree, or a symlink itself (rmtree refuses symlinks)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def is_artifact(path: Path) -> bool:
    try:
        with open(path / MANIFEST_NAME, "rb") as f:
            return json.loads(f.read(MAX_MANIFEST_BYTES).decode()).get("magic") == MAGIC
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def _remove_orphans(parent: Path) -> None:
    """Remove other outputs' temp dirs whose compile died (killed, or a native
    abort no Python handler sees): `.X.kiln.tmp-PID-*` with no process PID.
    A live PID (another compile right now) is left alone."""
    for tmp in parent.glob(".*.tmp-*-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(tmp)
        except PermissionError:
            pass  # alive, another user's


class HashingWriter:
    """A binary file writer that hashes what it writes and fsyncs on close."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "xb")  # noqa: SIM115
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        try:
            self.f.write(mv)
        except BaseException:
            self.f.close()  # the caller may not get to close() (disk full): don't leak the descriptor
            raise
        self.sha.update(mv)
        self.size += mv.nbytes

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"sha256": self.sha.hexdigest(), "size": self.size}


def hash_file(path: Path) -> dict:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return {"sha256": sha.hexdigest(), "size": size}


class ArtifactWriter:
    """Context manager: `with ArtifactWriter(out) as w: ...; w.commit(manifest)`."""

    def __init__(self, output: Path):
        self.output = Path(os.path.abspath(output))
        self.parent = self.output.parent
        self.files: dict[str, dict] = {}
        self.tmp: Path | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> "ArtifactWriter":
        _check_place(self.output)
        self._lock()
        for leftover in self.parent.glob(f".{self.output.name}.tmp-*"):
            _remove(leftover)
        _remove_orphans(self.parent)
        for leftover in self.parent.glob(f".{self.output.name}.old-*"):
            _remove(leftover)
        self.tmp = self.parent / f".{self.output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.tmp.mkdir()
        except OSError as err:
            self._unlock()
            raise CompileError(f"cannot write to {self.parent}: {err.strerror}") from None
        return self

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def open(self, rel: str) -> HashingWriter:
        return HashingWriter(self.path(rel))

    def record(self, rel: str, info: dict | None = None) -> None:
        """Record a finished file's hash (computed now unless given)."""
        p = self.tmp / rel
        if info is None:
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            info = hash_file(p)
        self.files[rel] = info

    def seal(self, manifest: dict) -> Path:
        """Write manifest.json into the staging directory, which is then a loadable
        artifact at the returned path (the quality gate measures the artifact it
        is about to publish there); nothing is published. May be called again:
        the last manifest written is the one commit() publishes."""
        manifest = seal({**manifest, "files": dict(sorted(self.files.items()))})
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        with open(self.tmp / MANIFEST_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return self.tmp

    def commit(self, manifest: dict) -> None:
        self.seal(manifest)
        for d in {self.tmp, *[(self.tmp / r).parent for r in self.files]}:
            fsync_dir(d)
        if self.output.exists():
            if _exchange(self.tmp, self.output):
                old = self.tmp  # after the swap the temp name holds the old artifact
            else:
                old = self.parent / f".{self.output.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.output, old)
                try:
                    os.rename(self.tmp, self.output)
                except BaseException:
                    os.rename(old, self.output)  # put the earlier artifact back
                    raise
            _remove(old)
        else:
            os.rename(self.tmp, self.output)
        fsync_dir(self.parent)
        self.tmp = None

    def _lock(self) -> None:
        """Hold `.NAME.lock` for the whole compile. The file exists only while a
        compile runs: the holder unlinks it before unlocking, so a compile that
        locked a file someone has since unlinked retries on a fresh one."""
        self._lock_path = lock_path(self.output)
        while True:
            try:
                fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as err:
                raise CompileError(f"cannot write to {self.parent}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CompileError(f"{self.output}: another kiln compile is writing this artifact right now") from None
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)  # unlinked by the compile that held it just before us: lock the new file

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)  # still holding the lock: no one else can be using this file
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None
        self._unlock()
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                what = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            else:
                what = f"{exc.strerror or type(exc).__name__}" + (f" ({exc.filename})" if exc.filename else "")
            raise CompileError(f"{what} while writing {self.output}; nothing was written there and any earlier artifact is intact") from exc


def lock_path(output: Path) -> Path:
    """The lock file a compile of OUTPUT holds while it runs."""
    return output.parent / f".{output.name}.lock"


def _check_place(output: Path) -> None:
    if output.exists() and not is_artifact(output):
        raise CompileError(f"{output}: exists and is not a kiln artifact; refusing to overwrite it")
    if not output.parent.is_dir():
        raise CompileError(f"{output.parent}: output directory does not exist")


def check_output(output: str | Path) -> None:
    """ArtifactWriter's checks on OUTPUT, without taking the lock or writing
    anything. Cheap (no TVM): `kiln compile` runs them before importing TVM so
    that a bad output fails at once, not seconds later. The writer checks again."""
    output = Path(os.path.abspath(output))
    parent = output.parent
    _check_place(output)
    if not os.access(parent, os.W_OK):
        raise CompileError(f"cannot write to {parent}: permission denied")
    try:
        fd = os.open(lock_path(output), os.O_RDONLY)
    except OSError:
        return  # no lock file: no compile is writing OUTPUT
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # probe only: closing the fd releases it
    except BlockingIOError:
        raise CompileError(f"{output}: another kiln compile is writing this artifact right now") from None
    finally:
        os.close(fd)
