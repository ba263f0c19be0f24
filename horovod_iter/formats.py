"""Readers of common shard formats for `ShardedDataset`, fast and resumable (``start=``).

``read_tar`` reads the WebDataset layout: a tar file whose members are grouped into samples by
their key (the member name up to the first dot of its base name: ``0001.jpg`` and ``0001.cls``
are one sample ``{"__key__": "0001", "jpg": b"...", "cls": b"..."}``). It parses the tar
headers itself over a memory map instead of going through ``tarfile`` (which builds a
``TarInfo`` and a file object per member), and a resume skips samples by their headers
without reading their data.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["read_tar"]

_BLOCK = 512


def read_tar(path: str | os.PathLike[str], start: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of a WebDataset-layout tar shard from the ``start``-th on: dicts of
    ``{"__key__": key, extension: bytes, ...}``, in the order of the archive. Give it to
    `ShardedDataset` as ``read`` (it accepts ``start=``, so a resume seeks). Raises
    ``ValueError`` naming the file and the byte offset for a truncated or non-tar file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield from _samples(mm, path, start)


def _samples(mm: Any, path: str, start: int) -> Iterator[dict[str, Any]]:
    """One loop over the headers (the per-member cost is what makes a tar reader fast)."""
    n, off = len(mm), 0
    long_name: bytes | None = None
    key: bytes | None = None
    sample: dict[str, Any] = {}
    index = -1
    exts: dict[bytes, str] = {}
    while True:
        if off + _BLOCK > n:  # a tar ends with zero blocks: a file cut short
            raise ValueError(f"{path}: truncated tar (it ends at byte {n} without the "
                             "end-of-archive blocks)")
        h = mm[off:off + _BLOCK]
        if h[0] == 0 and h.count(0) == _BLOCK:
            break  # the end-of-archive blocks
        field = h[124:136]
        try:
            size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else \
                int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
        except ValueError:
            raise ValueError(f"{path}: not a tar file (bad header at byte {off})") from None
        kind = h[156]
        data = off + _BLOCK
        if data + size > n:
            raise ValueError(f"{path}: truncated tar (member at byte {off} needs {size} bytes)")
        off = data + ((size + _BLOCK - 1) & -_BLOCK)
        if kind == 76:  # "L": GNU long name of the next member
            long_name = mm[data:data + size].rstrip(b"\0")
            continue
        if kind in (120, 103):  # "x", "g": pax headers, maybe a long path for the next one
            for line in mm[data:data + size].splitlines():
                _, _, kv = line.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:]
            continue
        if kind not in (48, 0, 55):  # "0", "\0", "7": regular files; others carry no data
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = h[:100].rstrip(b"\0")
            if h[345] and h[257:262] == b"ustar":
                name = h[345:500].rstrip(b"\0") + b"/" + name
        dot = name.find(b".", name.rfind(b"/") + 1)
        k, ext = (name, b"") if dot < 0 else (name[:dot], name[dot + 1:])
        if k != key:
            if index >= start and key is not None:
                yield sample
            key, index = k, index + 1
            sample = {"__key__": k.decode()}
        if index >= start:
            e = exts.get(ext)
            if e is None:
                e = exts[ext] = ext.decode()
            sample[e] = mm[data:data + size]  # a copy: bytes outlive the map
    if key is not None and index >= start:
        yield sample
