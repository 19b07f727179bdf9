"""Byte ranges of the `nixl` transport's staging buffer: first fit over a sorted free list.

A range is taken when a READ is posted and given back only when NIXL reports the READ
ended (DONE or ERR), never when the transport gave up on it (`nixl.NixlTransport` explains
why). Ranges are aligned to 64 bytes (cache lines) so that copies out of them stay fast.
"""

from __future__ import annotations

import bisect

ALIGN = 64


class StagingRanges:
    """Allocator of ``[offset, offset + size)`` ranges in a buffer of `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < ALIGN:
            raise ValueError(f"staging capacity must be an int >= {ALIGN} bytes, got {capacity!r}")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (offset, size), sorted, merged
        self.num_bytes_used = 0

    def take(self, size: int) -> int | None:
        """Offset of a free range of `size` bytes, or None when none is free now."""
        size = -(-size // ALIGN) * ALIGN
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                self.num_bytes_used += size
                return offset
        return None

    def give_back(self, offset: int, size: int) -> None:
        size = -(-size // ALIGN) * ALIGN
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        self.num_bytes_used -= size
        # Merge with the right, then the left neighbour.
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
