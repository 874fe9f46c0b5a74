"""What the server holds of each task-adaptation round, written on purpose with `--record-server-view`, so that an
attack (bench/attack.py) and the tests read a run's files instead of the server's objects:

    server/view/round-<r>/sent.safetensors         the global task LoRA the round started from
    server/view/round-<r>/node-<id>.safetensors    per node, the task LoRA the server can attribute to it: its own
                                                   update in clear (under server-side DP, as clipped), under SecAgg+
                                                   only the round's new global LoRA; metadata: its FedAvg weight

A run without the flag keeps none of this: the server needs only the average.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from safetensors import safe_open
from safetensors.numpy import load_file, save

from common.store import atomic_write_bytes

VIEW_DIR = Path("server") / "view"
WEIGHT = "num_examples"


@dataclass(frozen=True)
class ServerView:
    """Writes the server's view of each round under `run_dir`/server/view."""

    run_dir: Path

    def sent(self, server_round: int, arrays: ArrayRecord) -> None:
        self._write(server_round, "sent", arrays, {})

    def attributed(self, server_round: int, node: int, arrays: ArrayRecord, weight: int) -> None:
        self._write(server_round, f"node-{node}", arrays, {WEIGHT: str(weight)})

    def _write(self, server_round: int, name: str, arrays: ArrayRecord, metadata: dict[str, str]) -> None:
        tensors = {key: np.ascontiguousarray(arrays[key].numpy()) for key in arrays}
        path = self.run_dir / VIEW_DIR / f"round-{server_round}" / f"{name}.safetensors"
        atomic_write_bytes(path, save(tensors, metadata=metadata))


@dataclass(frozen=True)
class RoundView:
    """One round as the server held it: what it sent, and per node id (weight, the task LoRA it attributes)."""

    sent: dict[str, np.ndarray]
    updates: dict[int, tuple[int, dict[str, np.ndarray]]]


def read_server_view(run_dir: Path) -> dict[int, RoundView]:
    """The rounds a run recorded with `--record-server-view`, by round; {} if it recorded none."""
    directories = {int(d.name.removeprefix("round-")): d for d in (run_dir / VIEW_DIR).glob("round-*")}
    rounds = {}
    for server_round in sorted(directories):  # in round order (round-10 sorts before round-2 as a name)
        updates = {}
        for path in directories[server_round].glob("node-*.safetensors"):
            with safe_open(str(path), "numpy") as handle:
                weight = int(handle.metadata()[WEIGHT])
            updates[int(path.stem.removeprefix("node-"))] = (weight, load_file(str(path)))
        rounds[server_round] = RoundView(load_file(str(directories[server_round] / "sent.safetensors")), updates)
    return rounds
