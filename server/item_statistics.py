"""`--item-statistics`: the population's item table, summed under Flower's SecAgg+ over the training users' nodes
before task adaptation, then sent to every node with each message (client/item_statistics.py reads it into
prompts). Test users' nodes send no table: they send metric statistics only.

The server learns the sum of the training users' tables and nothing of one node's (the SecAgg+ round of
server/secure_aggregation.py, with its dropout recovery); the table is kept in the run directory, so a resumed
run annotates its prompts exactly as the interrupted one did.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from tqdm import tqdm

from common import protocol as p
from common.config import RunConfig
from common.item_table import ItemTable
from common.privacy import release_epsilon
from common.store import atomic_write_json, read_saved_state
from server.audited_grid import AuditedGrid
from server.secure_aggregation import secure_round

log = logging.getLogger("oppu")
# what the item-table round sends where a secure-adapt round sends the task LoRA: Flower's legacy FitIns needs a
# typed array (an empty record turns into an untyped one), and the nodes read nothing from it
NO_ARRAYS = ArrayRecord({p.ITEM_TABLE: Array(np.zeros(0, dtype=np.float32))})
# SecAgg+'s neighbours per node in the item-table round of many nodes: Flower's Shamir sharing costs grow with the
# square of the shares (120 nodes: 263 s sharing with all, 11 s with 15; docs/privacy.md), so
# each node shares with 15 (an odd count, as Flower makes them); the server must collude with 8 of a node's 15
NEIGHBOURS = 15
SECAGG_STAGES = 4  # setup, share keys, collect masked vectors, unmask: each asks every (remaining) node once


def item_table_path(run_dir: Path) -> Path:
    return run_dir / "server" / "item_table.json"


def table_key(cfg: RunConfig) -> str:
    """What a saved table must have been summed under to be reused: the whole run config (data, task, split)."""
    return hashlib.sha256(repr(sorted(cfg.to_record().items())).encode()).hexdigest()


def sum_item_tables(grid: AuditedGrid, cfg: RunConfig, config: ConfigRecord, nodes: list[int], run_dir: Path,
                    timeout: float) -> tuple[ItemTable, dict[str, int]]:
    """(the sum of `nodes`' item tables, its record: nodes summed and items rated), from the run directory when an
    interrupted run with the same config already summed them; a bar counts the nodes' replies (with the default's
    941 nodes the round takes about 2 minutes on 2 cores)."""
    path = item_table_path(run_dir)
    key = table_key(cfg)
    saved = read_saved_state(path)
    if saved and saved["key"] == key:
        log.info("reusing the item table in %s", path)
        return ItemTable.from_config(saved), saved["record"]
    bar = tqdm(total=SECAGG_STAGES * len(nodes), desc=f"item statistics (SecAgg+ over {len(nodes)} nodes)",
               unit="reply")
    with bar, grid.observing_replies(lambda _: bar.update(1)):
        average, summed = secure_round(
            grid, 0, NO_ARRAYS, nodes, {**config, p.SECURE_PAYLOAD: p.ITEM_TABLE, p.ROUND_CLIENTS: len(nodes)},
            timeout, NEIGHBOURS if len(nodes) > NEIGHBOURS else 1.0,
        )
    if average is None:
        raise RuntimeError(f"the secure sum of the item tables failed ({len(nodes)} nodes asked)")
    noise_std = cfg.item_noise_std() * math.sqrt(len(summed) / len(nodes))  # the survivors' noise shares
    table = ItemTable.from_vector(average, scale=len(summed), noise_std=noise_std)
    record: dict[str, Any] = {"nodes": len(summed), "items": table.items(), "ratings": int(table.counts.sum())}
    if noise_std:
        record["dp"] = privacy_record(cfg, noise_std)
    atomic_write_json(path, {"key": key, "record": record, **table.to_config()})
    log.info("item statistics: SecAgg+ sum of %d of %d nodes' tables, %d items, %d ratings%s", len(summed),
             len(nodes), record["items"], record["ratings"],
             f" (user-level DP: epsilon {record['dp']['epsilon']:.2f} at delta {cfg.dp_delta:g}, noise std "
             f"{noise_std:.2f} per sum; the ratings are weighted counts)" if noise_std else "")
    return table, record


def privacy_record(cfg: RunConfig, noise_std: float) -> dict[str, Any]:
    """What --item-dp-epsilon spent: the release's epsilon at --dp-delta from the noise the survivors added (less
    noise than asked when nodes dropped out: a larger epsilon), the clip and the noise."""
    multiplier = noise_std / cfg.item_dp_clip
    return {"epsilon": release_epsilon(multiplier, cfg.dp_delta), "delta": cfg.dp_delta,
            "noise_multiplier": multiplier, "clip": cfg.item_dp_clip, "noise_std": noise_std, "releases": 1,
            "accounting": "Flower's RDP accountant, one Gaussian release, add or remove one user"}

