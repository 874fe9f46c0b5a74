"""Secure aggregation of task adaptation (Flower's SecAgg+) on real runs with the tiny model: the server's task
adapter is the average of the updates the nodes kept in clear, a node that drops out mid-protocol costs only its own
update, no clear update reaches the server, and the audit catches a node that sends one; and, in one round inside
this process, that the server sums the masked vectors as they arrive and keeps none."""

from __future__ import annotations

import copy
import importlib
import json
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import cloudpickle
import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
import secure_clients
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

import client.app  # noqa: F401  (each side puts the masks' expansion from the whole seed in place as it loads)

from common.audit_log import tensor_sha256
from common.config import RunConfig
from common.secure_update import (
    CLIPPING_RANGE,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    masks_from_whole_seed,
    on_quantization_grid,
    pack_update,
    quantization_range,
    quantum,
    unpack_update,
)
from server.audited_grid import AuditedGrid
from server.secure_aggregation import secure_round
from server.view import read_server_view
from simulation.engine import ClientAppFactory, SimulationOptions, simulate
from simulation.errors import SetupError
from simulation.flags import build_parser, check_run_flags, run_config_of, user_counts
from simulation.privacy_audit import main as audit_main

cloudpickle.register_pickle_by_value(secure_clients)  # Ray workers cannot import from tests/

TINY_ARGS = ["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--methods", "base",
             "--batch-tokens", "256", "--personal-epochs", "1", "--max-history", "8", "--task-history", "4",
             "--secure-aggregation", "--canaries"]


