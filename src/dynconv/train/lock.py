"""One writer per run directory: an exclusive, OS-level lock on ``RUN_DIR/.lock``.

Two runs writing into one directory overwrite each other's checkpoints and interleave their
logs, so a trainer holds this lock for the whole run and a second one fails at once, naming
the holder. The lock is ``flock(2)`` on an open file, so the kernel drops it when the holder
exits, however it exits (SIGKILL included): a lock file left behind never blocks anyone; its
content (the holder's PID, host and start time) is only what the error message quotes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "RunDirLock", "RunDirLockedError"]

LOCK_FILE = ".lock"


class RunDirLockedError(RuntimeError):
    """Another process holds the run directory's lock; the message names the directory, the
    holder's PID and when it started."""

    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.holder = dict(holder)
        pid = holder.get("pid", "unknown")
        host = holder.get("host")
        since = holder.get("started", "an unknown time")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        super().__init__(
            f"{self.directory} is in use by another run (PID {pid}{where}, started {since}); "
            "wait for it to finish, stop it, or choose another directory"
        )


class RunDirLock:
    """Exclusive lock of the directory ``path`` (created if missing); a context manager.

    ``acquire()`` fails at once with :class:`RunDirLockedError` when another process (or
    another ``RunDirLock`` in this one) holds it; ``release()`` is idempotent. The lock file
    stays in place after release: deleting it would let two processes lock two different
    files of the same name.
    """

    def __init__(self, path: str | Path) -> None:
        self.directory = Path(path)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._created_directory = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunDirLock":
        if self._fd is not None:
            return self
        self._created_directory = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLockedError(self.directory, self.holder()) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; a directory this lock created and that holds nothing but the lock file
        (a run that failed before writing anything) is removed again."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._created_directory and {p.name for p in self.directory.iterdir()} == {LOCK_FILE}:
                self.path.unlink()
                self.directory.rmdir()
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (``{}`` if it says nothing readable).
        A holder that has just locked may not have written yet: read a few times."""
        for _ in range(5):
            try:
                text = self.path.read_text()
            except OSError:
                text = ""
            if text.strip():
                try:
                    value = json.loads(text)
                    return value if isinstance(value, dict) else {}
                except ValueError:
                    return {}
            time.sleep(0.02)
        return {}

    def check(self) -> None:
        """Raise :class:`RunDirLockedError` if another process holds the lock now (a probe
        for clear messages before any work; only :meth:`acquire` guarantees anything)."""
        if self._fd is not None or not self.path.is_file():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLockedError(self.directory, self.holder()) from None
        finally:
            os.close(fd)  # closing drops a lock taken by this probe

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the OS releases it anyway
            pass

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.directory)!r}, held={self.held})"
