"""Resumable, checksummed uploads: where the chunks of a file transfer go
(docs/protocol.md, "File transfer"; options in docs/operations.md).

The store owns one directory (``file_dir``) and names everything in it by
the file id (32 hex digits), never by a client's name, so no name can reach
outside it::

    <id>.json    the upload's metadata (name, size, sha256, chunk size,
                 channel, uploader, when it started; ``complete`` once done)
    <id>.part    an upload in progress: each chunk written at its offset
    <id>.chunks  the indices of the chunks written, 4 bytes each, appended
                 after each chunk's data: what ``file_ready`` says is held,
                 after a reconnect and after a restart of the gateway
    <id>.data    a complete file, renamed from ``.part`` once its SHA-256
                 matched

Disk writes run on a small thread pool, one chunk per job, so the event
loop never waits for the disk; a chunk is acknowledged once its job is done.
What the connection does while writes are pending (stop reading) is the
connection's business (``Connection._file_chunk``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import struct
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .clock import Clock, Timer
from .protocol.errors import ErrorCode, FileCode, FileError, WirehubError

logger = logging.getLogger("wirehub.files")

MIN_CHUNK_BYTES = 1024
# Room in a message for the records around a chunk's bytes (type, chunk head).
CHUNK_OVERHEAD_BYTES = 64
MAX_NAME_BYTES = 255
MAX_CHUNKS = 2**32 - 1       # ``index`` and ``count`` are u32 in the chunk record
WRITER_THREADS = 4
HASH_BLOCK_BYTES = 1 << 20
# ``incomplete_file`` lists this many missing ranges at most.
MISSING_SHOWN = 8
_INDEX = struct.Struct(">I")
# In ``_Upload.writing`` while the upload's files are being created: a
# resuming ``file_begin`` waits for it as for a chunk.
_CREATING = -1


class FileMeta(msgspec.Struct, kw_only=True):
    """What ``<id>.json`` holds."""

    file_id: str
    name: str
    size: int
    sha256: str
    chunk_size: int
    owner: str                    # the uploader's token subject ("" when anonymous)
    channel: str | None = None
    started: float = 0.0          # wall clock, for file_partial_ttl_s
    complete: bool = False

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def same_file(self, other: FileMeta) -> bool:
        return (self.name, self.size, self.sha256, self.chunk_size, self.channel) == \
            (other.name, other.size, other.sha256, other.chunk_size, other.channel)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A complete, verified file: what ``Gateway.on_file`` callbacks and downloads get."""

    file_id: str
    name: str
    size: int
    sha256: str
    owner: str
    channel: str | None
    path: Path


class _Upload:
    """An upload in progress: which chunks are on disk, which are being written."""

    __slots__ = ("meta", "held", "held_count", "writing", "touched", "_settled", "finishing")

    def __init__(self, meta: FileMeta, touched: float) -> None:
        self.meta = meta
        self.held = bytearray(meta.chunk_count)
        self.held_count = 0
        self.writing: set[int] = set()
        self.touched = touched
        self._settled: list[asyncio.Future[None]] = []
        self.finishing: asyncio.Future[StoredFile] | None = None

    def have(self) -> list[tuple[int, int]]:
        """The chunks held, as ranges of indices, both ends included."""
        ranges: list[tuple[int, int]] = []
        start = -1
        for index, held in enumerate(self.held):
            if held and start < 0:
                start = index
            elif not held and start >= 0:
                ranges.append((start, index - 1))
                start = -1
        if start >= 0:
            ranges.append((start, len(self.held) - 1))
        return ranges

    def missing(self) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        previous = -1
        for first, last in self.have():
            if first > previous + 1:
                ranges.append((previous + 1, first - 1))
            previous = last
        if previous < len(self.held) - 1:
            ranges.append((previous + 1, len(self.held) - 1))
        return ranges

    def mark(self, index: int) -> None:
        if not self.held[index]:
            self.held[index] = 1
            self.held_count += 1

    def reset(self) -> None:
        self.held = bytearray(len(self.held))
        self.held_count = 0

    async def settled(self) -> None:
        """Return once no chunk of this upload is being written."""
        while self.writing:
            waiter = asyncio.get_running_loop().create_future()
            self._settled.append(waiter)
            await waiter

    def wrote(self, index: int) -> None:
        self.writing.discard(index)
        if not self.writing:
            waiters, self._settled = self._settled, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


