"""The two data caches: each recording's parsed table, and each prepared dataset.

The cache holds one entry per recording (its parsed table, keyed by the file's bytes, so adding a
file to a folder reads only that file) and one per prepared dataset (keyed by every file and the
data config). Entries are `torch.save` files loaded with `mmap=True`: their tensors stay in the page
cache and are read as windows are gathered, so a process does not copy the dataset into its own
memory; `MappedPages` drops the pages a process has read every RELEASE_BYTES, so its resident set
holds only what it read lately, not the whole entry after an epoch. Beside each entry, `<entry>.sum`
holds its size and CRC-32 and is written last: an entry without it, or whose bytes no longer match it,
is never trusted.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import sys
import tempfile
import weakref
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from gcode_exp.atomic import atomic_write, torch_save
from gcode_exp.data.read import RecordedRun

log = logging.getLogger(__name__)
CACHE_VERSION = 9  # bump when what is cached changes
RELEASE_BYTES = 16 << 20  # bytes gathered from mapped splits between two releases of their pages. A read maps
# more than it gathers (Linux 6.18 maps the page cache's whole large folios: 16 MB of windows left up to 110 MB
# of a 10x entry mapped), but no more than that, whatever the entry's size (docs/RESULTS.md, "Scale")
PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" and hasattr(mmap, "MADV_DONTNEED") else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class DamagedEntry(ValueError):
    """A cache entry whose bytes cannot be trusted (the message says why)."""


def writable_folder(cache_dir: str | None) -> Path | None:
    """The cache folder if this run can write into it; otherwise None, after one warning."""
    if not cache_dir:
        return None
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return folder
    except OSError as e:
        cache_off(folder, e)
        return None


def cache_off(folder: Path, error: OSError) -> None:
    """The one warning for a cache that cannot be written: the run goes on without it."""
    why = "not a folder" if folder.exists() and not folder.is_dir() else error.strerror or str(error)
    log.warning("data.cache_dir=%s: cannot write the cache (%s): cache turned off for this run", folder, why)


def file_hashes(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of each file's bytes; a file that cannot be read keys by its error (read_run reports it)."""
    out = {}
    for p in paths:
        try:
            out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError as e:
            out[p] = f"unreadable: {e!r}"
    return out


def recording_entry(folder: Path, path: Path, file_hash: str, max_nonfinite: float) -> Path:
    """Where one recording's parsed table is kept: keyed by its bytes, its path (messages name it) and
    the reading rule that may refuse it."""
    key = hashlib.sha256(f"v{CACHE_VERSION}\0{os.path.abspath(path)}\0{file_hash}\0{max_nonfinite}".encode())
    return folder / "recordings" / f"{key.hexdigest()[:24]}.pt"


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_entry(obj: dict, path: Path) -> None:
    """The entry, then its checksum file: the entry counts only once both are written."""
    torch_save(obj, path)
    stamp = f"{path.stat().st_size} {_crc(path)}\n"
    atomic_write(path.with_name(path.name + ".sum"), lambda tmp: Path(tmp).write_text(stamp))


def load_entry(path: Path) -> dict | None:
    """The entry with its tensors memory-mapped (copy-on-write), None if there is none; DamagedEntry
    if its bytes do not match its checksum or do not load."""
    stamp = path.with_name(path.name + ".sum")
    if not (path.is_file() and stamp.is_file()):
        return None
    try:
        size, crc = (int(v) for v in stamp.read_text().split())
    except ValueError:
        raise DamagedEntry("unreadable checksum file") from None
    if path.stat().st_size != size or _crc(path) != crc:
        raise DamagedEntry("checksum mismatch: its bytes were damaged")
    try:
        return torch.load(path, mmap=True, weights_only=True)  # data only: a cache runs no code
    except Exception as e:
        raise DamagedEntry(f"does not load: {e}") from None


