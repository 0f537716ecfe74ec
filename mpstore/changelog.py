"""The durable journal's log file: each commit appended as one framed record.

Why a log beside the SQLite file: a commit of the cycle writes ~1.4 KB of rows, but SQLite
wrote ~10 whole pages (40 KB) of its WAL for it, one per B-tree leaf the rows touched
(spans, their index, the rollout, the replies), and its checkpoints then synced them into the
database file. Appending the commit's statements to this file costs one ``write`` of about
what changed; :mod:`mpstore.compactor` applies the log to the database in one
transaction now and then (*compaction*) and empties it.

A frame is an 8-byte header (the payload's length and CRC-32, little-endian ``uint32``
each) and the payload. A commit whose frame is cut short (a full disk, a power loss under
``synchronous=normal``) fails the length or CRC check: :meth:`LogFile.frames` drops it and
everything after it, and cuts the file there. Such a commit was never acknowledged: its
reply waits for :meth:`LogFile.append` to return.

Errors: ``OSError`` from the file system, as it comes (the journal turns it into a
StorageError).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path

__all__ = ["LogFile"]

_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload


class LogFile:
    """An append-only file of frames at ``path`` (created 0600). Not thread-safe: the
    journal appends from one committer at a time. With ``sync``, every append is on the
    device when it returns (``fdatasync``)."""

    def __init__(self, path: Path, sync: bool) -> None:
        self.path = path
        self._sync = sync
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if sync and not existed:  # the new file's name, too, must survive a power loss
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self.size = os.fstat(self._fd).st_size  # the end of the last whole frame

    def append(self, payload: bytes) -> None:
        """Append one frame. Atomic: if the file system refuses part of it, the file is
        cut back to where it was and the OSError is raised."""
        data = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
            if self._sync:
                os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # if this fails too, frames() drops the tail
                self._cut(self.size)
            raise
        self.size += len(data)

    def frames(self) -> list[bytes]:
        """The payloads of the whole frames, in order. A torn or damaged frame and what
        follows it are dropped, and the file is cut there."""
        with open(self.path, "rb") as handle:
            data = handle.read()
        out, at = [], 0
        while at + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, at)
            payload = data[at + _HEADER.size:at + _HEADER.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            out.append(payload)
            at += _HEADER.size + length
        if at != len(data):
            self._cut(at)
        self.size = at
        return out

    def clear(self) -> None:
        """Empty the file (its frames are in the database now)."""
        self._cut(0)
        self.size = 0

    def _cut(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        if self._sync:
            os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
