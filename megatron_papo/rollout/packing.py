"""Tensors packed into one flat byte buffer, and shared-memory byte buffers.

The weight sync and the engine adapter exchange weights as a byte buffer plus a list of
`PackedTensor` entries (name, dtype, shape, byte offset); `pack_layout` assigns the offsets, every
tensor starting at a multiple of `ALIGN` bytes (dtype views need alignment).
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class PackedTensor:
    """One tensor in a flat byte buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the buffer's start

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor as a view of `buffer` (uint8)."""
        return buffer[self.offset:self.end].view(self.dtype).view(self.shape)


def pack_layout(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], start: int = 0) -> list[PackedTensor]:
    """Offsets for (name, dtype, shape) in order, from byte `start` (aligned)."""
    out, offset = [], aligned(start)
    for name, dtype, shape in specs:
        out.append(PackedTensor(name, dtype, tuple(shape), offset))
        offset = aligned(out[-1].end)
    return out


def packed_end(entries: list[PackedTensor]) -> int:
    """Bytes a buffer needs to hold `entries`."""
    return max((e.end for e in entries), default=0)


def shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class SharedBuffer:
    """Bytes in a file under /dev/shm, mapped here; other processes on this host map it by `path`.

    Meant to be reused for every bucket of a sync: writing into fresh shared memory costs ~10x the
    copy itself (page faults), paid once per buffer. `close` frees it (mappings elsewhere keep
    their pages until dropped)."""

    def __init__(self, nbytes: int):
        fd, self.path = tempfile.mkstemp(prefix="megatron_papo_weights_", dir=shared_dir())
        os.close(fd)
        self.bytes = torch.from_file(self.path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)

    @property
    def nbytes(self) -> int:
        return self.bytes.numel()

    def unlink(self) -> None:
        """Remove the file name (the pages live on while mapped)."""
        if self.path is not None:
            os.unlink(self.path)
            self.path = None

    def close(self) -> None:
        self.unlink()
        self.bytes = torch.empty(0, dtype=torch.uint8)


def map_shared(path: str, nbytes: int) -> torch.Tensor:
    """Another process's SharedBuffer, mapped here (writes are seen by every mapping)."""
    return torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
