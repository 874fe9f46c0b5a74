"""Calibration (`--answer-calibration`, rating tasks): the quantile of its label distribution at which the shared
model's methods (base, rag, pag: no personal adapter) answer, picked on the test users' validation items.

The shared task LoRA reads each item's population rating well (its expected rating correlates +0.95 with the
item's mean in the table), but its rating level drifts with the few users of its last rounds (3.27 to 3.59 over
rounds 28-40 of one run, the median's MAE 0.92 to 1.05 with it), and the test users, the longest histories, rate
lower than the population (validation golds 3.19 against 3.56 for training users' latest items): the median of
the shared model is the right answer for neither (docs/quality.md). Before personalization every test user's node
scores the shared model at each quantile of ANSWER_QUANTILES on its items just before its questions (its
validation items, never a question it is scored on; client/calibration.py) and replies with those 11 mean errors,
metric statistics as its personalize reply is; the server pools them (weighted by items) and sends the quantile
with the lowest pooled error, one number for every user, with the personalize messages. A personal adapter
relearns its user's level, so the methods with one keep the median. Kept in the run directory, keyed by the
message config (run config, task adapter, item table), so a resumed run answers the same.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import protocol as p
from common.metrics import ANSWER_QUANTILES, answer_quantile
from common.store import atomic_write_json, read_saved_state
from server.exchange import exchange

log = logging.getLogger("oppu")


def calibration_path(run_dir: Path) -> Path:
    return run_dir / "server" / "calibration.json"


def calibrate_answers(grid: Grid, config: ConfigRecord, task_arrays: ArrayRecord, test_nodes: list[int],
                      run_dir: Path, timeout: float) -> dict[str, Any] | None:
    """The calibration record (the chosen quantile, the users and items it pooled, the pooled error at each quantile),
    or None when no node could spare items; from the run directory when an interrupted run already calibrated
    with the same config (the run's, which names the task adapter and its test users)."""
    key = hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()
    path = calibration_path(run_dir)
    saved = read_saved_state(path)
    if saved and saved["key"] == key:
        log.info("reusing the answer quantile in %s", path)
        return saved["record"]
    content = RecordDict({p.ARRAYS: task_arrays, p.CONFIG: config})
    messages = [Message(content, dst_node_id=node, message_type=p.CALIBRATE) for node in test_nodes]
    totals, users, items = [0.0] * len(ANSWER_QUANTILES), 0, 0
    for reply in exchange(grid, messages, timeout):
        if reply.has_error():
            log.warning("calibration: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        metrics = reply.content[p.METRICS]
        scored = int(metrics[p.NUM_EXAMPLES])
        if scored:
            errors = metrics[p.QUANTILE_ERRORS]
            totals = [t + scored * float(e) for t, e in zip(totals, errors)]  # type: ignore[arg-type]
            users, items = users + 1, items + scored
    if not items:
        log.warning("calibration: no test user's node scored an item; the shared model answers at the median")
        return None
    errors = [t / items for t in totals]
    record = {"answer_quantile": answer_quantile(errors), "users": users, "items": items,
              "mae_by_quantile": {f"{q:.2f}": e for q, e in zip(ANSWER_QUANTILES, errors)}}
    atomic_write_json(path, {"key": key, "record": record})
    log.info("calibration on %d test users' %d validation items: the shared model answers at quantile %.2f (MAE "
             "%.3f; at the median %.3f)", users, items, record["answer_quantile"], min(errors),
             errors[ANSWER_QUANTILES.index(0.5)])
    return record
