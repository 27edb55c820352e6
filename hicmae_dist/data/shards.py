"""Tar shards with a byte index: the writer prepare uses, the index the loader seeks with.

A shard is a plain tar (readable by `tar`, webdataset, tarfile) whose members are grouped into
samples by key, webdataset style: "id00012/21Uxsk56VDQ/00001.jpgs" is member "jpgs" of sample
"id00012/21Uxsk56VDQ/00001". Beside each shard-NNNNNN.tar, prepare writes shard-NNNNNN.json, the
shard's index: its keys, the byte boundaries of its samples (sample i is the byte range
boundaries[i]:boundaries[i + 1], headers included), the totals and the clips skipped while it
was filled. The loader streams a shard front to back, but with the boundaries it can also seek
straight to any sample (exact resume) without reading what comes before.

A shard without an index (made by another tool) is indexed by scanning its tar headers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 512
log = logging.getLogger(__name__)


def split_key(name: str) -> tuple[str, str]:
    """'a/b/c.jpgs' -> ('a/b/c', 'jpgs'): the key ends at the first dot of the last path part
    (webdataset's rule)."""
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no '.suffix' (webdataset samples need one)")
    return (f"{head}/{stem}" if head else stem), suffix


class TarShardWriter:
    """Writes samples ({'__key__': key, suffix: bytes, ...}) into one tar file, recording where
    each sample starts. Deterministic bytes: mtime 0, mode 0o444, no owner names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.boundaries = [0]
        self.keys: list[str] = []

    def write(self, sample: dict) -> int:
        """Append one sample; returns the bytes it took (headers and padding included)."""
        key = sample["__key__"]
        for suffix, data in sample.items():
            if suffix.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.file.write(info.tobuf(format=tarfile.GNU_FORMAT))  # GNU long names if needed
            self.file.write(data)
            self.file.write(b"\0" * (-len(data) % BLOCK))
        self.keys.append(key)
        self.boundaries.append(self.file.tell())
        return self.boundaries[-1] - self.boundaries[-2]

    def close(self) -> None:
        self.file.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ShardIndex:
    """Where each sample of one shard lies: sample i is bytes boundaries[i]:boundaries[i + 1]."""

    path: str
    boundaries: list[int]
    keys: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # the rest of the .json index (form, totals, skipped)

    def __len__(self) -> int:
        return max(0, len(self.boundaries) - 1)


def index_path(shard: str | Path) -> Path:
    return Path(shard).with_suffix(".json")


def load_index(shard: str | Path) -> ShardIndex:
    """The shard's .json index if it has a usable one, else an index made by scanning the tar
    (logged when the index is there but unreadable). An index that reaches past the end of the
    file is kept (the samples it cannot find count as bad samples) and says so in meta["short"]."""
    shard = Path(shard)
    side = index_path(shard)
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except (ValueError, OSError) as exn:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            log.warning("%s: unreadable index (%s: %s); scanning the tar instead", side, type(exn).__name__, exn)
            meta = {}
        if isinstance(meta, dict) and isinstance(meta.get("boundaries"), list):
            index = ShardIndex(str(shard), meta.pop("boundaries"), meta.pop("keys", []), meta)
            size = shard.stat().st_size
            if index.boundaries and index.boundaries[-1] > size:
                meta["short"] = (
                    f"the file ends at byte {size}, its index at {index.boundaries[-1]}: the samples "
                    f"past byte {size} are lost (truncated shard)"
                )
            return index
    return scan_tar(shard)


def scan_tar(shard: str | Path) -> ShardIndex:
    """Index a tar by reading its member headers (seeking over the data). A truncated tar gives
    the samples whose members all lie inside the file; a sample cut in two keeps the members
    that are whole, and fails when the loader decodes it."""
    shard = Path(shard)
    size = shard.stat().st_size
    boundaries: list[int] = []
    keys: list[str] = []
    end = 0
    problem = None
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    problem = (
                        f"member {info.name} ends at byte {info.offset_data + info.size}; the file ends at byte {size}"
                    )
                    break
                key, _ = split_key(info.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                    boundaries.append(info.offset)  # first header of the sample (long-name ones too)
                end = info.offset_data + info.size + (-info.size % BLOCK)
    except (tarfile.TarError, OSError, ValueError) as exn:  # truncated or corrupt after some point
        problem = f"{type(exn).__name__}: {exn}" + (f" (the file ends at byte {size})" if keys else "")
    boundaries.append(end)  # [0] with no sample: an empty index, never a negative length
    if not problem and size < end + 2 * BLOCK:  # tarfile takes a cut at a header for the archive's end
        problem = f"the file ends at byte {size}, before the end-of-archive marker after byte {end}"
    meta = {"scanned": True}
    if problem:
        meta["truncated"] = problem
    return ShardIndex(str(shard), boundaries, keys, meta)


class ShortRead(IOError):
    """The shard ends before the sample does (a truncated shard)."""


def parse_sample(blob: bytes) -> dict[str, bytes]:
    """The bytes of one sample's tar members (headers included) -> {suffix: data, '__key__': key}.

    Plain ustar/GNU headers are parsed here (fast); anything else goes through tarfile."""
    out: dict[str, bytes] = {}
    pos, n = 0, len(blob)
    long_name = None
    while pos + BLOCK <= n:
        header = blob[pos : pos + BLOCK]
        if header.count(0) == BLOCK:
            break
        _check_header(header, pos)
        size = _octal(header[124:136])
        flag = header[156:157]
        start, pos = pos + BLOCK, pos + BLOCK + size + (-size % BLOCK)
        data = blob[start : start + size]
        if len(data) < size:
            raise ShortRead(
                f"member data cut at byte {start + len(data)} of the sample (needs {size} from byte {start})"
            )
        if flag == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        if flag in (b"x", b"g"):  # pax headers: let tarfile deal with the whole thing
            return _parse_with_tarfile(blob)
        if flag not in (b"0", b"\0", b"7"):
            continue  # directories, links: not sample data
        name = long_name or _ustar_name(header)
        long_name = None
        key, suffix = split_key(name)
        if out.setdefault("__key__", key) != key:
            raise ValueError(f"sample holds members of two keys: {out['__key__']!r} and {key!r}")
        out[suffix] = data
    if "__key__" not in out:
        raise ShortRead("no complete member")
    return out


def _check_header(header: bytes, pos: int) -> None:
    try:
        stored = _octal(header[148:156])
    except ValueError as exn:
        raise ValueError(f"corrupt tar header at byte {pos}: {exn}") from None
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise ValueError(f"corrupt tar header at byte {pos} (bad checksum)")


def _octal(field_: bytes) -> int:
    if field_[:1] in (b"\x80", b"\xff"):  # GNU base-256
        return int.from_bytes(field_[1:], "big", signed=field_[:1] == b"\xff")
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _parse_with_tarfile(blob: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                key, suffix = split_key(info.name)
                out.setdefault("__key__", key)
                out[suffix] = tar.extractfile(info).read()
    return out


class ShardReader:
    """Reads samples by (shard index, sample number), keeping the current shard open so that a
    front-to-back pass is one sequential read."""

    def __init__(self, shards: list[ShardIndex]):
        self.shards = shards
        self._open: tuple[int, object] | None = None

    def read(self, shard: int, i: int) -> dict[str, bytes]:
        """The sample's members plus '__key__' and '__url__'; raises on a short or bad read."""
        index = self.shards[shard]
        if self._open is None or self._open[0] != shard:
            self.close()
            self._open = (shard, open(index.path, "rb"))
        f = self._open[1]
        start, end = index.boundaries[i], index.boundaries[i + 1]
        if f.tell() != start:
            f.seek(start)
        blob = f.read(end - start)
        if len(blob) < end - start:  # the file's own size: a seek past its end reads nothing
            raise ShortRead(
                f"shard ends at byte {os.fstat(f.fileno()).st_size}, sample {i} needs bytes "
                f"{start}:{end} (truncated shard)"
            )
        sample = parse_sample(blob)
        sample["__url__"] = index.path
        return sample

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
