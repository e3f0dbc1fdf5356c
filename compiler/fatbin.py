"""What device code a built CUDA library carries: the entries of the fatbins
embedded in it (SASS per arch, PTX), read from the bytes, so tests and
`kiln inspect` need no cuobjdump. Layout (as cuobjdump reads it): a fatbin is
a 16-byte header (magic 0xBA55ED50, version, header size, payload size) and
entries, each a header (kind: 1 PTX, 2 ELF/SASS; its own size; payload size;
...; arch at byte 28) followed by its payload."""

from __future__ import annotations

import struct

MAGIC = struct.pack("<I", 0xBA55ED50)
KINDS = {1: "ptx", 2: "sass"}


def fatbin_entries(blob: bytes) -> list[tuple[str, int]]:
    """[(kind, arch)] of every fatbin in `blob`, e.g. [("sass", 80), ("ptx", 90)]."""
    out = []
    i = blob.find(MAGIC)
    while i >= 0 and i + 16 <= len(blob):
        _, _, hsize, fsize = struct.unpack_from("<IHHQ", blob, i)
        off, end = i + hsize, min(i + hsize + fsize, len(blob))
        while off + 32 <= end:
            kind, _, ehsize, size = struct.unpack_from("<HHIQ", blob, off)
            (arch,) = struct.unpack_from("<I", blob, off + 28)
            if kind not in KINDS or ehsize < 32:
                break
            out.append((KINDS[kind], arch))
            off += ehsize + size
        i = blob.find(MAGIC, max(end, i + 4))
    return out


__all__ = ["fatbin_entries"]
