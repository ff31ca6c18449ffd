"""Pure work-splitting arithmetic, shared by every layer that splits work: which worker
owns each item, and how many threads a process may take on its node.

Nothing here imports anything of wsurgery's or touches a process group, so the io layer
(a sharded write split across ranks) and the distributed layer use the same split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def split_by_bytes(sizes: Sequence[int], world_size: int) -> list[int]:
    """The worker that owns each item: the largest first, each to the least-loaded worker
    (the lowest on a tie). Deterministic, so every rank computes the same split.

    Args:
        sizes: each item's bytes.
        world_size: how many workers share them (at least 1).

    Returns:
        The owner of each item, in the items' order.

    Example:
        >>> split_by_bytes([10, 1, 7, 3], 2)
        [0, 1, 1, 1]
    """
    import heapq

    owner = [0] * len(sizes)
    heap = [(0, r) for r in range(max(1, world_size))]  # (load, rank): the least loaded, lowest rank first
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + sizes[i], r))
    return owner


def node_share(cores: int | None, local_world_size: int) -> int:
    """One local process's share of a node's cores: ``max(1, cores // local_world_size)``.

    Args:
        cores: the cores this process may run on (None: unknown, taken as 1).
        local_world_size: the processes on this node (``LOCAL_WORLD_SIZE``).

    Example:
        >>> node_share(16, 2), node_share(2, 4)
        (8, 1)
    """
    return max(1, (cores or 1) // max(1, local_world_size))


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system says, else the count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