def check_name(name: str, file_id: str) -> None:
    """A file's name is metadata, never a path; refuse what would read as one.

    Raises:
        FileError: ``invalid_name``.
    """
    reason = None
    if not name:
        reason = "is empty"
    elif len(name.encode()) > MAX_NAME_BYTES:
        reason = f"is over {MAX_NAME_BYTES} bytes"
    elif "/" in name or "\\" in name:
        reason = "holds a path separator"
    elif name in (".", ".."):
        reason = "is . or .."
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        reason = "holds a control character"
    if reason is not None:
        raise FileError(FileCode.INVALID_NAME, f"the file name {name[:64]!r} {reason}", file_id=file_id)


class FileStore:
    """Uploads in progress and complete files under one directory.

    Args:
        directory: where files go (created if missing).
        max_bytes: the largest file accepted.
        quota_bytes: what one uploader's files may hold in all, partial and
            complete (0: no quota).
        partial_ttl_s: an upload untouched this long is deleted.
        max_chunk_bytes: the largest ``chunk_size`` (a chunk must fit one message).
        clock: the gateway's clock (the TTL is on its wall clock).
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int, quota_bytes: int,
                 partial_ttl_s: float, max_chunk_bytes: int, clock: Clock | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes
        self.partial_ttl_s = partial_ttl_s
        self.max_chunk_bytes = max_chunk_bytes
        self.clock = clock or Clock()
        self.uploads: dict[str, _Upload] = {}
        self.complete: dict[str, FileMeta] = {}
        self.callbacks: list[Callable[[StoredFile], Any]] = []
        self.publish: Callable[[str, Any], Any] | None = None   # the gateway's, for ``channel``
        # read_pauses: connections stopped being read because their chunks waited for the disk
        self.metrics = {"chunks": 0, "bytes": 0, "files": 0, "errors": 0, "read_pauses": 0}
        self._executor: ThreadPoolExecutor | None = None
        self._sweeper: Timer | None = None
        self._callback_tasks: set[asyncio.Future[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Create the directory, take up what an earlier run left, start the TTL sweep."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="wirehub-files")
        for meta_path in sorted(self.directory.glob("*.json")):
            self._load(meta_path)
        self._sweep()

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._executor is not None:
            # Chunks not yet written were not acknowledged: their uploads resend them.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _load(self, meta_path: Path) -> None:
        try:
            meta = msgspec.json.decode(meta_path.read_bytes(), type=FileMeta)
            if meta_path.stem != meta.file_id:
                raise ValueError("the file id is not the file's name")
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            logger.warning("ignoring %s: %s", meta_path, exc)
            return
        if meta.complete:
            if self._path(meta.file_id, ".data").exists():
                self.complete[meta.file_id] = meta
            return
        chunks = self._path(meta.file_id, ".chunks")
        try:
            log = chunks.read_bytes()
            touched = max(meta.started, chunks.stat().st_mtime)   # the last chunk written
        except FileNotFoundError:
            log, touched = b"", meta.started
        if not self._path(meta.file_id, ".part").exists():
            logger.warning("forgetting upload %s: its data file is gone", meta.file_id)
            self._forget(meta.file_id)
            return
        upload = _Upload(meta, touched)
        for (index,) in _INDEX.iter_unpack(log[:len(log) - len(log) % _INDEX.size]):
            if index < len(upload.held):
                upload.mark(index)
        self.uploads[meta.file_id] = upload

    def _sweep(self) -> None:
        """Delete uploads untouched for ``partial_ttl_s``; run again later."""
        now = self.clock.wall()
        for file_id, upload in list(self.uploads.items()):
            if upload.finishing is None and not upload.writing and now - upload.touched > self.partial_ttl_s:
                logger.info("deleting an expired partial upload", extra={"file_id": file_id})
                self._forget(file_id)
        self._sweeper = self.clock.call_later(max(1.0, min(60.0, self.partial_ttl_s / 4)), self._sweep)

    def _forget(self, file_id: str) -> None:
        self.uploads.pop(file_id, None)
        for suffix in (".part", ".chunks", ".json"):
            try:
                self._path(file_id, suffix).unlink()
            except FileNotFoundError:
                pass

    def _path(self, file_id: str, suffix: str) -> Path:
        # file_id is 32 lowercase hex digits (checked by the codec): a plain file name.
        return self.directory / (file_id + suffix)

    # -- uploads ---------------------------------------------------------------------

    async def begin(self, owner: str, file_id: str, name: str, size: int, sha256: str, chunk_size: int,
                    channel: str | None) -> tuple[_Upload | None, FileMeta]:
        """Start or resume an upload; ``(upload, meta)``, ``upload`` None when
        the file is complete already. Waits for chunks still being written, so
        that what it says is held is exact.

        Raises:
            FileError: see docs/protocol.md, "File transfer".
        """
        check_name(name, file_id)
        if size > self.max_bytes:
            raise FileError(FileCode.FILE_TOO_LARGE, f"{size} bytes is over the limit of {self.max_bytes} "
                            f"(file_max_bytes)", file_id=file_id)
        if not MIN_CHUNK_BYTES <= chunk_size <= self.max_chunk_bytes:
            raise FileError(ErrorCode.INVALID_FIELD, f"chunk_size must be {MIN_CHUNK_BYTES} to "
                            f"{self.max_chunk_bytes} bytes (max_payload_bytes less {CHUNK_OVERHEAD_BYTES})",
                            file_id=file_id)
        if -(-size // chunk_size) > MAX_CHUNKS:
            raise FileError(ErrorCode.INVALID_FIELD, f"more than {MAX_CHUNKS} chunks: use larger ones",
                            file_id=file_id)
        wanted = FileMeta(file_id=file_id, name=name, size=size, sha256=sha256, chunk_size=chunk_size,
                          owner=owner, channel=channel, started=self.clock.wall())
        upload = self.uploads.get(file_id)
        while upload is not None and upload.finishing is not None:
            await asyncio.wait([upload.finishing])   # its outcome is file_end's to report
            upload = self.uploads.get(file_id)
        known = upload.meta if upload is not None else self.complete.get(file_id)
        if known is not None:
            if known.owner != owner:
                raise FileError(ErrorCode.FORBIDDEN, f"file {file_id} is another uploader's", file_id=file_id)
            if not known.same_file(wanted):
                raise FileError(FileCode.FILE_CONFLICT, f"file {file_id} was begun with another name, size, "
                                f"sha256, chunk_size or channel", file_id=file_id)
            if upload is None:
                if self._path(file_id, ".data").exists():
                    return None, known
                del self.complete[file_id]   # the application took it away: a new upload
            else:
                upload.touched = self.clock.wall()
                await upload.settled()
                if self.uploads.get(file_id) is not upload:
                    raise FileError(FileCode.STORAGE_ERROR, f"file {file_id} could not be started; begin again",
                                    file_id=file_id)
                return upload, upload.meta
        self._check_quota(owner, size, file_id)
        upload = _Upload(wanted, wanted.started)
        self.uploads[file_id] = upload
        upload.writing.add(_CREATING)
        try:
            await self._run(self._create, wanted)
        except OSError as exc:
            del self.uploads[file_id]
            raise self._storage_error(file_id, "could not start the upload", exc) from None
        finally:
            upload.wrote(_CREATING)
        return upload, wanted

    def _check_quota(self, owner: str, size: int, file_id: str) -> None:
        if not self.quota_bytes:
            return
        used = sum(u.meta.size for u in self.uploads.values() if u.meta.owner == owner)
        for meta in list(self.complete.values()):
            if meta.owner == owner:
                if self._path(meta.file_id, ".data").exists():
                    used += meta.size
                else:
                    del self.complete[meta.file_id]   # moved or deleted by the application
        if used + size > self.quota_bytes:
            raise FileError(FileCode.QUOTA_EXCEEDED, f"{size} more bytes would put this uploader's files at "
                            f"{used + size}, over the quota of {self.quota_bytes} (file_quota_bytes)",
                            file_id=file_id)

    def chunk(self, owner: str, file_id: str, index: int, count: int, data: memoryview) -> asyncio.Future[None]:
        """Take one chunk; the future is done once it is on disk.

        Raises:
            FileError: the chunk is refused (nothing is written).
        """
        upload = self.uploads.get(file_id)
        if upload is None or upload.meta.owner != owner or _CREATING in upload.writing:
            if file_id in self.complete and self.complete[file_id].owner == owner:
                raise FileError(FileCode.DUPLICATE_CHUNK, f"file {file_id} is complete already",
                                file_id=file_id, index=index)
            raise FileError(FileCode.UNKNOWN_FILE, f"no upload {file_id}: send file_begin first (an upload "
                            f"untouched for file_partial_ttl_s is deleted)", file_id=file_id, index=index)
        meta = upload.meta
        chunk_count = len(upload.held)
        if count != chunk_count:
            raise FileError(FileCode.INVALID_CHUNK, f"count {count} is not the file's {chunk_count} chunks",
                            file_id=file_id, index=index)
        if index >= chunk_count:
            raise FileError(FileCode.INVALID_CHUNK, f"index {index} is not below the count {chunk_count}",
                            file_id=file_id, index=index)
        start = index * meta.chunk_size
        expected = min(meta.chunk_size, meta.size - start)
        if len(data) > expected:
            raise FileError(FileCode.CHUNK_OUT_OF_RANGE, f"chunk {index} of {len(data)} bytes would end at "
                            f"{start + len(data)}, past the file's {meta.size} bytes",
                            file_id=file_id, index=index)
        if len(data) < expected:
            raise FileError(FileCode.INVALID_CHUNK, f"chunk {index} holds {len(data)} bytes; every chunk but "
                            f"the last holds chunk_size, this one {expected}", file_id=file_id, index=index)
        if upload.held[index] or index in upload.writing:
            raise FileError(FileCode.DUPLICATE_CHUNK, f"chunk {index} is held already",
                            file_id=file_id, index=index)
        upload.writing.add(index)
        upload.touched = self.clock.wall()
        return asyncio.ensure_future(self._write_chunk(upload, start, data, index))

    async def _write_chunk(self, upload: _Upload, start: int, data: memoryview, index: int) -> None:
        file_id = upload.meta.file_id
        try:
            await self._run(self._write, file_id, start, data, index)
        except OSError as exc:
            raise self._storage_error(file_id, f"could not write chunk {index}", exc) from None
        else:
            if self.uploads.get(file_id) is upload:
                upload.mark(index)   # before ``wrote``: a waiting file_begin must see it held
            self.metrics["chunks"] += 1
            self.metrics["bytes"] += len(data)
        finally:
            upload.wrote(index)   # also when cancelled (the gateway stopping)

    async def end(self, owner: str, file_id: str) -> StoredFile:
        """Verify and complete an upload (or answer again for a complete file).

        Raises:
            FileError: ``unknown_file``, ``incomplete_file``, ``checksum_mismatch``, ``storage_error``.
        """
        upload = self.uploads.get(file_id)
        if upload is None or upload.meta.owner != owner:
            meta = self.complete.get(file_id)
            if meta is not None and meta.owner == owner and self._path(file_id, ".data").exists():
                return self._stored(meta)
            raise FileError(FileCode.UNKNOWN_FILE, f"no upload {file_id}: send file_begin first",
                            file_id=file_id)
        if upload.finishing is None:
            upload.finishing = asyncio.ensure_future(self._finish(upload))
        return await asyncio.shield(upload.finishing)

    async def _finish(self, upload: _Upload) -> StoredFile:
        meta = upload.meta
        try:
            await upload.settled()
            missing = upload.missing()
            if missing:
                shown = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in missing[:MISSING_SHOWN])
                raise FileError(FileCode.INCOMPLETE_FILE, f"{len(upload.held) - upload.held_count} of "
                                f"{len(upload.held)} chunks missing: {shown}"
                                f"{' …' if len(missing) > MISSING_SHOWN else ''}", file_id=meta.file_id)
            try:
                digest = await self._run(self._seal, meta)
            except OSError as exc:
                raise self._storage_error(meta.file_id, "could not complete the file", exc) from None
            if digest != meta.sha256:
                upload.reset()
                try:
                    await self._run(self._path(meta.file_id, ".chunks").write_bytes, b"")
                except OSError as exc:
                    logger.warning("could not empty %s: %s", meta.file_id, exc)
                raise FileError(FileCode.CHECKSUM_MISMATCH, f"the file's SHA-256 is {digest}, not {meta.sha256}; "
                                f"the upload was emptied: send every chunk again", file_id=meta.file_id)
            done = msgspec.structs.replace(meta, complete=True)
            try:
                await self._run(self._commit, done)
            except OSError as exc:
                raise self._storage_error(meta.file_id, "could not complete the file", exc) from None
        finally:
            upload.finishing = None
        del self.uploads[meta.file_id]
        self.complete[meta.file_id] = done
        self.metrics["files"] += 1
        stored = self._stored(done)
        self._announce(stored)
        return stored

    def _announce(self, stored: StoredFile) -> None:
        """Tell the application (``on_file``) and the file's channel."""
        if stored.channel is not None and self.publish is not None:
            try:
                published = self.publish(stored.channel, {"type": "file", "file_id": stored.file_id,
                                                          "name": stored.name, "size": stored.size,
                                                          "sha256": stored.sha256})
            except WirehubError as exc:  # a shared broker that is down: the file is stored all the same
                logger.warning("announcing file %s failed: %s", stored.file_id, exc.message)
            else:
                if isinstance(published, asyncio.Future):
                    published.add_done_callback(functools.partial(_announced, stored.file_id))
        for callback in self.callbacks:
            try:
                result = callback(stored)
            except Exception:
                logger.exception("on_file callback failed", extra={"file_id": stored.file_id})
                continue
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("on_file callback failed", exc_info=task.exception())

    def metric_lines(self) -> list[str]:
        m = self.metrics
        return ["# TYPE wirehub_file_uploads gauge", f"wirehub_file_uploads {len(self.uploads)}",
                "# TYPE wirehub_file_chunks_total counter", f"wirehub_file_chunks_total {m['chunks']}",
                "# TYPE wirehub_file_bytes_total counter", f"wirehub_file_bytes_total {m['bytes']}",
                "# TYPE wirehub_files_completed_total counter", f"wirehub_files_completed_total {m['files']}",
                "# TYPE wirehub_file_storage_errors_total counter",
                f"wirehub_file_storage_errors_total {m['errors']}",
                "# TYPE wirehub_file_read_pauses_total counter",
                f"wirehub_file_read_pauses_total {m['read_pauses']}"]

    def stored(self, file_id: str) -> StoredFile | None:
        """A complete file still in the directory, for a download."""
        meta = self.complete.get(file_id)
        if meta is None or not self._path(file_id, ".data").exists():
            return None
        return self._stored(meta)

    def _stored(self, meta: FileMeta) -> StoredFile:
        return StoredFile(meta.file_id, meta.name, meta.size, meta.sha256, meta.owner, meta.channel,
                          self._path(meta.file_id, ".data"))

    def _storage_error(self, file_id: str, what: str, exc: OSError) -> FileError:
        self.metrics["errors"] += 1
        logger.error("%s: %s", what, exc, extra={"file_id": file_id})
        return FileError(FileCode.STORAGE_ERROR, f"{what} ({exc.strerror or exc}); see the server log",
                         file_id=file_id)

    # -- on the writer threads ---------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _create(self, meta: FileMeta) -> None:
        # The data file first, sized (sparse), then the log, then the
        # metadata: an upload is known once its .json exists.
        with open(self._path(meta.file_id, ".part"), "wb") as part:
            part.truncate(meta.size)
        self._path(meta.file_id, ".chunks").write_bytes(b"")
        self._write_meta(meta)

    def _write(self, file_id: str, offset: int, data: memoryview, index: int) -> None:
        fd = os.open(self._path(file_id, ".part"), os.O_WRONLY)
        try:
            view = data
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)
        fd = os.open(self._path(file_id, ".chunks"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, _INDEX.pack(index))
        finally:
            os.close(fd)

    def _seal(self, meta: FileMeta) -> str:
        """Flush the data to the disk and hash it."""
        digest = hashlib.sha256()
        with open(self._path(meta.file_id, ".part"), "rb") as part:
            os.fsync(part.fileno())
            while block := part.read(HASH_BLOCK_BYTES):
                digest.update(block)
        return digest.hexdigest()

    def _commit(self, meta: FileMeta) -> None:
        os.replace(self._path(meta.file_id, ".part"), self._path(meta.file_id, ".data"))
        self._write_meta(meta)
        self._path(meta.file_id, ".chunks").unlink(missing_ok=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)   # the rename and the metadata survive a crash
        finally:
            os.close(fd)

    def _write_meta(self, meta: FileMeta) -> None:
        temporary = self._path(meta.file_id, ".json.tmp")
        temporary.write_bytes(msgspec.json.encode(meta))
        os.replace(temporary, self._path(meta.file_id, ".json"))


def _announced(file_id: str, done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.warning("announcing file %s failed: %s", file_id, done.exception())
