"""`--source file:PATH`: ServiceImports and EndpointSlices from YAML on disk.

PATH is a file or a directory of *.yaml / *.yml files. Files are polled (stat only) a few
times a second, so a change is applied well within one second with no inotify
dependency; a file changed in the last RACY_S seconds is also read again and compared by
content (see FileRead). Each file is accepted or rejected whole: a file that does not
parse or validate is logged with its line and the last good version of it keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mcsproxy.manifests import (
    ManifestError,
    document_objects,
    kind_error,
    load_yaml_documents,
    object_kind,
    parse_endpoint_slice,
    parse_service_import,
)
from mcsproxy.store import ObjectId, SnapshotStore, SourceStatus, Spec
from mcsproxy.tasks import in_daemon_thread

log = logging.getLogger("mcsproxy.sources.file")
T = TypeVar("T")

POLL_INTERVAL_S = 0.25
YAML_SUFFIXES = (".yaml", ".yml")
# A file this long untouched is taken at once; a fresher change waits one more scan.
SETTLE_S = 1.0
# Coarser than any file timestamp we expect (ext2/ext3 with small inodes and NFS: 1 s;
# the kernel's coarse clock: a few ms): a file read this long after its last change
# cannot change again without a new stamp.
RACY_S = 2.0
_RACY_NS = int(RACY_S * 1e9)
# A removal waits for files still settling at most this many scans (0.5 s at the default
# poll): a move (the new name written, the old one deleted) settles in one, and a deletion
# beside a file rewritten without pause is still served within a second.
REMOVAL_HOLD_SCANS = 2
# A scan that has looked at no file for this long is reported (the status error,
# connected: false): a stat or read hangs on a volume whose server is gone (NFS, FUSE).
# A long scan still getting through its files is not: the first scan of 6,000 services
# took 1.7 s of CPU alone, and more while the event loop held the GIL; timed as a whole,
# a healthy scan of a large folder on a busy or small CPU was reported hung.
SCAN_STUCK_S = 10.0
# The pause after a scan is stretched so that scanning takes at most this share of a
# core: an idle scan is a stat per file, and 6,000 files (0.11 s of CPU) every 0.25 s
# kept 44 % of a core busy and the loop waiting for the GIL (stalls of ~0.5 s). The scan
# thread's own CPU time, not its wall time: a scan that waited on a hung volume, or for
# the GIL on a busy machine, did no work that calls for a longer pause.
SCAN_CPU_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What stat says about a file's version. ctime is in it because no one can set it:
    `cp -p`, `rsync -t`, `touch -r` put back an mtime (and the size may be the same),
    but the ctime moves with every write, rename and utime."""

    mtime_ns: int
    size: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class FileRead:
    """A version of a file as read: its stamp and a digest of its bytes. Equal reads hold
    the same bytes under the same stamp; when the read began is not part of that."""

    stamp: FileStamp
    digest: bytes
    read_ns: int = field(default=0, compare=False)

    def holds(self, stamp: FileStamp) -> bool:
        """True when the file at `stamp` surely still holds what was read. Two writes
        within one timestamp tick (a second on ext3, a few ms elsewhere) leave the stamp
        as it was, ctime too; so a read that began within RACY_S of the last change
        proves nothing and the file is read again and compared by digest (git's "racy
        clean" rule). That costs a few reads per change, none for files left alone."""
        return stamp == self.stamp and self.read_ns - stamp.ctime_ns >= _RACY_NS

    @classmethod
    def of(cls, stamp: FileStamp, data: bytes, read_ns: int) -> FileRead:
        """`data` as the file held it at `stamp`, from no earlier than `read_ns` on (a
        read began then, or a write of ours was renamed into place after it)."""
        return cls(stamp, hashlib.blake2b(data, digest_size=16).digest(), read_ns)


def read_file(path: Path, stamp: FileStamp) -> tuple[FileRead, bytes]:
    """The file's bytes and the FileRead to compare later versions with; OSError, also
    for anything but a regular file."""
    started = time.time_ns()  # before the read: the bytes are at least this new
    # O_NONBLOCK: a FIFO among the files opens at once instead of waiting for a writer
    # (the scan hung for ever), and is then refused like any file that is not regular:
    # a symlink to /dev/zero was read until memory ran out.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    return FileRead.of(stamp, data, started), data