def _simulate(argv: list[str], client_app: ClientAppFactory) -> tuple[Path, dict | None]:
    parser = build_parser()
    args = parser.parse_args([*argv, *TINY_ARGS])
    cfg = run_config_of(args, parser)
    return simulate(cfg, user_counts(args), SimulationOptions.from_args(args), client_app)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One test user, three training users (partitions 1-3); partition 2 drops out after the key sharing."""
    run_dir = tmp_path_factory.mktemp("runs") / "dropout"
    argv = ["--num-clients", "1", "--train-clients", "3", "--rounds", "1", "--run-dir", str(run_dir),
            "--record-server-view"]
    return _simulate(argv, secure_clients.dropout_app(2))


def test_a_round_survives_a_dropout_and_averages_the_others(dropout_run: tuple[Path, dict]) -> None:
    run_dir, report = dropout_run
    adaptation = report["task_adaptation"]
    assert adaptation["secure_aggregation"] is True
    assert adaptation["sampled_updates"] == {"1": 3} and adaptation["failed_updates"] == {"1": 1}
    vectors = secure_clients.clear_vectors(run_dir, 1)
    assert len(vectors) == 2  # the dropped node never trained to the end
    view = read_server_view(run_dir)[1]
    initial = view.sent
    names = list(initial)
    update, loss, shares = unpack_update([np.mean(arrays, axis=0) for arrays in zip(*vectors.values())], len(names))
    assert max(float(np.abs(d).max()) for d in update) > 1e-3  # an update the tolerance below can tell apart
    saved = load_file(str(run_dir / "server" / "task_adapter" / "adapter_model.safetensors"))
    for name, delta in zip(names, update):
        # SecAgg+ quantization: one step is 2 * 16 / 2**22 = 7.6e-6 per client
        np.testing.assert_allclose(saved[name] - initial[name], delta, rtol=0, atol=1e-5)
    assert adaptation["train_loss"]["1"] == pytest.approx(loss, abs=1e-5)
    saved_record = json.loads((run_dir / "server" / "task_adapter.json").read_text())
    assert saved_record["answer_frequencies"] == pytest.approx(shares, abs=1e-5)
    # all the server can attribute to each of the two nodes that finished: the new global LoRA
    assert len(view.updates) == 2
    for _, held in view.updates.values():
        assert all(np.array_equal(held[name], saved[name]) for name in names)
    assert "1 FedAvg round(s) under secure aggregation (SecAgg+); **1 of 3" in (run_dir / "report.md").read_text()


def test_no_clear_update_reaches_the_server_and_the_audit_passes(dropout_run: tuple[Path, dict]) -> None:
    run_dir, _ = dropout_run
    assert audit_main([str(run_dir)]) == 0
    summary = json.loads((run_dir / "audit" / "summary.json").read_text())
    assert summary["checks"]["updates-masked"]["passed"] and "adapt" not in summary["phases"]
    assert summary["phases"]["secure-adapt"]["messages_up"] == 3 + 3 + 3 + 2  # the dropout's error reply counts
    server_log = (run_dir / "audit" / "server.jsonl").read_text()
    for vector in secure_clients.clear_vectors(run_dir, 1).values():
        for array in vector:
            for form in (array, array.astype(np.float32)):
                assert tensor_sha256(form) not in server_log
    replies = [json.loads(line) for line in server_log.splitlines()]
    replies = [e for e in replies if e["direction"] == "in" and e["message_type"] == "train" and not e["error"]]
    assert replies and all(not r["tensors"] for e in replies for r in e["records"].values() if r["type"] == "arrays")


def test_a_node_that_sends_its_update_beside_the_masked_one_fails_the_audit(tmp_path: Path) -> None:
    argv = ["--num-clients", "1", "--train-clients", "2", "--rounds", "1", "--run-dir", str(tmp_path / "leaky")]
    run_dir, _ = _simulate(argv, secure_clients.leaky_app(1))
    assert audit_main([str(run_dir)]) == 1
    leaks = json.loads((run_dir / "audit" / "summary.json").read_text())["checks"]["personal-tensors-and-keys"]
    assert any("server in train message" in v and "config keys not allowed in a reply: ['update']" in v
               for v in leaks["violations"]), leaks


def test_packed_vector_round_trip_and_clipping_range() -> None:
    update = [np.full((2, 3), 0.01), np.arange(4.0) / 100]
    vector = pack_update(update, 2.5, [0.25, 0.75])
    back, loss, shares = unpack_update(vector, 2)
    assert [a.tolist() for a in back] == [a.tolist() for a in update] and (loss, shares) == (2.5, [0.25, 0.75])
    assert unpack_update(pack_update(update, None, []), 2)[1:] == (None, [])  # DP: the update goes alone
    with pytest.raises(ValueError, match=f"exceeds SecAgg\\+'s clipping range {CLIPPING_RANGE}"):
        pack_update(update, CLIPPING_RANGE + 1, [])


@pytest.mark.parametrize("clients", [4, 5656])
def test_a_vector_on_the_quantization_grid_quantizes_the_same_whatever_numpy_draws(clients: int) -> None:
    levels, step = quantization_range(clients), quantum(clients)
    vector = [np.linspace(-0.01, 0.01, 1001), np.array([2.5, 0.123456789, -15.9999999])]
    rounded = on_quantization_grid(vector, clients)
    assert all(np.abs(r - v).max() < step for r, v in zip(rounded, vector))
    assert all(np.array_equal(r, q) for r, q in zip(rounded, on_quantization_grid(vector, clients)))  # the same bytes
    quantized = []
    for seed in (0, 1):  # Flower's stochastic rounding draws from numpy's global state
        np.random.seed(seed)
        quantized.append(quantize(rounded, CLIPPING_RANGE, levels))
        np.random.seed(seed)
        assert not all(np.array_equal(a, b) for a, b in zip(quantize(vector, CLIPPING_RANGE, levels),
                                                             quantized[0])) or seed == 0
    assert all(np.array_equal(a, b) for a, b in zip(*quantized))
    assert all(np.array_equal((q - levels // 2) * step, r) for q, r in zip(quantized[0], rounded))
    # unbiased: a value 0.3 of a step above a multiple rounds up about 30 % of the time
    share = np.mean(on_quantization_grid([np.full(100_000, 5 * step + 0.3 * step)], clients)[0] > 5.5 * step)
    assert abs(share - 0.3) < 0.01


def test_masks_come_from_the_whole_seed_on_both_sides() -> None:
    """Flower's generator folds a seed to 32 bits, so two keys that fold alike give the same mask; ours reads the
    whole seed, and it is what both the client mod and the server workflow draw from."""
    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert importlib.import_module(module).pseudo_rand_gen is masks_from_whole_seed
    shapes = [(), (3, 4), (100_000,)]
    one, other = bytes(32), (b"\x01\0\0\0" * 2) + bytes(24)  # both fold to the 32-bit seed 0
    assert all(np.array_equal(a, b) for a, b in zip(pseudo_rand_gen(one, MODULUS_RANGE, shapes),
                                                    pseudo_rand_gen(other, MODULUS_RANGE, shapes)))
    ours = masks_from_whole_seed(one, MODULUS_RANGE, shapes)
    assert [m.shape for m in ours] == shapes and all(m.dtype == np.int64 for m in ours)
    assert all(np.array_equal(a, b) for a, b in zip(ours, masks_from_whole_seed(one, MODULUS_RANGE, shapes)))
    assert not np.array_equal(ours[2], masks_from_whole_seed(other, MODULUS_RANGE, shapes)[2])
    values = ours[2]
    assert 0 <= values.min() and values.max() < MODULUS_RANGE
    assert abs(values.mean() / MODULUS_RANGE - 0.5) < 0.01  # uniform over the range
    with pytest.raises(ValueError, match="a power of two up to 2\\*\\*32, got 1000"):
        masks_from_whole_seed(one, 1000, shapes)


def _workflow_average(vectors: list[list[np.ndarray]], levels: int) -> list[np.ndarray]:
    """What Flower's SecAgg+ turns the clients' vectors into, masks aside (they cancel modulo MODULUS_RANGE): each
    client quantizes its vector and prepends its weight (secaggplus_mod), the server sums modulo MODULUS_RANGE and
    dequantizes (SecAggPlusWorkflow's collect and unmask stages)."""
    total = None
    for vector in vectors:
        quantized = [q.astype(np.int64) for q in quantize(vector, CLIPPING_RANGE, levels)]  # as the int64 masks make it
        sent = factor_combine(levels, quantized)  # weight 1: `levels` for the ratio
        total = sent if total is None else parameters_addition(total, sent)
    weight, summed = factor_extract(parameters_mod(total, MODULUS_RANGE))
    average = dequantize(summed, CLIPPING_RANGE, levels)
    return [(a - (len(vectors) - 1) * CLIPPING_RANGE) * levels / weight for a in average]


def test_a_round_of_many_clients_quantizes_coarser_so_that_its_sum_never_wraps() -> None:
    assert [quantization_range(n) for n in (1, 4, 1023, 1024, 2047, 2048, 5656)] == [
        2**22, 2**22, 2**22, 2**21, 2**21, 2**20, 2**19]
    assert all(n * quantization_range(n) < MODULUS_RANGE for n in (1023, 1024, 5656, 100_000))
    clients = 1500  # item tables of a population of 1,500 training users: mostly empty buckets
    tables = [[np.array([1.0 + i % 5, 0.0, 0.0, -0.5 + (i % 3) / 4, 16.0])] for i in range(clients)]
    exact = np.mean([t[0] for t in tables], axis=0)
    wrapped = _workflow_average(tables, QUANTIZATION_RANGE)[0]  # Flower's default levels for every round
    assert np.isfinite(wrapped).all() and np.abs(wrapped - exact).max() > 1  # the sum wrapped: nothing says so
    levels = quantization_range(clients)
    rounded = [on_quantization_grid(t, clients) for t in tables]
    assert np.allclose(_workflow_average(rounded, levels)[0], np.mean([r[0] for r in rounded], axis=0), atol=1e-9)
    assert np.allclose(_workflow_average(rounded, levels)[0], exact, atol=quantum(clients))


def test_secure_aggregation_flags_are_checked(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--train-clients", "1", "--secure-aggregation", "--run-dir", str(tmp_path)])
    cfg = RunConfig(secure_aggregation=True)
    with pytest.raises(SetupError, match="SecAgg\\+ needs 2 or more training users per round, got 1"):
        check_run_flags(args, cfg)
    with pytest.raises(ValueError, match="local-dp-epsilon cannot be combined with dp-noise or secure-aggregation"):
        RunConfig(secure_aggregation=True, local_dp_epsilon=1.0)
    assert build_parser().parse_args([]).secure_aggregation is False


class _InProcessGrid(Grid):
    """The transport of a SecAgg+ round inside this process: a copy of each pushed message goes at once to a real
    ClientApp (Flower's secaggplus_mod in front of `fit`), each node with its own Context; replies wait to be
    pulled."""

    def __init__(self, nodes: list[int], fit: Callable[[int], list[np.ndarray]]):
        app = ClientApp(mods=[secaggplus_mod])

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(fit(context.node_id)), 1, {})
            return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

        self._app, self._run = app, Run.create_empty(run_id=1)
        self._contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                          for node in nodes}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        raise NotImplementedError("SecAgg+'s stages build their messages themselves")

    def get_node_ids(self) -> list[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids name a pushed message
            sent = copy.deepcopy(message)  # each side has its own copy, as over a wire (the mod alters what it gets)
            reply = self._app(sent, self._contexts[sent.metadata.dst_node_id])
            self._replies[message.metadata.message_id] = copy.deepcopy(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def test_the_server_sums_masked_vectors_as_they_arrive_and_keeps_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": SUPERLINK_NODE_ID}.items():
        monkeypatch.setattr(TaskIdentity, name, value)  # what Flower sets in a ServerApp's process
    nodes = list(range(2, 42))
    vectors = {node: [np.array([node % 7 - 3.0, 0.25 * (node % 4)]), np.full(3, node / len(nodes))] for node in nodes}
    grid = AuditedGrid(_InProcessGrid(nodes, lambda node: vectors[node]), tmp_path, lambda _: None)
    replies: list[Message] = []
    with grid.observing_replies(replies.append):  # every reply the workflow collects, its stages in order
        average, summed = secure_round(grid, 1, ArrayRecord({"x": Array(np.zeros(1, dtype=np.float32))}), nodes,
                                       {"answer": 1}, timeout=60, shares=15)
    assert sorted(summed) == nodes
    exact = [np.mean([vectors[node][i] for node in nodes], axis=0) for i in range(2)]
    assert average is not None and all(np.allclose(a, e, atol=quantum(len(nodes))) for a, e in zip(average, exact))
    collected = [r for r in replies if r.content.array_records]  # the collect stage's (fitres arrays, emptied)
    assert len(replies) == 4 * len(nodes) and len(collected) == len(nodes)
    # each masked vector was added to the sum as its reply came, then let go: no reply the server holds keeps one
    assert all(Key.MASKED_PARAMETERS not in r.content.config_records[RECORD_KEY_CONFIGS] for r in replies)
