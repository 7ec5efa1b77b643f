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
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from gcode_exp.atomic import atomic_write, torch_save
from gcode_exp.data.read import RecordedRun

log = logging.getLogger(__name__)
CACHE_VERSION = 9  # bump when what is cached changes
RELEASE_BYTES = 64 << 20  # bytes read from a mapped split between two releases of its pages: about what of the
# cache entry stays resident in a process, whatever the entry's size (docs/RESULTS.md, "Scale")
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
@dataclass
class MappedPages:
    """Where a group of tensors lies in this process's mapping of a cache entry, and the bytes read from
    them since their pages were last released. Without releases every page an epoch reads stays mapped
    and counts in the resident set, which then grows with the data; a released page stays in the page
    cache and is mapped again, without touching the disk, when next read."""

    start: int  # page-aligned span of the tensors' storages
    end: int
    vma: str  # the mapping's `start-end` in /proc/self/maps, its key in /proc/self/smaps
    unreleased: int = 0
    stopped: bool = False

    def note_read(self, nbytes: int) -> None:
        """Count bytes read from the tensors; release their pages every RELEASE_BYTES."""
        self.unreleased += nbytes
        if self.unreleased >= RELEASE_BYTES and not self.stopped:
            self.release()

    def release(self) -> None:
        """Drop this process's references to the span's pages (madvise MADV_DONTNEED). The mapping is
        private, so a page the process wrote is its own copy and would silently revert to the file's
        bytes: if the mapping holds any, nothing is released, now or later."""
        self.unreleased = 0
        if written_kb(self.vma) != 0:
            self.stopped = True
            log.warning("the memory-mapped data cache was written to in place (or its mapping changed): its pages "
                        "are no longer released, so this process's memory grows with the data it reads")
            return
        if _LIBC.madvise(self.start, self.end - self.start, mmap.MADV_DONTNEED) != 0:
            log.debug("madvise failed (errno %d): the cache's pages stay resident", ctypes.get_errno())


def mapped_pages(path: Path, tensors: list[torch.Tensor]) -> MappedPages | None:
    """The span of `tensors` in this process's mapping of `path`, or None where they do not all lie in
    one (tensors in memory, a platform without /proc or madvise): those are never released."""
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
                page = mmap.PAGESIZE
                return MappedPages(lo - lo % page, -(-hi // page) * page, fields[0])
    return None


def written_kb(vma: str) -> int | None:
    """kB of the mapping `vma` that this process wrote (its private copies), None if there is no such mapping."""
    try:
        smaps = "\n" + Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    head = smaps.find(f"\n{vma} ")
    field = smaps.find("\nAnonymous:", head)  # every mapping has this line: the first after its head is its own
    if head < 0 or field < 0:
        return None
    return int(smaps[field : field + 64].split()[1])
