"""Tensor parallelism without processes: ranks as threads, an all-reduce between them.

``run_ranks(ranks, work)`` runs ``work(rank, all_reduce)`` on one thread per rank, where
``all_reduce(tensor)`` returns the sum of every rank's tensor (each rank waits for the others,
as ``torch.distributed.all_reduce`` does), and returns the ranks' results in rank order.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch


def run_ranks(ranks: int, work: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], Any],
              timeout: float = 60.0) -> list[Any]:
    barrier = threading.Barrier(ranks)
    slots: list = [None] * ranks
    results: list = [None] * ranks
    errors: list = []

    def all_reduce_for(rank: int):
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait(timeout)
            total = sum(slots[1:], slots[0])
            barrier.wait(timeout)
            return total
        return all_reduce

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, all_reduce_for(rank))
        except BaseException as error:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    assert all(result is not None for result in results), "a rank did not finish"
    return results
