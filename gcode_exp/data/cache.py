"""The two data caches: each recording's parsed table, and each prepared dataset.

The cache holds one entry per recording (its parsed table, keyed by the file's bytes, so adding a
file to a folder reads only that file) and one per prepared dataset (keyed by every file and the
data config). Entries are `torch.save` files loaded with `mmap=True`: their tensors stay in the page
cache and are read as windows are gathered, so a process does not copy the dataset into its own
memory; a split's input rows, which an epoch reads whole, are read with pread (`RowFile`), so that
the pages an epoch reads are not mapped into the process either. Beside each entry, `<entry>.sum`
holds its size and CRC-32 and is written last: an entry without it, or whose bytes no longer match it,
is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
import zlib
from pathlib import Path

import torch

from gcode_exp.atomic import atomic_write, torch_save
from gcode_exp.data.read import RecordedRun

log = logging.getLogger(__name__)
CACHE_VERSION = 11  # bump when what is cached changes


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


# --- reading a mapped entry's rows without mapping them ---------------------------------------------
class RowFile:
    """A 2-D tensor of a cache entry, read from the file with pread rather than through the memory map.
    Every page read through the map stays mapped and counts in the resident set, so an epoch over all
    windows made it grow with the data (and Linux maps the page cache's whole large folio around each
    read); pread copies the rows asked for from the page cache, and the process holds only its batch."""

    def __init__(self, fd: int, offset: int, like: torch.Tensor) -> None:
        self.fd, self.offset = fd, offset  # the open file (closed with this object), where the tensor's bytes start
        weakref.finalize(self, os.close, fd)
        self.rows, self.channels = like.shape
        self.dtype, self.row_bytes = like.dtype, like.shape[1] * like.element_size()

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at a 1-D index tensor, [len(index), channels]: one read per run of consecutive rows (a
        window is one run)."""
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        out = torch.empty(len(index), self.channels, dtype=self.dtype)
        buf, size = memoryview(out.numpy()).cast("B"), self.row_bytes
        cuts = [0, *(torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1).tolist(), len(index)]
        firsts = index[cuts[:-1]].tolist() if len(index) else []
        for a, b, first in zip(cuts, cuts[1:], firsts):
            if os.preadv(self.fd, [buf[a * size : b * size]], self.offset + first * size) != (b - a) * size:
                raise OSError("a cache entry is shorter than its rows")
        return out


def row_file(path: Path, tensor: torch.Tensor) -> RowFile | None:
    """`tensor`, loaded from `path` with mmap=True, as a RowFile: where its bytes lie in the file follows
    from this process's mapping of it (/proc/self/maps). None where there is no such mapping (another
    platform, a tensor in memory): it is then read through the map."""
    if tensor.dim() != 2 or not tensor.is_contiguous():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    ptr, inode = tensor.data_ptr(), os.fstat(fd).st_ino
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        first, last = (int(a, 16) for a in fields[0].split("-"))
        if first <= ptr and ptr + tensor.nbytes <= last and int(fields[4]) == inode:  # this file's mapping
            return RowFile(fd, ptr - first + int(fields[2], 16), tensor)
    os.close(fd)
    return None
