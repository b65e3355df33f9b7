"""A bounded, least-recently-used cache for plans and the buffers they hold."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Iterator

import torch


def tensor_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from ``value`` (tensors, and tuples,
    lists, dicts and objects with a ``tensors()`` method holding them)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if value.is_mkldnn:  # oneDNN's packed weights have no storage to look at
            address, size = id(value), value.numel() * value.element_size()
        else:
            storage = value.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
        if address in seen:
            return 0
        seen.add(address)
        return size
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "tensors"):
        value = value.tensors()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in value)
    return 0


class LruCache:
    """At most ``capacity`` entries, holding at most ``max_bytes`` of tensors between them
    (the newest entry is kept whatever its size); adding more drops the least recently used."""

    def __init__(self, capacity: int, max_bytes: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}

    def get(self, key: Hashable, default: Any = None) -> Any:
        value = self._entries.get(key, default)
        if key in self._entries:
            self._entries.move_to_end(key)
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        self._sizes[key] = tensor_bytes(value) if self.max_bytes is not None else 0
        while len(self._entries) > 1 and (len(self._entries) > self.capacity or self._over_bytes()):
            oldest, _ = self._entries.popitem(last=False)
            del self._sizes[oldest]

    def _over_bytes(self) -> bool:
        return self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def tensors(self) -> list:
        """The entries (for :func:`tensor_bytes`)."""
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()

    def nbytes(self, seen: set[int] | None = None) -> int:
        """Bytes of the tensors the entries hold."""
        return tensor_bytes(self, seen)