class SettleGate:
    """Which changed files may be read now. A file written in place (truncated, then
    written) can be caught half-way; read then, an empty file would withdraw every
    object it holds. So a change is read once its stamp held still over two scans in a
    row, or once it is SETTLE_S old; the first scan takes everything, since there is no
    last good state to keep serving yet. A writer stalled mid-file for longer than a
    scan interval can still be caught: renaming a finished file into place is the safe
    way to publish."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.settle_ns = int(settle_s * 1e9)
        self._seen: dict[Path, FileStamp] = {}
        self._first = True
        self._settling = False  # a change this scan left for a later one
        self._held: dict[Path, int] = {}  # deleted files still served: scans held

    def ready(self, path: Path, stamp: FileStamp) -> bool:
        previous, self._seen[path] = self._seen.get(path), stamp
        if (self._first or previous == stamp
                or time.time_ns() - stamp.mtime_ns >= self.settle_ns):
            return True
        self._settling = True
        return False

    def due(self, gone: set[Path]) -> list[Path]:
        """Of the files deleted, those to withdraw in this scan (after its ready() calls).
        While another file is still settling a deletion waits, up to REMOVAL_HOLD_SCANS:
        that file may be where the objects moved (renamed into place, then the old file
        deleted), and taken apart the two would withdraw them for a scan or two and serve
        them again."""
        for back in set(self._held) - gone:
            del self._held[back]
        due = []
        for path in sorted(gone):
            held = self._held.get(path, 0)
            if self._settling and held < REMOVAL_HOLD_SCANS:
                self._held[path] = held + 1
            else:
                self._held.pop(path, None)
                due.append(path)
        return due

    def end_scan(self, present: set[Path] | dict[Path, FileStamp]) -> None:
        self._first = False
        self._settling = False
        for gone in set(self._seen) - set(present):
            del self._seen[gone]


class ScanProgress:
    """How far a scan has got: files stat'ed, read and parsed, counted up by the scan's
    thread and read whole from the event loop (watched_scan). A file being parsed is
    progress too: CPU work that no volume can hang (one file of 10 MiB took 4 s of CPU)."""

    __slots__ = ("cpu_s", "files", "parsing")

    def __init__(self) -> None:
        self.files = 0
        self.parsing = False
        self.cpu_s = 0.0  # the CPU time of the last scan's thread (pause_after_scan)


def pause_after_scan(poll_interval_s: float, progress: ScanProgress) -> float:
    """How long to wait before the next scan: the poll interval, or longer where the last
    scan's CPU time would otherwise take more than SCAN_CPU_SHARE of a core."""
    return max(poll_interval_s, progress.cpu_s * (1 / SCAN_CPU_SHARE - 1))


async def watched_scan(scan: Callable[[], T], name: str, progress: ScanProgress,
                       on_stuck: Callable[[str], None]) -> T:
    """scan() in a daemon thread (see in_daemon_thread); on_stuck(why) once it has got
    through no file for SCAN_STUCK_S and is not parsing one. Once per scan: a hung volume
    may answer a file and hang again. A long scan still getting through its files is not
    stuck: timed as a whole, the first scan of 6,000 services (1.7 s of CPU alone, more on
    a busy or small CPU) was reported as a hung volume."""
    loop = asyncio.get_running_loop()

    def timed_scan() -> T:
        started = time.thread_time()
        try:
            return scan()
        finally:
            progress.cpu_s = time.thread_time() - started

    running = in_daemon_thread(timed_scan, name)
    started = moved = loop.time()
    seen, stuck = progress.files, False
    try:
        while True:
            stuck_s = SCAN_STUCK_S  # read each time: tests shorten it
            done, _ = await asyncio.wait({running}, timeout=stuck_s / 5)
            if done:
                break
            now = loop.time()
            if progress.files != seen or progress.parsing:
                seen, moved = progress.files, now
            if now - moved < stuck_s or stuck:
                continue
            stuck = True
            on_stuck(f"a scan has not finished for {now - started:.0f} s, no file looked "
                     f"at for {now - moved:.0f} s (a hung volume?)")
    finally:
        running.cancel()  # when cancelled itself: leave the thread behind
    if stuck:
        log.info("%s: the scan finished after %.1f s", name, loop.time() - started)
    return running.result()


