"""Which items each step reads, as a pure function of (seed, step): resumable and rank-independent.

DiT shuffles with a DistributedSampler seeded per epoch and restarts the epoch after a resume (issue #35).
Here the *global* batch of step s is fixed by the seed alone: epoch e = s // steps_per_epoch is the
permutation `randperm(n, seed * 1_000_003 + e)`, step s reads the slice `(s % steps_per_epoch) * B : + B` of
it, and rank r of W takes `[r::W]` of that list. So
  - resuming at step k yields exactly the batches an uninterrupted run would have read from step k on;
  - 1 process and W processes read the same global batch (the union of the rank slices);
  - every index is read once per epoch (with drop_last, the n % B left over are skipped that epoch only).

Random horizontal flips must also survive resumes and worker processes, so datasets decide them from
`flip_decision(seed, index, epoch)`. A DataLoader worker holds a copy of the dataset made when its iterator
started, so `dataset.set_epoch(e)` on the main process does not reach it; with `with_epoch=True` this sampler
yields `(index, epoch)` pairs instead of plain indices, and every ditk dataset accepts both forms.
"""

from __future__ import annotations

from typing import Iterator, Union

import torch

from ..errors import ConfigError

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A well-mixed 64-bit hash (Steele et al.'s SplitMix64 finaliser): pure integer arithmetic, so the same
    # on every machine and process (Python's hash() of tuples is implementation defined).
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, index: int, epoch: int) -> bool:
    """True for about half of all (seed, index, epoch): whether item `index` is flipped in `epoch`."""
    h = _splitmix64((int(seed) & _MASK64) ^ 0x5DEECE66D)
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return bool(h >> 63)


IndexLike = Union[int, tuple]


def split_index(item: IndexLike, default_epoch: int) -> tuple[int, int]:
    """`i` or `(i, epoch)` -> (i, epoch); a bare index uses the dataset's `set_epoch` value."""
    if isinstance(item, (tuple, list)):
        index, epoch = item
        return int(index), int(epoch)
    return int(item), int(default_epoch)


class ResumableBatchSampler:
    """Infinite iterator over steps; each step yields this rank's list of indices of the global batch.

    Pass it as `DataLoader(dataset, batch_sampler=...)`. `start_step` is the first step to yield (the number
    of optimizer steps already taken when resuming).
    """

    def __init__(
        self,
        num_items: int,
        global_batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        with_epoch: bool = False,
    ):
        if num_items <= 0:
            raise ConfigError("the dataset is empty: check data.path or the dataset settings")
        if global_batch_size <= 0:
            raise ConfigError(f"global batch size must be positive, got {global_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        if global_batch_size % world_size:
            raise ConfigError(
                f"global batch size {global_batch_size} must be divisible by the number of processes "
                f"{world_size}: change train.global_batch_size or the process count"
            )
        if drop_last and global_batch_size > num_items:
            raise ConfigError(
                f"global batch size {global_batch_size} is larger than the dataset ({num_items} items): "
                "lower train.global_batch_size"
            )
        if start_step < 0:
            raise ConfigError(f"start step must be >= 0, got {start_step}")
        self.num_items = int(num_items)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.with_epoch = bool(with_epoch)
        B, n = self.global_batch_size, self.num_items
        self.steps_per_epoch = n // B if drop_last else -(-n // B)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def global_batch(self, step: int) -> list[int]:
        """All ranks' indices of `step`, in order (rank r's part is `[r::world_size]`)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        B = self.global_batch_size
        return self.permutation(epoch)[k * B : (k + 1) * B].tolist()

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        epoch, perm = None, None
        B = self.global_batch_size
        while True:
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:  # one randperm per epoch, not per step
                epoch, perm = e, self.permutation(e)
            mine = perm[k * B : (k + 1) * B][self.rank :: self.world_size].tolist()
            yield [(i, epoch) for i in mine] if self.with_epoch else mine
            step += 1
