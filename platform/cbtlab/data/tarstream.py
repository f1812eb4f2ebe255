"""Reading the members of a tar stream in order: the shard reader under the loader.

A shard is read once, front to back, from a file, a pipe or a remote stream, so all a reader
needs is each member's header (one 512-byte block) and its data (the next `size` bytes, padded
to whole blocks); this module parses the headers itself, in place of tarfile's stream mode.

It reads what Python's tarfile (and webdataset's TarWriter) writes, and GNU or POSIX tar: ustar
headers (a name's `prefix` field included), GNU long names ('L'; long link names 'K' are read
past), pax extended headers ('x' for the next member, 'g' for all after it; `path` and `size`
are applied), checksums, base-256 sizes, and gzip-, bz2- or xz-compressed tars (decompressed as
they stream, as tarfile's "r|*" does). It yields the regular files, skipping other members
(directories, links, devices) and webdataset's `__meta__` names, as `tar_file_iterator` does.

The end is the first zero block, or the end of the stream at a member boundary or inside the
end-of-archive zeros, where tarfile stops too (a shard cut at a boundary is caught by the
loader's count against the card). A stream that ends inside a member's data or padding raises
`TarStreamError`, as tarfile does; so do a header cut short, a bad checksum after the first
header (where tarfile would silently stop) and sparse members (which shards never hold).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
from collections.abc import Callable, Iterator
from typing import IO

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
# Headers that describe the member after them, not a member of their own.
_GNU_LONG_NAME, _GNU_LONG_LINK, _PAX, _PAX_GLOBAL = b"L", b"K", b"x", b"g"
_SPARSE = b"S"
# Links, devices, directories and FIFOs: tarfile reads no data after them, whatever their size.
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
# Names that webdataset's tar_file_iterator skips as metadata.
_META = re.compile(r"__[^/]*__($|/)")
# Compressed tars, by their first bytes (tried only when the first block is no tar header).
_COMPRESSED: tuple[tuple[bytes, Callable[..., IO[bytes]]], ...] = (
    (b"\x1f\x8b", gzip.open),
    (b"BZh", bz2.open),
    (b"\xfd7zXZ\x00", lzma.open),
)


class TarStreamError(ValueError):
    """The stream is not a readable tar: truncated, a damaged header, or an unsupported member."""


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular member of the tar (or compressed tar) `stream`, in order."""
    first = _read_exact(stream.read, BLOCK)
    if not first:
        raise TarStreamError("empty file: not a tar")
    if len(first) == BLOCK and (first == _ZERO_BLOCK or _checksum_ok(first)):
        yield from _members(stream.read, first)
        return
    for magic, open_compressed in _COMPRESSED:
        if first.startswith(magic):
            with open_compressed(_Replay(first, stream), "rb") as inner:
                yield from _members(inner.read, _read_exact(inner.read, BLOCK))
            return
    raise TarStreamError("not a tar (the first header's checksum is wrong)")


def _members(read: Callable[[int], bytes], header: bytes) -> Iterator[tuple[str, bytes]]:
    """The members from `header` (the first block, already read) on."""
    global_pax: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    offset = 0
    while True:
        if len(header) < BLOCK:
            # The stream ends at a member boundary, or inside the end-of-archive zeros: every
            # member is whole (tarfile stops here too). Part of a header is an error, where
            # tarfile would stop silently.
            if not header.strip(b"\0"):
                return
            raise TarStreamError(f"truncated header at byte {offset}")
        if header == _ZERO_BLOCK:  # the end-of-archive marker
            return
        if not _checksum_ok(header):
            raise TarStreamError(f"bad header checksum at byte {offset}")
        kind = header[156:157]
        size = _number(header[124:136])
        if kind in (_PAX, _PAX_GLOBAL, _GNU_LONG_NAME, _GNU_LONG_LINK):
            data = _read_data(read, size, offset)
            if kind == _PAX:
                pax = _parse_pax(data, offset)
            elif kind == _PAX_GLOBAL:
                global_pax.update(_parse_pax(data, offset))
            elif kind == _GNU_LONG_NAME:
                long_name = _text(data)
        else:
            fields = {**global_pax, **pax} if global_pax else pax
            if "size" in fields:
                size = int(fields["size"])
            if kind == _SPARSE or any(key.startswith("GNU.sparse.") for key in fields):
                raise TarStreamError(f"sparse member at byte {offset}: not supported")
            if "path" in fields:
                name = fields["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = _text(header[:100])
                prefix = header[345:500]  # ustar: a long name's leading directories
                if prefix[0]:
                    name = f"{_text(prefix)}/{name}"
            if kind in _NO_DATA or (kind == b"\0" and name.endswith("/")):  # old-style directory
                size = 0
            else:
                data = _read_data(read, size, offset)
                if kind in _REGULAR and not _META.match(name):
                    yield name, data
            pax, long_name = {}, None
        offset += BLOCK + size + -size % BLOCK
        header = _read_exact(read, BLOCK)


def _read_data(read: Callable[[int], bytes], size: int, offset: int) -> bytes:
    """A member's `size` bytes, and past the padding to its last block."""
    data = _read_exact(read, size)
    padding = -size % BLOCK
    if len(data) < size or (padding and len(_read_exact(read, padding)) < padding):
        raise TarStreamError(f"unexpected end of data in the member at byte {offset}")
    return data


def _read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream (a pipe may return short reads)."""
    data = read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    missing = size - len(data)
    while missing:
        part = read(missing)
        if not part:
            break
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field against the sum of its bytes (the field counted as spaces),
    unsigned or, as some old tars wrote it, signed."""
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + sum(header[156:]) + 8 * 32
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32
    return stored == signed


def _number(field: bytes) -> int:
    """A numeric header field: octal text (NUL- or space-terminated), or GNU base-256."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    """A NUL-terminated name, decoded as tarfile does by default (UTF-8, undecodable bytes
    kept as surrogates)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, offset: int) -> dict[str, str]:
    """The "<length> <key>=<value>\\n" records of a pax extended header."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarStreamError(f"malformed pax header at byte {offset}") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarStreamError(f"malformed pax header at byte {offset}")
        key, value = record[:-1].split(b"=", 1)
        fields[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


class _Replay:
    """A read-only stream: `head` (bytes already read), then the rest of `stream`."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data
