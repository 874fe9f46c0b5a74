"""Task adaptation under Flower's SecAgg+: the server learns only the average of a round's updates.

flwr 1.42 ships SecAgg+ as `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client) for the legacy workflow
API only: the workflow reads a `LegacyContext` (a legacy Strategy's configure_fit/aggregate_fit and a client
manager) and runs its four stages over a Grid. The Message-API `strategy.start` has no hook for a multi-message
round, so each round here runs Flower's workflow on our (audited) grid, with a LegacyContext that holds what our
FedAvg decided: its seeded sample of training nodes (as legacy client proxies) and the round's config. The workflow
hands the unmasked average to `aggregate_fit`, which keeps it. No cryptography is ours but the masks' expansion from
their seeds, which replaces Flower's 32-bit one on both sides (common/secure_update.py); one stage differs: masked
vectors are summed as they arrive, so the server's memory does not grow with the round's nodes.

A client that fails or drops out after the key sharing is unmasked from its neighbours' key shares (the workflow's
dropout recovery); a round that keeps fewer clients than the reconstruction threshold fails and is reported as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitRes, Parameters, Scalar, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation import secaggplus_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp.strategy import Result

from common import protocol as p
from common.config import RunConfig
from common.secure_update import (
    CLIPPING_RANGE,
    MODULUS_RANGE,
    SHARES,
    THRESHOLD,
    masks_from_whole_seed,
    quantization_range,
    unpack_update,
)
from server.audited_grid import AuditedGrid
from server.strategy import TaskAdapterFedAvg

log = logging.getLogger("oppu")
# the masks the workflow removes, from their whole seed as the clients draw them (common/secure_update.py)
secaggplus_workflow.pseudo_rand_gen = masks_from_whole_seed


class _KeepAverage(LegacyFedAvg):
    """The legacy strategy the workflow drives: configure_fit asks every node the client manager holds (our
    sample); aggregate_fit keeps the unmasked average the workflow computed (it gives every result that average)."""

    def __init__(self, config: dict[str, Any], nodes: int):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=nodes, min_available_clients=nodes,
                         on_fit_config_fn=lambda _: config)
        self.average: list[np.ndarray] | None = None
        self.nodes: list[int] = []  # whose updates the average holds

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.nodes = [proxy.node_id for proxy, _ in results]  # type: ignore[attr-defined]
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}  # the workflow then leaves its state alone; we read the average from here


class SummingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow whose 'collect masked vectors' stage adds each node's masked vector to the sum as
    its reply arrives and lets the vector go. Flower's stage holds every node's vector until the last reply (1.6 MB
    a node in the item-table round: 9.5 GiB of server memory at 5,656 nodes); this one holds one sum. The messages,
    the surviving nodes, the failures and the legacy results are Flower's."""

    def collect_masked_vectors_stage(  # type: ignore[override]
        self, grid: AuditedGrid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        group = str(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        messages = []
        for node in state.active_node_ids:  # each node's FitIns with the key shares forwarded to it
            content = state.nid_to_fitins[node]
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: state.forward_ciphertexts[node],
                Key.SOURCE_LIST: state.forward_srcs[node],
            })
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=group))
        total: list[np.ndarray] | None = None

        def add(reply: Message) -> None:
            nonlocal total
            if reply.has_error():
                return
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            vector = [bytes_to_ndarray(b) for b in configs.pop(Key.MASKED_PARAMETERS)]  # type: ignore[union-attr]
            total = parameters_mod(vector if total is None else parameters_addition(total, vector), state.mod_range)

        with grid.observing_replies(add):
            replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        del state.forward_ciphertexts, state.forward_srcs, state.nid_to_fitins
        state.active_node_ids = {reply.metadata.src_node_id for reply in replies if not reply.has_error()}
        if total is not None:
            state.aggregate_ndarrays = total
        for reply in replies:
            if reply.has_error():
                state.failures.append(Exception(reply.error))
                continue
            proxy = state.nid_to_proxies[reply.metadata.src_node_id]
            state.legacy_results.append((proxy, compat.recorddict_to_fitres(reply.content, True)))
        return self._check_threshold(state)


def secure_round(
    grid: AuditedGrid, server_round: int, arrays: ArrayRecord, nodes: list[int], config: dict[str, Any], timeout: float,
    shares: int | float = SHARES,
) -> tuple[list[np.ndarray] | None, list[int]]:
    """One SecAgg+ round of `nodes` from the global `arrays`: (the average of their packed vectors, or None if the
    round failed; the nodes it averages). `shares`: with how many of the round's clients each client shares its
    secrets (Flower's num_shares: a count, or a share of the round)."""
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, grid, grid.run.run_id))
    strategy = _KeepAverage(config, len(nodes))
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=server_round), strategy=strategy, client_manager=manager,
    )
    context.state[MAIN_PARAMS_RECORD] = arrays
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    # quantization levels by the round's size, so that its sum never wraps (common/secure_update.py)
    workflow = SummingSecAggPlusWorkflow(
        shares, THRESHOLD, max_weight=1.0, clipping_range=CLIPPING_RANGE,
        quantization_range=quantization_range(len(nodes)), modulus_range=MODULUS_RANGE, timeout=timeout,
    )
    workflow(grid, context)
    return strategy.average, strategy.nodes


@dataclass
class SecureAdaptation:
    """Rounds of secure task adaptation; `releases` are (noise multiplier, clients) of each DP release."""

    fedavg: TaskAdapterFedAvg
    cfg: RunConfig
    releases: list[tuple[float, int]] = field(default_factory=list)

    def start(self, grid: AuditedGrid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float,
              train_config: ConfigRecord) -> Result:
        """Like Flower's `strategy.start`: every round samples with our FedAvg and adds the securely averaged update
        to the global task LoRA (a failed round leaves it as it was)."""
        names = list(initial_arrays.keys())
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            nodes = self.fedavg.sample(server_round)
            config = {**train_config, p.SERVER_ROUND: server_round, p.TASK_ADAPTER_NAMES: names,
                      p.ROUND_CLIENTS: len(nodes)}
            if self.fedavg.view:
                self.fedavg.view.sent(server_round, arrays)
            average, averaged = secure_round(grid, server_round, arrays, nodes, config, timeout)
            received = len(averaged)
            if average is None:
                log.warning("secure aggregation round %d failed: no average of its %d clients", server_round,
                            len(nodes))
                self.fedavg.keep_secure_round(server_round, 0, None, [])
                continue
            update, loss, shares = unpack_update(average, len(names))
            self.fedavg.keep_secure_round(server_round, received, loss, shares)
            if self.cfg.dp_noise > 0:  # survivors' noise shares: std noise * clip * sqrt(received / sampled)
                self.releases.append((self.cfg.dp_noise * float(np.sqrt(received / len(nodes))), received))
            arrays = ArrayRecord({
                name: Array((arrays[name].numpy() + delta).astype(arrays[name].numpy().dtype))
                for name, delta in zip(names, update, strict=True)
            })
            if self.fedavg.view:  # all the server can tell of each node: the new global LoRA (weight: one share)
                for node in averaged:
                    self.fedavg.view.attributed(server_round, node, arrays, 1)
            log.info("secure aggregation round %d: average of %d of %d updates", server_round, received, len(nodes))
        return Result(arrays=arrays)

