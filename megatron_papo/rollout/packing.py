"""Tensors packed into one flat byte buffer, and shared-memory byte buffers.

The weight sync and the engine adapter exchange weights as a byte buffer plus a list of
`PackedTensor` entries (name, dtype, shape, byte offset); `pack_layout` assigns the offsets, every
tensor starting at a multiple of `ALIGN` bytes (dtype views need alignment).
"""
from __future__ import annotations

import math
import os
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


class SharedBuffer:
    """Bytes in an anonymous shared-memory file (memfd), mapped here; other processes on this host
    map it by `path` (/proc/<pid>/fd/<fd>) while this object is open.

    Anonymous: the memory goes back to the system when the last process holding it ends, however
    it ends (a SIGKILLed trainer cannot leave gigabytes behind in /dev/shm). Meant to be reused for
    every bucket of a sync: writing into fresh shared memory costs ~10x the copy itself (page
    faults), paid once per buffer. `close` drops this process's hold."""

    def __init__(self, nbytes: int):
        if not hasattr(os, "memfd_create"):
            raise RuntimeError("weight sync needs Linux (os.memfd_create) for its shared-memory buffers")
        self._fd = os.memfd_create("megatron_papo_weights", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, max(nbytes, 1))
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self.bytes = map_shared(self.path, nbytes)

    @property
    def nbytes(self) -> int:
        return self.bytes.numel()

    def close(self) -> None:
        self.bytes = torch.empty(0, dtype=torch.uint8)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def map_shared(path: str, nbytes: int) -> torch.Tensor:
    """Another process's SharedBuffer, mapped here (writes are seen by every mapping)."""
    return torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
