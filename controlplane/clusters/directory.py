"""Directory mode: DIR/<cluster-id>/*.yaml is a member cluster, OUT/<cluster-id>/ is what
the controller would write into it.

Reading: files are polled by stat, and read again while a change could hide under an
unchanged stamp (see FileRead); only changed files are parsed again (off the event
loop). A cluster's view is replaced only when every one of its files is good: a file that
does not parse or validate is rejected with its file and line and the cluster keeps its
last good view (a half-read cluster could drop a Service while keeping its export). A
cluster folder that goes missing or unreadable keeps the cluster's last view; once it has
been so for `stale_after_s` (a Kubernetes member's grace: StaleGrace) with no good scan
between, the cluster is marked disconnected, that view stale. A scan that gets through no
file for SCAN_STUCK_S (a stat or read hanging on a dead NFS or FUSE volume) is such a
failure too. A file that cannot even be looked at (a symlink loop, no permission) is
rejected like a bad one; nothing found in the folders ends the watch.

Writing: one file per object, `<kind>_<namespace>_<name>.yaml`, written by atomic rename
and only when the object changed; files no longer wanted are removed. Other files in OUT
are left alone. OUT is checked about once a second, as a kube client watches its own
objects: a file of ours deleted or edited by someone else is reported (the controller
writes it again) and a file named like ours that we did not write is reported too (the
controller removes it unless it wants it). An edit is told by the file's stamp and, while
that stamp could hide one (FileRead's racy rule, as for the member files), by its bytes:
a file whose stamp moved without its bytes changing (`touch`) is no edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from controlplane.clusters import (
    STALE_AFTER_S,
    ChangeSet,
    ClusterError,
    Connection,
    Notify,
    StaleGrace,
)
from controlplane.clusters.state import ClusterObjects
from controlplane.resources import (
    KIND_EXPORT,
    KIND_IMPORT,
    KIND_SLICE,
    ObjectRef,
    Parsed,
    parse_member_object,
)
from mcsproxy.config import CLUSTER_ID_RE
from mcsproxy.manifests import (
    ManifestError,
    document_objects,
    kind_error,
    load_yaml_documents,
)
from mcsproxy.sources.file import (
    YAML_SUFFIXES,
    FileRead,
    FileStamp,
    ScanProgress,
    SettleGate,
    pause_after_scan,
    read_file,
    watched_scan,
)
from mcsproxy.tasks import in_daemon_thread

log = logging.getLogger("controlplane.clusters.directory")

POLL_INTERVAL_S = 0.25
OUTPUT_CHECK_S = 1.0  # how often OUT is compared with what we wrote there
_UNREADABLE = FileRead(FileStamp(-1, -1, -1, -1), b"")  # a member file that cannot be stat'ed
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_KIND_BY_PREFIX = {"serviceimport": KIND_IMPORT, "endpointslice": KIND_SLICE,
                   "serviceexport": KIND_EXPORT}
_OUTPUT_NAME = re.compile(r"^(serviceimport|endpointslice|serviceexport)_([^_/]+)_([^_/]+)\.yaml\Z")

Obj = Mapping[str, Any]
FileObjects = dict[ObjectRef, Parsed]


# Linux's NAME_MAX (255 bytes), less what the temporary file beside it adds.
MAX_OUTPUT_NAME = 255 - len("..tmp")


def output_file_name(ref: ObjectRef) -> str:
    """`<kind>_<namespace>_<name>.yaml`, or, past MAX_OUTPUT_NAME (a 63-character
    namespace and a slice named after a long cluster ID), its start and a hash of the
    whole: such an object could not be written at all."""
    name = f"{ref.kind.lower()}_{ref.namespace}_{ref.name}.yaml"
    if len(name.encode()) <= MAX_OUTPUT_NAME:
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return f"{name[:MAX_OUTPUT_NAME - len(digest) - len('~.yaml')]}~{digest}.yaml"


def dump_yaml(obj: Obj) -> bytes:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True).encode()


def parse_cluster_file(text: str, origin: str, cluster: str) -> FileObjects:
    objects: FileObjects = {}
    for line, doc in load_yaml_documents(text, origin):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError("a document must be a mapping", origin, line)
        for at, item in document_objects(line, doc):
            if not isinstance(item, dict):
                raise ManifestError("a List item must be a mapping", origin, at)
            try:
                parsed = parse_member_object(item, cluster)
            except ManifestError as exc:
                raise exc.at(origin, at) from None
            if parsed is None:
                if (error := kind_error(item)) is not None:
                    raise ManifestError(error, origin, at)
                continue
            ref, record = parsed
            if ref in objects:
                raise ManifestError(f"duplicate {ref.kind} {ref.namespace}/{ref.name}",
                                    origin, at)
            objects[ref] = record
    return objects


def discover_clusters(clusters_dir: Path) -> tuple[list[str], dict[Path, str]]:
    """The cluster folders under DIR, and the folders that cannot be one (path → why):
    one misnamed folder must not hide the others. ClusterError when DIR cannot be listed."""
    try:
        entries = sorted(p for p in clusters_dir.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ClusterError(f"--clusters-dir {clusters_dir}: {exc.strerror or exc}") from None
    clusters: list[str] = []
    rejected: dict[Path, str] = {}
    for p in entries:
        if not CLUSTER_ID_RE.match(p.name) or len(p.name) > 253:
            rejected[p] = f"folder name {p.name!r} is not an RFC-1123 cluster ID"
        else:
            clusters.append(p.name)
    return clusters, rejected


@dataclass(slots=True)
class _Scan:
    unreadable: str | None = None
    stamps: dict[Path, FileStamp] = field(default_factory=dict)
    parsed: dict[Path, tuple[FileRead, FileObjects | ManifestError]] = field(
        default_factory=dict)
    removed: list[Path] = field(default_factory=list)  # deleted files to withdraw now


class DirectoryCluster:
    def __init__(self, cluster_id: str, clusters_dir: Path, output_dir: Path,
                 poll_interval_s: float = POLL_INTERVAL_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.cluster_id = cluster_id
        self.source_dir = clusters_dir / cluster_id
        self.out_dir = output_dir / cluster_id
        self.poll_interval_s = poll_interval_s
        self.objects = ClusterObjects()
        self.connection = Connection()
        # A folder away for a scan or two (`ln -sfn`, a folder replaced by two renames, an
        # NFS hiccup) made the member stale at once: every slice imported from it written
        # again in every member, twice (120 writes at 20 services and 3 members).
        self._grace = StaleGrace(stale_after_s, self._grace_over)
        self._notify: Notify | None = None  # while watching: a flip to stale is told to it
        self._cache: dict[Path, tuple[FileRead, FileObjects | ManifestError]] = {}
        self._committed: dict[Path, tuple[FileRead, FileObjects]] = {}
        self._settle = SettleGate()  # only _scan touches it, one scan at a time
        self._progress = ScanProgress()  # counted up by _scan's thread
        self._owner: dict[ObjectRef, set[Path]] = {}
        self._written: dict[str, Obj] = {}
        # Of _written's files, the version we wrote or last saw (None: it could not be
        # looked at). A stamp alone is not enough: an edit within the timestamp tick of
        # our write (a second on some filesystems) keeps it, `touch -r` puts mtime back.
        self._reads: dict[str, FileRead | None] = {}
        # Writes and the check of OUT run in worker threads: one at a time.
        self._out_lock = asyncio.Lock()
        self._next_output_check = 0.0
        self.files_written = 0
        self.files_deleted = 0

    # -- reading -------------------------------------------------------------------------
    def _scan(self) -> _Scan:
        """Stat every file and parse the changed ones. Runs in a worker thread and only
        reads this object's state."""
        try:
            names = [e for e in os.scandir(self.source_dir)
                     if e.name.endswith(YAML_SUFFIXES) and not e.name.startswith(".")]
        except OSError as exc:
            return _Scan(unreadable=f"{self.source_dir}: {exc.strerror or exc}")
        scan = _Scan()
        for entry in names:
            path = Path(entry.path)
            try:
                st = entry.stat()
                self._progress.files += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                # A symlink loop, no permission: neither gone nor readable. Raised from
                # here it would end the watch, the cluster still shown as connected.
                scan.stamps[path] = _UNREADABLE.stamp
                scan.parsed[path] = (_UNREADABLE, ManifestError(
                    f"cannot read: {exc.strerror or exc}", str(path)))
                continue
            stamp = FileStamp.of(st)
            scan.stamps[path] = stamp
            cached = self._cache.get(path)
            if cached is not None and cached[0].holds(stamp):
                continue
            if not self._settle.ready(path, stamp):
                continue  # the cache keeps the last version read, so nothing is dirty
            try:
                read, data = read_file(path, stamp)
                self._progress.files += 1
            except OSError as exc:
                read = FileRead(stamp, b"", time.time_ns())
                scan.parsed[path] = (read, ManifestError(f"cannot read: {exc}", str(path)))
                continue
            if cached is not None and cached[0] == read:
                # Read again while its stamp could hide a change: none. The new read
                # time is kept so the file is not read again and again.
                scan.parsed[path] = (read, cached[1])
                continue
            try:
                self._progress.parsing = True
                result: FileObjects | ManifestError = parse_cluster_file(
                    data.decode("utf-8"), str(path), self.cluster_id)
            except ManifestError as exc:
                result = exc
            except UnicodeDecodeError as exc:
                result = ManifestError(f"cannot read: {exc}", str(path))
            finally:
                self._progress.parsing = False
                self._progress.files += 1
            scan.parsed[path] = (read, result)
        # A move (the new file renamed into place, the old one deleted) withdrew the
        # export for a scan, and with it the ServiceImport in every cluster.
        scan.removed = self._settle.due(set(self._cache) - set(scan.stamps))
        self._settle.end_scan(scan.stamps)
        return scan

    def _set_connected(self, connected: bool, error: str | None, changes: ChangeSet) -> None:
        if self.connection.connected != connected:
            first = self.connection.since == 0.0
            self.connection.connected = connected
            self.connection.since = time.time()
            changes.connection = True
            if first and connected:
                pass
            elif connected:
                log.info("cluster %s readable again", self.cluster_id)
            else:
                log.error("cluster %s unreadable (%s): keeping its last state, stale",
                          self.cluster_id, error)
        if error != self.connection.error:
            changes.error = True
        self.connection.error = error

    def _commit(self, scan: _Scan) -> ChangeSet:
        changes = ChangeSet()
        if scan.unreadable is not None:
            self._failing(scan.unreadable, changes)
            return changes
        if self._grace.failing and self.connection.connected:
            log.info("cluster %s readable again", self.cluster_id)
        self._grace.connected(False, self.connection.connected)
        for gone in scan.removed:
            self._cache.pop(gone, None)
        self._cache.update(scan.parsed)
        errors = [str(r) for _, r in self._cache.values() if isinstance(r, ManifestError)]
        dirty = {p for p, (read, _) in self._cache.items()
                 if self._committed.get(p, (None,))[0] != read}
        dirty |= set(self._committed) - set(self._cache)
        # The same object may stand in several files (a Namespace repeated in each one)
        # as long as every copy says the same; it lives while any file holds it.
        owners: dict[ObjectRef, set[Path]] = {}
        if not errors:
            for path in dirty:
                for ref in self._committed.get(path, (None, {}))[1]:
                    owners.setdefault(ref, self._owner.get(ref, set()) - dirty)
            for path in sorted(dirty & set(self._cache)):
                objects = self._cache[path][1]
                assert not isinstance(objects, ManifestError)
                for ref, record in objects.items():
                    holders = owners.setdefault(ref, self._owner.get(ref, set()) - dirty)
                    for other in holders:
                        if self._record(other, ref) != record:
                            errors.append(f"{path}: {ref.kind} {ref.namespace}/{ref.name} "
                                          f"differs from its copy in {other}")
                            break
                    holders.add(path)
        error_text = "; ".join(sorted(errors)) or None
        if error_text != self.connection.error and error_text:
            log.error("cluster %s: rejected %s; keeping its last good state",
                      self.cluster_id, error_text)
        self._set_connected(True, error_text, changes)
        if errors:
            return changes
        for path in dirty:
            self._committed.pop(path, None)
            if path in self._cache:
                read, objects = self._cache[path]
                self._committed[path] = (read, objects)  # type: ignore[assignment]
        for ref, holders in owners.items():
            if holders:
                self._owner[ref] = holders
                self.objects.upsert(ref, self._record(min(holders), ref), changes)
            else:
                self._owner.pop(ref, None)
                self.objects.remove(ref, changes)
        return changes

    def _record(self, path: Path, ref: ObjectRef) -> Parsed:
        """The object as `path` holds it: its new version if just parsed, else committed."""
        cached = self._cache.get(path)
        if cached is not None and not isinstance(cached[1], ManifestError) and ref in cached[1]:
            return cached[1][ref]
        return self._committed[path][1][ref]

    def _failing(self, error: str, changes: ChangeSet) -> None:
        """The folder cannot be read now: stale once it has been so for the grace."""
        if self.connection.error != error and self.connection.connected:
            log.warning("cluster %s unreadable (%s): stale if it stays so for %g s",
                        self.cluster_id, error, self._grace.stale_after_s)
        self._set_connected(self._grace.connected(True, self.connection.connected), error,
                            changes)

    def _scan_stuck(self, why: str) -> None:
        """A scan hanging on the member's volume: the member showed connected, with no
        error, for as long as it hung."""
        changes = ChangeSet()
        self._failing(f"{self.source_dir}: {why}", changes)
        if changes and self._notify is not None:
            self._notify(self.cluster_id, changes)

    def _grace_over(self) -> None:
        """Still unreadable `stale_after_s` after the first failed scan: stale now."""
        changes = ChangeSet()
        self._set_connected(self._grace.connected(True, self.connection.connected),
                            self.connection.error, changes)
        if changes and self._notify is not None:
            self._notify(self.cluster_id, changes)

    async def _read_folder(self) -> ChangeSet:
        try:
            scan = await watched_scan(self._scan, f"scan {self.cluster_id}", self._progress,
                                      self._scan_stuck)
        except OSError as exc:  # whatever else the folder does: stale, never the end
            scan = _Scan(unreadable=f"{self.source_dir}: {exc.strerror or exc}")
        return self._commit(scan)

    async def sync(self) -> ChangeSet:
        changes = await self._read_folder()
        if not self.connection.connected or self.connection.error:
            raise ClusterError(f"cluster {self.cluster_id}: {self.connection.error}")
        return changes

    async def watch(self, notify: Notify) -> None:
        self._notify = notify
        try:
            await self._watch(notify)
        finally:
            self._notify = None
            self._grace.cancel()

    async def _watch(self, notify: Notify) -> None:
        while True:
            started = time.monotonic()
            changes = await self._read_folder()
            if started >= self._next_output_check and not self._out_lock.locked():
                self._next_output_check = started + OUTPUT_CHECK_S
                changes.update(await self._check_output())
            if changes:
                notify(self.cluster_id, changes)
            # A huge folder must not keep a core busy stat-ing (pause_after_scan).
            await asyncio.sleep(pause_after_scan(self.poll_interval_s, self._progress))

    # -- our output, checked -------------------------------------------------------------
    @staticmethod
    def _read_output(path: str, stamp: FileStamp | None) -> tuple[FileRead | None, bytes | str]:
        """An output file's version and bytes, or why it cannot be read."""
        if stamp is None:
            return None, "cannot be looked at"
        try:
            return read_file(Path(path), stamp)
        except OSError as exc:
            return None, str(exc)

    @staticmethod
    def _load_output(path: str, match: re.Match[str], data: bytes | str) -> Obj:
        """An output file as `data` holds it (a str: why it could not be read); a damaged
        one as a stub that is still ours by name (so it is replaced or removed)."""
        try:
            if isinstance(data, str):
                raise OSError(data)
            obj = yaml.load(data.decode("utf-8"), Loader=_Loader)
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
            # ValueError: also a value PyYAML resolves but cannot build (an edited date).
            log.warning("%s: unreadable earlier output (%s): it will be rewritten", path, exc)
            obj = None
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        kind = _KIND_BY_PREFIX[match.group(1)]
        if not isinstance(meta, dict) or obj.get("kind") != kind:
            obj = {"kind": kind, "metadata": {"namespace": match.group(2),
                                              "name": match.group(3)}}
        return obj

    def _output_changes(self) -> list[tuple[str, Obj | None, FileRead | None]]:
        """The files of OUT that are not as we left them: (name, what it holds now or None
        when gone, its version). Runs in a worker thread, under the output lock."""
        try:
            entries = {e.name: e for e in os.scandir(self.out_dir)}
        except FileNotFoundError:
            entries = {}
        except OSError as exc:  # nothing can be written there either: said by the writes
            log.debug("%s: cannot check (%s)", self.out_dir, exc)
            return []
        found: list[tuple[str, Obj | None, FileRead | None]] = []
        for name in self._written.keys() - entries.keys():
            found.append((name, None, None))
        for name, entry in sorted(entries.items()):
            match = _OUTPUT_NAME.match(name)
            if match is None:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                if name in self._written:
                    found.append((name, None, None))
                continue
            except OSError:
                stamp = None
            else:
                stamp = FileStamp.of(st)
            known = self._reads.get(name) if name in self._written else None
            if known is not None and stamp is not None and known.holds(stamp):
                continue
            read, data = self._read_output(entry.path, stamp)
            if known is not None and read is not None and read.digest == known.digest:
                # Read again while its stamp could hide a change, or touched: the same
                # bytes. The new read is kept so that it is not read again and again.
                self._reads[name] = read
                continue
            found.append((name, self._load_output(entry.path, match, data), read))
        return found

    async def _check_output(self) -> ChangeSet:
        """Report what someone else did to OUT, as a kube client reports our objects."""
        changes = ChangeSet()
        async with self._out_lock:
            found = await in_daemon_thread(self._output_changes, f"check {self.out_dir}")
            for name, obj, read in found:
                match = _OUTPUT_NAME.match(name)
                assert match is not None
                ref = ObjectRef(_KIND_BY_PREFIX[match.group(1)], match.group(2),
                                match.group(3))
                if obj is None:
                    self._written.pop(name, None)
                    self._reads.pop(name, None)
                else:  # what stands there now: a write of ours compares with it
                    self._written[name] = obj
                    self._reads[name] = read
                changes.published[ref] = obj
        return changes

    # -- writing -------------------------------------------------------------------------
    def _read_published(self) -> list[Obj]:
        found: list[Obj] = []
        try:
            entries = sorted(os.scandir(self.out_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise ClusterError(f"{self.out_dir}: {exc.strerror or exc}") from None
        for entry in entries:
            match = _OUTPUT_NAME.match(entry.name)
            if match is None:
                continue
            read, data = self._read_output(entry.path, self._stamp(entry.path))
            obj = self._load_output(entry.path, match, data)
            self._written[entry.name] = obj
            self._reads[entry.name] = read
            found.append(obj)
        return found

    @staticmethod
    def _stamp(path: str | Path) -> FileStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # checked again: read, compared, reported if it is not ours
        return FileStamp.of(st)

    async def read_published(self) -> list[Obj]:
        return await in_daemon_thread(self._read_published, f"read {self.out_dir}")

    def _write(self, objects: Sequence[Obj]) -> None:
        """Every object it can; then an OSError naming those it could not (each file on
        its own: one that failed used to leave the rest of the batch unwritten)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        failed: list[str] = []
        for obj in objects:
            meta = obj["metadata"]
            name = output_file_name(ObjectRef(obj["kind"], meta["namespace"], meta["name"]))
            if self._written.get(name) == obj:
                continue
            target = self.out_dir / name
            tmp = self.out_dir / f".{name}.tmp"
            data = dump_yaml(obj)
            try:
                tmp.write_bytes(data)
                renamed = time.time_ns()  # the file holds `data` from about now on
                os.replace(tmp, target)
            except OSError as exc:
                failed.append(f"{name}: {exc.strerror or exc}")
                with contextlib.suppress(OSError):
                    tmp.unlink()
                continue
            self._written[name] = obj
            # Stat'ed after the rename, so the stamp may already be of someone else's
            # edit: their ctime is then as fresh as ours, and the racy rule has the bytes
            # compared with ours at the next checks.
            stamp = self._stamp(target)
            self._reads[name] = None if stamp is None else FileRead.of(stamp, data, renamed)
            self.files_written += 1
        if failed:
            raise OSError(f"{len(failed)} of {len(objects)} files not written: "
                          + "; ".join(failed[:3]) + ("; ..." if len(failed) > 3 else ""))

    def _delete(self, refs: Sequence[ObjectRef]) -> None:
        for ref in refs:
            name = output_file_name(ref)
            self._written.pop(name, None)
            self._reads.pop(name, None)
            try:
                (self.out_dir / name).unlink()
                self.files_deleted += 1
            except FileNotFoundError:
                pass

    async def apply(self, objects: Sequence[Obj]) -> None:
        if objects:
            async with self._out_lock:
                await in_daemon_thread(partial(self._write, objects), f"write {self.out_dir}")

    async def update_export_status(self, export: Obj) -> None:
        async with self._out_lock:
            await in_daemon_thread(partial(self._write, [export]), f"write {self.out_dir}")

    async def delete(self, refs: Sequence[ObjectRef]) -> None:
        if refs:
            async with self._out_lock:
                await in_daemon_thread(partial(self._delete, refs), f"delete in {self.out_dir}")

    async def close(self) -> None:
        self._grace.cancel()
