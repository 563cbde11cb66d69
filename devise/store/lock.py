"""The writers' lock of an embeddings folder: one run at a time writes EMB_DIR (an embedding
run, an index build), and a lock left by a dead run is broken."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from devise.store.errors import EmbedError, LockHeldError
from devise.store.format import LOCK_FILE

log = logging.getLogger(__name__)


@dataclass
class LockInfo:
    """What LOCK holds: who writes the folder (process, host, a token of this hold) and since
    when, and which command."""

    pid: int
    host: str
    token: str
    started: str
    command: str = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(info: LockInfo | None) -> str:
    """The run holding a lock, in words."""
    if info is None:
        return "?"
    what = f"{info.command}, " if info.command else ""
    return f"{what}pid {info.pid} on {info.host}, since {info.started}"


class EmbedLock:
    """One writer per EMB_DIR: LOCK created with O_EXCL, holding pid, host and a token.

    A holder refreshes the file's mtime every `stale_s / 4` seconds. A lock is stale when its
    process is gone (same host) or its heartbeat is older than `stale_s` (any host); a stale
    lock is broken. A live one makes acquire() wait up to `wait_s`, then raise LockHeldError.
    """

    def __init__(
        self,
        emb_dir: str | os.PathLike,
        wait_s: float = 0.0,
        stale_s: float = 600.0,
        command: str = "devise embed",
    ):
        self.path = Path(emb_dir) / LOCK_FILE
        self.command = command
        self.wait_s = wait_s
        self.stale_s = stale_s
        self.info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[LockInfo | None, float | None]:
        try:
            st = self.path.stat()
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return LockInfo(**data), st.st_mtime
        except FileNotFoundError:
            return None, None
        except (ValueError, TypeError, OSError):
            try:
                return None, self.path.stat().st_mtime
            except OSError:
                return None, None

    def _stale(self, info: LockInfo | None, mtime: float) -> bool:
        age = time.time() - mtime
        if info is None:  # a holder killed between create and write: give it a moment
            return age > 30.0
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return True
        return age > self.stale_s

    def _break(self, info: LockInfo | None) -> None:
        """Remove a stale lock; only the one that renames it wins, and a lock that turns out to
        be someone else's fresh one is put back."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = LockInfo(**json.loads(aside.read_text(encoding="utf-8")))
        except (ValueError, TypeError, OSError):
            moved = None
        if info is not None and moved is not None and moved.token != info.token:
            try:
                os.link(aside, self.path)  # fails if yet another run took the lock meanwhile
            except OSError:
                pass
        aside.unlink(missing_ok=True)
        log.warning("Broke a stale lock on %s (%s).", self.path.parent, info)

    def acquire(self) -> LockInfo:
        deadline = time.monotonic() + self.wait_s
        me = LockInfo(
            pid=os.getpid(),
            host=socket.gethostname(),
            token=uuid.uuid4().hex,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            command=self.command,
        )
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
            except OSError as e:
                raise EmbedError(
                    f"Cannot create the lock file {self.path}: {e.strerror}; give --out a folder "
                    "you can write."
                ) from None
            if fd is None:
                info, mtime = self._read()
                if mtime is None:
                    continue  # released meanwhile
                if self._stale(info, mtime):
                    self._break(info)
                    continue
                if time.monotonic() >= deadline:
                    who = _holder(info)
                    raise LockHeldError(
                        f"Another run ({who}) is writing {self.path.parent}; wait for it to "
                        f"finish or pass --wait-lock SECONDS (its lock file is {self.path})."
                    ) from None
                time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(me), f)
                f.flush()
                os.fsync(f.fileno())
            self.info = me
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
            return me

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(1.0, self.stale_s / 4)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info, _ = self._read()
        if self.info is not None and info is not None and info.token == self.info.token:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
