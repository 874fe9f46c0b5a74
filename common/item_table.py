"""The population's item table: per hashed item, the sum of its ratings, the sum of its raters' offsets from their
own mean rating, and the raters' count. A node builds its own (client/item_statistics.py), SecAgg+ sums them
(server/item_statistics.py), the server sends the sum back; all sides agree here on the buckets and the layout of
the one vector SecAgg+ sums.

Items are named by their text, hashed into BUCKETS buckets, so the server needs no catalogue (a node's table only
ever leaves masked). With 2**16 buckets a MovieLens movie shares its bucket with one of the other 1,681 with
probability about 2.5 %. One node's values in a bucket stay within SecAgg+'s clipping range (16) unless four of its
own items share that bucket.

Under `--item-dp-epsilon` the table is a user-level differentially private release: each training user's table is
scaled down to L2 norm at most the clip (ratings sent centred, as rating minus CENTRE), every node adds its share of
Gaussian noise before SecAgg+ masks it, and the server keeps the buckets whose noisy count clears KEEP_ABOVE noise
standard deviations (post-processing: no privacy cost; the accounting is common/privacy.py's). Reading such a
table shrinks each item harder, by NOISE_SHRINK pseudo-ratings per unit of noise std. The three constants were
chosen on the test users' validation items (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

from common import protocol as p

BUCKETS = 2**16
SHRINK = 5.0  # pseudo-ratings at the population's mean (offset 0) per item: an item few rated stays near it
LOWEST, CENTRE, HIGHEST = 1.0, 3.0, 5.0  # the rating scale of the tasks with an item table
NOISE_SHRINK = 2.0  # a noisy table's extra pseudo-ratings per unit of its noise std
KEEP_ABOVE = 2.0  # a noisy table keeps the buckets whose count exceeds this many noise stds


def bucket(text: str) -> int:
    """The bucket of an item's text (stable across machines and processes)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % BUCKETS


@dataclass(frozen=True)
class ItemReading:
    """What the table says of one item: its raters' shrunk mean rating and mean offset, and how many they are."""

    mean: float
    offset: float
    raters: int


@dataclass
class ItemTable:
    """Rating sums, offset sums and rater counts per bucket."""

    ratings: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    noise_std: float = 0.0  # of the Gaussian noise in each sum (--item-dp-epsilon); 0: exact sums

    @classmethod
    def empty(cls) -> ItemTable:
        return cls(np.zeros(BUCKETS), np.zeros(BUCKETS), np.zeros(BUCKETS))

    def add(self, text: str, rating: float, offset: float) -> None:
        b = bucket(text)
        self.ratings[b] += rating
        self.offsets[b] += offset
        self.counts[b] += 1.0

    def plus(self, other: ItemTable) -> ItemTable:
        return ItemTable(self.ratings + other.ratings, self.offsets + other.offsets, self.counts + other.counts)

    def minus(self, other: ItemTable) -> ItemTable:
        """This table without `other`'s sums; a bucket this table does not hold (a noisy table dropped it) stays
        empty."""
        held = self.counts > 0
        return ItemTable(np.where(held, self.ratings - other.ratings, 0.0),
                         np.where(held, self.offsets - other.offsets, 0.0),
                         np.maximum(np.where(held, self.counts - other.counts, 0.0), 0.0), self.noise_std)

    def read(self, texts: list[str]) -> list[ItemReading]:
        """Each item's reading, shrunk toward the population (its mean rating, offset 0) by SHRINK pseudo-ratings
        (and NOISE_SHRINK per unit of noise std), within the rating scale: an item nobody rated reads as the
        population's mean, with 0 raters."""
        total = float(self.counts.sum())
        population = float(self.ratings.sum()) / total if total else 0.0
        shrink = SHRINK + NOISE_SHRINK * self.noise_std
        readings = []
        for b in map(bucket, texts):
            count = float(self.counts[b])
            mean = (float(self.ratings[b]) + shrink * population) / (count + shrink)
            offset = float(self.offsets[b]) / (count + shrink)
            readings.append(ItemReading(mean=min(max(mean, LOWEST), HIGHEST),
                                        offset=min(max(offset, LOWEST - HIGHEST), HIGHEST - LOWEST),
                                        raters=int(round(count))))
        return readings

    def vector(self) -> list[np.ndarray]:
        """The layout SecAgg+ sums: [ratings, offsets, counts]."""
        return [self.ratings.astype(np.float64), self.offsets.astype(np.float64), self.counts.astype(np.float64)]

    def clipped(self, clip: float) -> ItemTable:
        """This (one user's) table scaled so that its private vector (ratings centred) has L2 norm at most `clip`:
        a user who rated many items weighs less in every item's mean, and one user's part of the sum is bounded."""
        norm = math.sqrt(sum(float(np.square(a).sum()) for a in self._centred()))
        scale = min(1.0, clip / norm) if norm else 1.0
        return ItemTable(self.ratings * scale, self.offsets * scale, self.counts * scale)

    def private_vector(self, clip: float, noise_share_std: float) -> list[np.ndarray]:
        """What a node sends under --item-dp-epsilon: its table `clipped`, ratings centred, plus its share of the
        Gaussian noise (Flower's draw, never repeatable), so that the nodes' sum carries the noise whole."""
        vector = self.clipped(clip)._centred()
        add_gaussian_noise_inplace(vector, noise_share_std)
        return vector

    def _centred(self) -> list[np.ndarray]:
        return [self.ratings - CENTRE * self.counts, self.offsets.astype(np.float64), self.counts.astype(np.float64)]

    @classmethod
    def from_vector(cls, vector: list[np.ndarray], scale: float = 1.0, noise_std: float = 0.0) -> ItemTable:
        """A table from a (summed) vector; `scale` turns SecAgg+'s average of n tables into their sum (n). Exact
        sums (`noise_std` 0): counts are whole numbers again after quantization noise. Private vectors' sum with
        noise of `noise_std`: ratings un-centred, and only the buckets whose count clears KEEP_ABOVE stds kept."""
        ratings, offsets, counts = (np.asarray(a, dtype=np.float64) * scale for a in vector)
        if not noise_std:
            return cls(ratings, offsets, np.round(counts))
        kept = counts > KEEP_ABOVE * noise_std
        return cls(np.where(kept, ratings + CENTRE * counts, 0.0), np.where(kept, offsets, 0.0),
                   np.where(kept, counts, 0.0), noise_std)

    def items(self) -> int:
        """How many buckets hold a rating."""
        return int((self.counts > 0).sum())

    def to_config(self) -> dict[str, list]:
        """The rated buckets, as a message's config carries the table (and the run directory keeps it)."""
        rated = np.flatnonzero(self.counts > 0)
        noise = {p.ITEM_NOISE: self.noise_std} if self.noise_std else {}
        return {p.ITEM_BUCKETS: rated.tolist(), p.ITEM_RATINGS: self.ratings[rated].tolist(),
                p.ITEM_OFFSETS: self.offsets[rated].tolist(), p.ITEM_COUNTS: self.counts[rated].tolist(), **noise}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ItemTable | None:
        """The table a config carries (`to_config`), None when it carries none."""
        if p.ITEM_BUCKETS not in config:
            return None
        table = cls.empty()
        table.noise_std = float(config.get(p.ITEM_NOISE, 0.0))
        rated = np.asarray(config[p.ITEM_BUCKETS], dtype=np.int64)
        for values, key in ((table.ratings, p.ITEM_RATINGS), (table.offsets, p.ITEM_OFFSETS),
                            (table.counts, p.ITEM_COUNTS)):
            values[rated] = np.asarray(config[key], dtype=np.float64)
        return table
