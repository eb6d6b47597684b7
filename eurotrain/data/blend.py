"""Which row of which source fills each global sequence slot: blending and shuffling.

Slot g (0, 1, 2, ... over the whole run) is given to a source by a fixed low-discrepancy
schedule, not by random draws: each source s gets c_s of every PERIOD slots (c_s / PERIOD is its
weight, rounded by largest remainder), and its k-th slot of a period sits at the ideal time
(k + 1/2) / c_s. So over any window of n slots each source's count is within about 2 of
weight * n (0.2% of a 1,000-sequence window). Because rows are fixed-length, sequence shares are
token shares.

The j-th slot of source s reads row perm_{s,e}[j mod N_s] with e = j div N_s, a permutation of
the source's N_s rows seeded by (seed, s, e): every row once per epoch of that source, in an
order that depends only on the seed. Everything is a pure function of g, so a loader resumes
from a slot number alone.
"""

from __future__ import annotations

import numpy as np

from eurotrain.configtools import ConfigError

PERIOD = 1 << 16


def integer_shares(weights: list[float], total: int) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder method)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))  # biggest remainder first
    counts[order[:short]] += 1
    return counts


class BlendSchedule:
    """Maps global slots to (source id, the source's own slot number), vectorised."""

    def __init__(self, weights: list[float], names: list[str] | None = None) -> None:
        names = names or [str(i) for i in range(len(weights))]
        self.counts = integer_shares(weights, PERIOD)
        for name, c, w in zip(names, self.counts, weights):
            if c == 0:
                raise ConfigError(
                    f"data source {name!r}: weight {w} is below 1/{PERIOD} of the total "
                    f"weight; raise it or drop the source"
                )
        src = np.repeat(np.arange(len(weights)), self.counts)
        k = np.concatenate([np.arange(c) for c in self.counts])
        # (2k + 1) / (2 c): exact rationals rounded once, so equal times compare equal and
        # ties go to the lower source id.
        ideal = (2 * k + 1) / (2 * self.counts[src])
        order = np.lexsort((src, ideal))
        self.slot_source = src[order]
        self.slot_rank = k[order]

    def assign(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        period, r = np.divmod(np.asarray(slots, dtype=np.int64), PERIOD)
        src = self.slot_source[r]
        return src, period * self.counts[src] + self.slot_rank[r]


class ShuffledRows:
    """A source's j-th slot -> its row: one seeded permutation per epoch of the source."""

    def __init__(self, num_rows: int, seed: int, source_id: int, shuffle: bool = True) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.source_id = source_id
        self.shuffle = shuffle
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # a batch spans at most two epochs of a source
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, self.source_id, epoch])
            self._cache[epoch] = rng.permutation(self.num_rows)
        return self._cache[epoch]

    def rows(self, j: np.ndarray) -> np.ndarray:
        epoch, pos = np.divmod(j, self.num_rows)
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        for e in np.unique(epoch).tolist():
            mask = epoch == e
            out[mask] = self._perm(e)[pos[mask]]
        return out
