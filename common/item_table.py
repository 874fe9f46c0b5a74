"""The population's item table: per hashed item, the sum of its ratings, the sum of its raters' offsets from their
own mean rating, and the raters' count. A node builds its own (client/item_statistics.py), SecAgg+ sums them
(server/item_statistics.py), the server sends the sum back; all sides agree here on the buckets and the layout of
the one vector SecAgg+ sums.

Items are named by their text, hashed into BUCKETS buckets, so the server needs no catalogue (a node's table only
ever leaves masked). With 2**16 buckets a MovieLens movie shares its bucket with one of the other 1,681 with
probability about 2.5 %. One node's values in a bucket stay within SecAgg+'s clipping range (16) unless four of its
own items share that bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import protocol as p

BUCKETS = 2**16
SHRINK = 5.0  # pseudo-ratings at the population's mean (offset 0) per item: an item few rated stays near it


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
        return ItemTable(self.ratings - other.ratings, self.offsets - other.offsets,
                         np.maximum(self.counts - other.counts, 0.0))

    def read(self, texts: list[str]) -> list[ItemReading]:
        """Each item's reading, shrunk toward the population (its mean rating, offset 0) by SHRINK pseudo-ratings:
        an item nobody rated reads as the population's mean, with 0 raters."""
        total = float(self.counts.sum())
        population = float(self.ratings.sum()) / total if total else 0.0
        readings = []
        for b in map(bucket, texts):
            count = float(self.counts[b])
            readings.append(ItemReading(mean=(float(self.ratings[b]) + SHRINK * population) / (count + SHRINK),
                                        offset=float(self.offsets[b]) / (count + SHRINK), raters=int(round(count))))
        return readings

    def vector(self) -> list[np.ndarray]:
        """The layout SecAgg+ sums: [ratings, offsets, counts]."""
        return [self.ratings.astype(np.float64), self.offsets.astype(np.float64), self.counts.astype(np.float64)]

    @classmethod
    def from_vector(cls, vector: list[np.ndarray], scale: float = 1.0) -> ItemTable:
        """A table from a (summed) vector; `scale` turns SecAgg+'s average of n tables into their sum (n); counts
        are whole numbers again after quantization noise."""
        ratings, offsets, counts = (np.asarray(a, dtype=np.float64) * scale for a in vector)
        return cls(ratings, offsets, np.round(counts))

    def items(self) -> int:
        """How many buckets hold a rating."""
        return int((self.counts > 0).sum())

    def to_config(self) -> dict[str, list]:
        """The rated buckets, as a message's config carries the table (and the run directory keeps it)."""
        rated = np.flatnonzero(self.counts > 0)
        return {p.ITEM_BUCKETS: rated.tolist(), p.ITEM_RATINGS: self.ratings[rated].tolist(),
                p.ITEM_OFFSETS: self.offsets[rated].tolist(), p.ITEM_COUNTS: self.counts[rated].tolist()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ItemTable | None:
        """The table a config carries (`to_config`), None when it carries none."""
        if p.ITEM_BUCKETS not in config:
            return None
        table = cls.empty()
        rated = np.asarray(config[p.ITEM_BUCKETS], dtype=np.int64)
        for values, key in ((table.ratings, p.ITEM_RATINGS), (table.offsets, p.ITEM_OFFSETS),
                            (table.counts, p.ITEM_COUNTS)):
            values[rated] = np.asarray(config[key], dtype=np.float64)
        return table
