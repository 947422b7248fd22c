"""A directory on a filesystem with one-second timestamps (ext2 with 128-byte inodes, as
old ext3 volumes and some NFS servers have): two writes within one second leave mtime and
ctime as they were. Needs root, mkfs.ext2 and loop mounts; `coarse_fs_skip_reason()` says
why not otherwise. Modern ext4 and tmpfs stamp each write apart, so they cannot show it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def coarse_fs_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "loop mounts need root"
    if shutil.which("mkfs.ext2") is None or shutil.which("mount") is None:
        return "mkfs.ext2 or mount is not installed"
    return None


@contextmanager
def coarse_timestamps_dir(scratch: Path) -> Iterator[Path]:
    """A fresh, empty directory on such a filesystem, unmounted afterwards."""
    image, mnt = scratch / "coarse.img", scratch / "coarse"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-I", "128", str(image)], check=True,
                   capture_output=True, timeout=30)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)


def at_the_start_of_a_second() -> None:
    """Waits for a fresh second, so that what follows within ~0.5 s shares its stamps."""
    while time.time() % 1 > 0.1:
        time.sleep(0.01)


def same_stamps(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a rewrite left everything a stat shows as it was: the scenario these tests
    need, which a slow moment can spoil by crossing into the next second (then retried)."""
    return (after.st_mtime_ns, after.st_ctime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns, before.st_ctime_ns, before.st_size, before.st_ino)


TRIES: int = 5  # fresh seconds to try a within-one-second scenario in