def parse_file_text(text: str, origin: str, source: str) -> dict[ObjectId, Spec]:
    """All servable objects of one file; ManifestError (with line) on the first bad one."""
    objects: dict[ObjectId, Spec] = {}
    for line, doc in load_yaml_documents(text, origin):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError("a document must be a mapping", origin, line)
        for at, item in document_objects(line, doc):
            kind = object_kind(item) if isinstance(item, dict) else None
            if kind is None:
                if isinstance(item, dict) and (error := kind_error(item)) is not None:
                    raise ManifestError(error, origin, at)
                continue  # other kinds (Namespace, Service, ...) are not ours to serve
            try:
                spec: Spec | None
                if kind == "ServiceImport":
                    spec = parse_service_import(item)
                    name = spec.key.name
                else:
                    spec = parse_endpoint_slice(item)
                    name = item["metadata"]["name"]
            except ManifestError as exc:
                raise exc.at(origin, at) from None
            if spec is None:
                continue
            oid = ObjectId(source, kind, spec.key.namespace, name)
            if oid in objects:
                raise ManifestError(f"duplicate {kind} {oid.namespace}/{name}", origin, at)
            objects[oid] = spec
    return objects


class FileSource:
    def __init__(self, path: str, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.path = Path(path)
        self.name = f"file:{path}"
        self.poll_interval_s = poll_interval_s
        self._reads: dict[Path, FileRead] = {}  # as last read
        self._settle = SettleGate()
        self._good: dict[Path, dict[ObjectId, Spec]] = {}
        self._errors: dict[Path, str] = {}
        self._missing: str | None = None  # the source's own path is gone or unlistable
        self._unreadable: dict[Path, str] = {}  # files there that cannot be stat'ed
        self._paths: dict[str, Path] = {}  # each file's Path, by name (see _list_files)
        self.progress = ScanProgress()

    def _list_files(self) -> tuple[dict[Path, FileStamp], dict[Path, str]]:
        """Stamps of the files to serve, and the files there that cannot be looked at
        (a symlink loop, no permission): neither gone nor readable. OSError when the
        path itself cannot be listed."""
        if self.path.is_dir():
            # Names, not Paths, and each file's Path made once and kept: the dictionaries
            # of a scan then find it by identity. A new Path per file and scan, compared
            # by its parts, was half of an idle scan's time (3000 files: 22 of ~45 ms).
            with os.scandir(self.path) as entries:
                names = [e.name for e in entries
                         if e.name.endswith(YAML_SUFFIXES) and not e.name.startswith(".")]
            paths = self._paths
            if len(paths) > 2 * len(names) + 64:  # many names gone: forget them
                self._paths = paths = {n: paths[n] for n in names if n in paths}
            candidates = []
            for name in names:
                path = paths.get(name)
                if path is None:
                    path = paths[name] = self.path / name
                candidates.append(path)
        else:
            candidates = [self.path]
        stamps: dict[Path, FileStamp] = {}
        unreadable: dict[Path, str] = {}
        for p in candidates:
            try:
                st = os.stat(p)
                self.progress.files += 1
            except FileNotFoundError:
                continue  # removed meanwhile, or a dangling symlink: gone
            except OSError as exc:
                unreadable[p] = f"{p}: cannot read: {exc.strerror or exc}"
                continue
            if stat.S_ISREG(st.st_mode):
                stamps[p] = FileStamp.of(st)
            else:  # a FIFO or /dev/zero behind a name was skipped without a word
                unreadable[p] = f"{p}: cannot read: not a regular file"
        return stamps, unreadable

    def scan(self) -> bool:
        """Re-read changed files; True when the set of good objects may have changed.

        Runs in a worker thread: it reads and parses files, and touches no shared state
        but this source's own dictionaries.
        """
        # The whole source gone (an unmounted volume, a directory being replaced) or
        # there but not listable (no permission, removed between two checks): keep
        # serving the last good objects, as a disconnected API server's are. Files
        # removed from a path that is still there are deletions.
        problem: str | None = None
        try:
            if self.path.exists():
                stamps, unreadable = self._list_files()
            else:
                problem = f"{self.path}: no such file or directory"
        except OSError as exc:
            # Raised from here, it would end the source for good, its status healthy.
            problem = f"{self.path}: cannot list: {exc.strerror or exc}"
        if problem is not None:
            if self._missing != problem:
                # Said of a wrong path at start too, it read as if something was served.
                what = ("keeping the last good objects" if self._reads else
                        "nothing is served from it until it can be read")
                log.error("source %s: %s; %s", self.name, problem, what)
            self._missing = problem
            return False
        for path, message in unreadable.items():
            if self._unreadable.get(path) != message:
                log.error("rejected %s; keeping its last good version", message)
        self._unreadable = unreadable
        changed = False
        # Only the files that may have changed are sorted (a stable order to read and log
        # them in): sorting every path, every scan, cost 3000 files ~40 % of the scan.
        fresh = [(path, stamp) for path, stamp in stamps.items()
                 if (last := self._reads.get(path)) is None or not last.holds(stamp)]
        for path, stamp in sorted(fresh):
            last = self._reads.get(path)
            if not self._settle.ready(path, stamp):
                continue
            try:
                read, data = read_file(path, stamp)
                self.progress.files += 1
            except FileNotFoundError:
                # Deleted since the listing (a ConfigMap key kubelet removed, a move): a
                # deletion like any other, not an error that rejects the file.
                del stamps[path]
                continue
            except OSError as exc:
                if self._errors.get(path) != f"{path}: {exc}":  # tried again while racy
                    log.error("rejected %s: cannot read: %s; keeping its last good version",
                              path, exc)
                self._errors[path] = f"{path}: {exc}"
                self._reads[path] = FileRead(stamp, b"", time.time_ns())
                continue
            self._reads[path] = read
            if last is not None and read.digest == last.digest:
                # Read again while its stamp could hide a change, or the same bytes under
                # a new stamp: a ConfigMap update gives every key a new inode, so each
                # update parsed and logged every file of the volume again.
                continue
            try:
                self.progress.parsing = True
                objects = parse_file_text(data.decode("utf-8"), str(path), self.name)
            except ManifestError as exc:
                if self._errors.get(path) != str(exc):
                    log.error("rejected %s; keeping its last good version", exc)
                self._errors[path] = str(exc)
                continue
            except UnicodeDecodeError as exc:
                log.error("rejected %s: cannot read: %s; keeping its last good version", path, exc)
                self._errors[path] = f"{path}: {exc}"
                continue
            except Exception as exc:
                # A parser defect must not end the source (every later change would be lost):
                # the file is rejected, loudly, with the traceback.
                log.exception("rejected %s: the parser failed; keeping its last good version",
                              path)
                self._errors[path] = f"{path}: parser failure: {exc!r}"
                continue
            finally:
                self.progress.parsing = False
                self.progress.files += 1
            self._errors.pop(path, None)
            self._good[path] = objects
            log.info("file loaded path=%s objects=%d", path, len(objects))
            changed = True
        changed |= self._remove(self._settle.due(set(self._reads) - set(stamps) - set(unreadable)))
        self._settle.end_scan(stamps)
        if self._missing is not None:
            self._missing = None
            log.info("source %s: the path is back", self.name)
        return changed

    def _remove(self, gone: list[Path]) -> bool:
        """Withdraw the files deleted (SettleGate.due); True when any was."""
        for path in gone:
            log.info("file removed path=%s", path)
            del self._reads[path]
            self._good.pop(path, None)
            self._errors.pop(path, None)
        return bool(gone)

    def merged(self) -> dict[ObjectId, Spec]:
        merged: dict[ObjectId, Spec] = {}
        for path in sorted(self._good):
            for oid, spec in self._good[path].items():
                if oid in merged:
                    log.warning("duplicate object %s in %s: first file wins", oid, path)
                    continue
                merged[oid] = spec
        return merged

    async def run(self, store: SnapshotStore) -> None:
        status = store.register_source(self.name)
        while True:
            changed = await self._scan(status)
            status.connected = True
            status.error = "; ".join([*self._errors.values(), *self._unreadable.values(),
                                      *filter(None, [self._missing])]) or None
            # A path that has never existed is not an empty configuration but most
            # likely a wrong one: the source stays unsynced (the gateway unready, DNS
            # SERVFAIL) with the error in its status until the path appears.
            if changed or (not status.synced and (self._missing is None or self._reads)):
                objects = self.merged()
                store.replace_source(self.name, objects)
                status.objects = len(objects)
                status.last_change = asyncio.get_running_loop().time()
                store.mark_synced(self.name)
                store.commit()
            await asyncio.sleep(pause_after_scan(self.poll_interval_s, self.progress))

    async def _scan(self, status: SourceStatus) -> bool:
        """scan(), said to be stuck while it gets through no file (watched_scan); the
        last good objects keep serving meanwhile."""

        def stuck(why: str) -> None:
            status.connected = False
            status.error = f"{self.path}: {why}"
            log.error("source %s: %s; keeping the last good objects", self.name, status.error)

        return await watched_scan(self.scan, f"scan {self.name}", self.progress, stuck)
