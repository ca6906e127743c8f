"""The upload directory: where `POST /api/upload` keeps files, and for how long.

* Private: the directory is 0700 and every file 0600, created without following links. A
  directory that already exists must be ours and writable by nobody else (another user could
  otherwise plant or read files): anything else is refused at startup.
* Bounded: each file at most `max_upload_bytes` (the request guard), all of them together at
  most `upload_quota_bytes` (413 once full, after expired files are swept).
* Temporary: a file no live session holds (pending for a turn, or used in one) is deleted once
  it is `upload_ttl_s` old, by a sweep at startup and every few minutes. Sessions hold their
  files while they live; they expire after `session_ttl_seconds` idle.

Names are `<32 hex><extension>`, generated here; nothing a client sends becomes a path. A
video's frames (serve/translation/video.py) are PNGs in a directory `frames_<32 hex>/` of
their own, under the same rules: private, counted in the quota, expired as one once none of
them is held.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from serve.errors import ApiError
from serve.settings import Settings

STORED = re.compile(r"^[0-9a-f]{32}(\.[a-z0-9]{1,10})?$")
FRAMES_DIR = re.compile(r"^frames_[0-9a-f]{32}$")
FRAME_NAME = re.compile(r"^frame_[0-9]{4}(_[0-9a-z]{1,16})?\.png$")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def default_dir() -> Path:
    """A folder of this user's under the temp directory (a shared name would let another user
    create it first)."""
    return Path(tempfile.gettempdir()) / f"tsjax-uploads-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """`path` created 0700, or checked if it exists: a real directory (not a link), ours, and
    writable by nobody else; read access for others is taken away. ValueError says why not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"upload_dir {path} is not a directory (a link or a file): refusing it")
    if st.st_uid != os.getuid():
        raise ValueError(f"upload_dir {path} belongs to another user (uid {st.st_uid}): "
                         "refusing to keep uploads there; choose another upload_dir")  # fmt: skip
    if st.st_mode & 0o022:
        raise ValueError(f"upload_dir {path} is writable by other users "
                         f"(mode {stat.S_IMODE(st.st_mode):o}): refusing it")  # fmt: skip
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path.resolve()


class UploadStore:
    """The upload directory with its quota and expiry. `held()` names the files live sessions
    hold (they are never expired)."""

    def __init__(self, root: Path, *, quota: int, ttl: float, held: Callable[[], set[Path]]):
        self.root = private_dir(root)
        self.quota, self.ttl, self.held = quota, ttl, held
        self._lock = threading.Lock()  # quota check and write, one upload at a time

    @classmethod
    def from_settings(cls, settings: Settings, held: Callable[[], set[Path]]) -> UploadStore:
        root = Path(settings.upload_dir) if settings.upload_dir else default_dir()
        return cls(root, quota=settings.upload_quota_bytes, ttl=settings.upload_ttl_s, held=held)

    def usage(self) -> int:
        """Bytes the stored files take (frames directories' files included)."""
        total = 0
        with os.scandir(self.root) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
                elif FRAMES_DIR.match(e.name) and e.is_dir(follow_symlinks=False):
                    total += _dir_bytes(e.path)
        return total

    def sweep(self, now: float | None = None) -> int:
        """Delete files (and frames directories) older than the TTL that no live session
        holds (a directory is held while any of its frames is); returns how many."""
        cutoff = (time.time() if now is None else now) - self.ttl
        held = self.held()
        names = {p.name for p in held} | {p.parent.name for p in held if p.parent != self.root}
        removed = 0
        with os.scandir(self.root) as entries:
            for e in entries:
                if e.name in names or e.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                if e.is_file(follow_symlinks=False):
                    Path(e.path).unlink(missing_ok=True)
                    removed += 1
                elif FRAMES_DIR.match(e.name) and e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                    removed += 1
        return removed

    def _reserve(self, size: int) -> None:
        """A 413 unless `size` more bytes fit the quota (after sweeping). Under the lock."""
        used = self.usage()
        if used + size > self.quota:
            self.sweep()
            used = self.usage()
        if used + size > self.quota:
            raise ApiError(413, f"the upload quota is full: {used} of {self.quota} bytes "
                           f"are in use (upload_quota_bytes) and this file has {size}; "
                           "unused uploads expire after upload_ttl_s")  # fmt: skip

    def save(self, source: BinaryIO, size: int, ext: str) -> Path:
        """Copy `size` bytes from `source` into a new 0600 file named `<32 hex><ext>`
        (blocking: run it in a worker thread). A 413 when the quota cannot take it."""
        with self._lock:
            self._reserve(size)
            dest = self.root / f"{secrets.token_hex(16)}{ext}"
            with os.fdopen(os.open(dest, _CREATE, 0o600), "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            return dest

    def save_frames(self, frames: list[tuple[str, bytes]]) -> list[Path]:
        """Write a video's frames, `(name, PNG bytes)` with names matching `FRAME_NAME`, as
        0600 files in a new 0700 directory `frames_<32 hex>`; their paths, in order. A 413
        when the quota cannot take them all (nothing is written then)."""
        if not all(FRAME_NAME.match(name) for name, _ in frames):
            raise ValueError("frame names must match frame_NNNN[_tag].png")
        with self._lock:
            self._reserve(sum(len(data) for _, data in frames))
            folder = self.root / f"frames_{secrets.token_hex(16)}"
            folder.mkdir(mode=0o700)
            out = []
            for name, data in frames:
                with os.fdopen(os.open(folder / name, _CREATE, 0o600), "wb") as f:
                    f.write(data)
                out.append(folder / name)
            return out

    def remove_frames(self, paths: list[Path]) -> None:
        """Delete a frames directory `save_frames` made (the upload they came from failed)."""
        folders = {p.parent for p in paths if p.parent.parent == self.root}
        for folder in folders:
            if FRAMES_DIR.match(folder.name):
                shutil.rmtree(folder, ignore_errors=True)

    def rewrite(self, path: Path, text: str) -> None:
        """Replace a stored file's content (the cut text a turn will inline)."""
        flags = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(path, flags), "w", encoding="utf-8") as out:
            out.write(text)

    def inside(self, path: str) -> Path | None:
        """`path` resolved, if it names a stored file directly inside the directory or a
        video's frame inside one of its frames directories."""
        try:
            p = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        direct = p.parent == self.root
        frame = p.parent.parent == self.root and bool(FRAMES_DIR.match(p.parent.name))
        return p if (direct or frame) and p.is_file() else None

    def find(self, name: str) -> Path | None:
        """The stored file called `name` (only names this store generates)."""
        path = self.root / name if STORED.match(name) else None
        return path if path is not None and path.is_file() else None


def _dir_bytes(path: str) -> int:
    """Bytes the regular files directly inside `path` take."""
    with os.scandir(path) as entries:
        return sum(e.stat(follow_symlinks=False).st_size for e in entries
                   if e.is_file(follow_symlinks=False))  # fmt: skip