def save_recording(run: RecordedRun, entry: Path) -> None:
    """One recording's parsed table into the cache; a failed write only costs a later re-read. Row texts
    are kept as a table of distinct lines plus an index, and every text in one JSON string: the safe
    unpickler takes ~10 us per object, so a list of thousands of strings would load slower than the CSV."""
    texts = list(dict.fromkeys(run.lines))
    where = {t: i for i, t in enumerate(texts)}
    meta = {k: v for k, v in vars(run).items() if k != "values"}
    blob = {"values": torch.from_numpy(run.values), "meta": json.dumps({**meta, "lines": texts}),
            "line_index": torch.tensor([where[t] for t in run.lines], dtype=torch.int32)}
    try:
        save_entry(blob, entry)
    except OSError as e:
        log.debug("cache entry %s not written: %s", entry, e)


def load_recording(entry: Path | None) -> RecordedRun | None:
    """A recording's parsed table from the cache (values mapped from disk), None if absent or damaged."""
    try:
        blob = load_entry(entry) if entry else None
        if blob is None:
            return None
        meta = json.loads(blob["meta"])
        texts = meta.pop("lines")
        return RecordedRun(**meta, values=blob["values"].numpy(), lines=[texts[i] for i in blob["line_index"].tolist()])
    except (DamagedEntry, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        log.warning("ignoring unreadable cache %s (%s); reading the recording again", entry, e)
        return None


# --- keeping only recently read pages of a mapped entry resident ------------------------------------
class MappedPages:
    """Where a group of tensors (a split) lies in this process's mapping of a cache entry. Without
    releases every page an epoch reads stays mapped and counts in the resident set, which then grows
    with the data. Every RELEASE_BYTES read from any mapped group, the pages of the groups read since are
    released: they stay in the page cache and are mapped again, without touching the disk, when next read.
    One budget for all groups, so that what training left mapped does not add to what evaluation maps."""

    live: ClassVar[weakref.WeakSet[MappedPages]] = weakref.WeakSet()  # every group of this process
    unreleased: ClassVar[int] = 0  # bytes read from any group since the last release

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end  # page-aligned
        self.read = False  # since the last release
        self.stopped = False  # written in place: never released again
        MappedPages.live.add(self)

    def note_read(self, nbytes: int) -> None:
        """Count bytes read from the group; release the groups read since the last release every RELEASE_BYTES."""
        self.read = True
        MappedPages.unreleased += nbytes
        if MappedPages.unreleased >= RELEASE_BYTES:
            MappedPages.unreleased = 0
            for group in list(MappedPages.live):
                if group.read:
                    group.release()

    def release(self) -> None:
        """Drop this process's references to the pages (madvise MADV_DONTNEED). The mapping is private,
        so a page the process wrote is its own copy and would silently revert to the file's bytes: if the
        group holds one, nothing is released, now or later."""
        self.read = False
        if self.stopped:
            return
        if written_pages(self.start, self.end) != 0:
            self.stopped = True
            log.warning("the memory-mapped data cache was written to in place: its pages are no longer released, "
                        "so this process's memory grows with the data it reads")
            return
        if _LIBC.madvise(self.start, self.end - self.start, mmap.MADV_DONTNEED) != 0:
            log.debug("madvise failed (errno %d): the cache's pages stay resident", ctypes.get_errno())


def mapped_pages(path: Path, tensors: list[torch.Tensor]) -> MappedPages | None:
    """The pages `tensors` lie in within this process's mapping of `path`, or None where they do not all
    lie in one (tensors in memory, a platform without /proc or madvise): those are never released."""
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors]
    spans = [(p, n) for p, n in spans if n]
    if _LIBC is None or not spans:
        return None
    lo, hi = min(p for p, _ in spans), max(p + n for p, n in spans)
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    target = os.path.realpath(path)
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            first, last = (int(a, 16) for a in fields[0].split("-"))
            if first <= lo and hi <= last:
                return MappedPages(lo - lo % PAGE, -(-hi // PAGE) * PAGE)
    return None


def written_pages(start: int, end: int) -> int | None:
    """How many pages of [start, end) hold this process's own copy rather than the file's (present but not
    file-backed, /proc/self/pagemap bits 63 and 61); None if that cannot be read."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            raw = os.pread(fd, (end - start) // PAGE * 8, start // PAGE * 8)
        finally:
            os.close(fd)
    except OSError:
        return None
    entries = np.frombuffer(raw, dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & ~(entries >> np.uint64(61)) & np.uint64(1)).sum())
