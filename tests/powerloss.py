"""A SQLite VFS that simulates power loss: what was not synced is gone.

``PowerLossVFS`` passes everything through to the default VFS, and keeps beside each file a
shadow: the file as it stood at its last ``xSync``. Writes and truncations since then are
pending. ``crash()`` takes the picture a power cut would leave on the disk: the shadows, plus
(in the ``torn`` model) a random subset of the pending writes, since a disk may have written
some of them and not others. The running connection goes on writing the real files; the test
copies the picture to another directory and reopens it with the real VFS.

The ``-shm`` file is never part of the picture: it is shared memory that SQLite rebuilds from
the WAL when the first connection opens the database again.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw


@dataclass
class _Shadow:
    synced: bytearray
    pending: list[tuple[int, bytes] | int] = field(default_factory=list)  # (offset, data) | size

    def apply(self, image: bytearray, op: tuple[int, bytes] | int) -> None:
        if isinstance(op, int):
            del image[op:]
            return
        offset, data = op
        if len(image) < offset:
            image.extend(b"\0" * (offset - len(image)))
        image[offset : offset + len(data)] = data


class PowerLossVFS(apsw.VFS):
    """Register under ``name``; crash after the ``crash_at``-th write (or call ``crash()``)."""

    def __init__(self, name: str, *, crash_at: int | None = None, seed: int = 0) -> None:
        self.name = name
        self.crash_at = crash_at
        self.random = random.Random(seed)
        self.writes = 0
        self.syncs = 0
        self.lock = threading.Lock()
        self.shadows: dict[str, _Shadow] = {}
        self.picture: dict[str, bytes] | None = None  # set by crash()
        self.torn = False
        super().__init__(name, "")

    @property
    def crashed(self) -> bool:
        return self.picture is not None

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        file = _File(self, name, flags)
        if isinstance(path, str) and not path.endswith("-shm"):
            with self.lock:
                if path not in self.shadows:
                    p = Path(path)
                    self.shadows[path] = _Shadow(bytearray(p.read_bytes() if p.exists() else b""))
            file.path = path
        return file

    def xDelete(self, filename: str, syncdir: bool) -> None:
        with self.lock:
            self.shadows.pop(filename, None)
        super().xDelete(filename, syncdir)

    def crash(self) -> None:
        """Freeze the picture of the disk as a power cut now would leave it."""
        with self.lock:
            if self.picture is not None:
                return
            picture: dict[str, bytes] = {}
            for path, shadow in self.shadows.items():
                image = bytearray(shadow.synced)
                if self.torn:
                    for op in shadow.pending:
                        if self.random.random() < 0.5:
                            shadow.apply(image, op)
                picture[path] = bytes(image)
            self.picture = picture

    def restore(self, into: Path) -> None:
        """Write the picture into the directory ``into`` (same file names)."""
        assert self.picture is not None, "no crash yet"
        into.mkdir(parents=True, exist_ok=True)
        for path, data in self.picture.items():
            (into / Path(path).name).write_bytes(data)

    def _count_write(self) -> None:
        self.writes += 1
        if self.crash_at is not None and self.writes >= self.crash_at:
            self.crash()


class _File(apsw.VFSFile):
    def __init__(self, vfs: PowerLossVFS, name: Any, flags: list[int]) -> None:
        self.vfs = vfs
        self.path: str | None = None
        super().__init__("", name, flags)

    def _shadow(self) -> _Shadow | None:
        return None if self.path is None else self.vfs.shadows.get(self.path)

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.path is not None:
            self.vfs._count_write()  # the crash comes before this write reaches the disk
            with self.vfs.lock:
                shadow = self._shadow()
                if shadow is not None:
                    shadow.pending.append((offset, bytes(data)))
        super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        with self.vfs.lock:
            shadow = self._shadow()
            if shadow is not None:
                shadow.pending.append(newsize)
        super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
        with self.vfs.lock:
            self.vfs.syncs += 1
            shadow = self._shadow()
            if shadow is not None:
                for op in shadow.pending:
                    shadow.apply(shadow.synced, op)
                shadow.pending.clear()
