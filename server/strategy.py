"""Task adaptation: Flower's FedAvg (FedAvgM with a server learning rate or momentum) over training-user nodes only,
seeded sampling; the defenses around it are server/defenses.py's."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common import protocol as p
from common.config import RunConfig
from server.view import ServerView

log = logging.getLogger(__name__)


class TaskAdapterFedAvg(FedAvg):
    """FedAvg of the shared task LoRA that samples only training users' nodes (test users stay unseen).

    Aggregation is FedAvg's own (so Flower's DP wrappers can account for it); the metrics hook also keeps
    each round's losses for the report, and `view` (--record-server-view) what the server held of each round.
    """

    def __init__(self, train_nodes: list[int], sample_size: int, seed: int, view: ServerView | None = None,
                 **server_step: float):
        super().__init__(  # (Flower's own sampling is unused: `sample` draws each round's nodes)
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
            weighted_by_key=p.NUM_EXAMPLES, arrayrecord_key=p.ARRAYS, configrecord_key=p.CONFIG,
            train_metrics_aggr_fn=self._keep_round, **server_step,
        )
        self.train_nodes = list(train_nodes)  # in the server's node order (exchange's): what each round samples from
        self.sample_size = sample_size  # training nodes each round samples
        self.seed = seed
        self.view = view
        self.sampled: dict[int, int] = {}
        self.received: dict[int, int] = {}  # round -> updates in its average
        self.train_loss: dict[int, float] = {}
        self.answer_frequencies: list[float] = []  # training users' answer-label shares (the best constant's input)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Messages (the adapt phase's `train.adapt`, not FedAvg's plain `train`) to a seeded sample of the training
        nodes."""
        nodes = self.sample(server_round)
        if self.view:
            self.view.sent(server_round, arrays)
        config[p.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, p.ADAPT)

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """FedAvg's reply check (the one hook its aggregate_train has, which Flower's DP wrapper requires unchanged),
        after noting which node sent which update (under server-side DP: as the wrapper clipped it)."""
        valid, errors = super()._check_and_log_replies(replies, is_train=is_train, validate=validate)
        if is_train and self.view:
            for reply in valid:
                self.view.attributed(max(self.sampled), reply.metadata.src_node_id, reply.content[self.arrayrecord_key],
                                     int(reply.content[p.METRICS][p.NUM_EXAMPLES]))
        return valid, errors

    def sample(self, server_round: int) -> list[int]:
        """The seeded sample of training nodes of a round (the same with or without secure aggregation)."""
        nodes = random.Random(f"{self.seed}-{server_round}").sample(self.train_nodes, self.sample_size)
        self.sampled[server_round] = len(nodes)
        return nodes

    def keep_secure_round(self, server_round: int, received: int, loss: float | None, shares: list[float]) -> None:
        """What a secure-aggregation round left the server: how many updates its sum holds, their average loss
        (None under DP: it stays on the devices) and answer shares."""
        self.received[server_round] = received
        if loss is not None:
            self.train_loss[server_round] = loss
        if shares:
            self.answer_frequencies = shares

    def _keep_round(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        server_round = max(self.sampled)  # FedAvg aggregates the round it configured last
        self.received[server_round] = len(contents)
        metrics = aggregate_metricrecords(contents, weighted_by_key)
        if p.TRAIN_LOSS in metrics:  # (client-side DP keeps the loss on the device)
            self.train_loss[server_round] = float(metrics[p.TRAIN_LOSS])
        loss = f", training loss {self.train_loss[server_round]:.4f}" if server_round in self.train_loss else ""
        log.info("task adaptation round %d: %d of %d updates averaged%s", server_round, len(contents),
                 self.sampled[server_round], loss)
        if p.ANSWER_FREQUENCIES in metrics:
            self.answer_frequencies = list(metrics[p.ANSWER_FREQUENCIES])  # type: ignore[arg-type]
        return metrics

    def rounds_record(self) -> dict[str, Any]:
        """Per round, keyed by the round as a string (JSON): training loss, updates asked for, and updates that did
        not reach the average (an error reply, no reply in time, or a round the DP wrapper skipped for an error);
        plus the answer shares. Saved with the task adapter, so a resumed run reports the same."""
        return {
            "train_loss": {str(r): loss for r, loss in self.train_loss.items()},
            "sampled_updates": {str(r): n for r, n in self.sampled.items()},
            "failed_updates": {str(r): n - self.received.get(r, 0) for r, n in self.sampled.items()},
            "answer_frequencies": self.answer_frequencies,
        }


class TaskAdapterFedAvgM(TaskAdapterFedAvg, FedAvgM):
    """The same, with Flower's FedAvgM step on the round's average (`--server-lr`, `--server-momentum`). A class of
    its own: Flower's server-side DP wrapper accepts only FedAvg's own aggregation, and RunConfig refuses the
    server step with DP and with secure aggregation."""

    def __init__(self, train_nodes: list[int], sample_size: int, seed: int, view: ServerView | None,
                 server_lr: float, server_momentum: float):
        super().__init__(train_nodes, sample_size, seed, view, server_learning_rate=server_lr,
                         server_momentum=server_momentum)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As TaskAdapterFedAvg's; FedAvgM's step starts from the first round's arrays (what its own
        configure_train, which ours replaces, records)."""
        if self.current_arrays is None:
            self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)


def task_fedavg(cfg: RunConfig, train_nodes: list[int], view: ServerView | None = None) -> TaskAdapterFedAvg:
    """The run's FedAvg (FedAvgM with a server step) over the training nodes; server/defenses.py puts the
    configured defense around it."""
    sample_size = cfg.nodes_per_round(len(train_nodes))
    if cfg.takes_server_step():
        return TaskAdapterFedAvgM(train_nodes, sample_size, cfg.seed, view, cfg.server_lr, cfg.server_momentum)
    return TaskAdapterFedAvg(train_nodes, sample_size, cfg.seed, view)
