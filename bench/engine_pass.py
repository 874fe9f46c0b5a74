"""What one pass of the simulation engine's message loop costs: Flower's (a link-state query per node, each looking
through every message out) against ours (simulation/waiting.py: `take_messages`, one walk for all nodes), on
Flower's own in-memory link state with N registered nodes and M messages out, already handed to their nodes: what
every pass sees while the nodes work. No model, no Ray.

    python -m bench.engine_pass                       # 943 nodes with 100 and 941 out; 5,658 with 5,656 out
    python -m bench.engine_pass --sizes 943:100 --out pass.json

Flower's loop (flwr 1.42 `vce_api.add_messages_to_queue`) passes with 0.1 s between passes, so it keeps
pass / (pass + 0.1) of a core busy: what a `flwr run` paid before its apps put our loop in place
(simulation/flwr_app.py), and what flower-simulation paid before session 24. Flower's pass is timed over at most
`--sample` nodes and scaled to all (each node's query costs the same: it looks through every message).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from bench.common import finish
from simulation.waiting import take_messages

FLOWER_INTERVAL = 0.1  # seconds Flower's loop waits between passes
# who builds the messages: the server (SuperLink node) of run 7, task 3 (Flower sets it in a ServerApp's process)
SERVER_IDENTITY = {"_task_id": 3, "_run_id": 7, "_node_id": SUPERLINK_NODE_ID}


def flower_link_state(nodes: int) -> tuple[Any, list[int], InMemoryGrid]:
    """Flower's in-memory link state with a run and `nodes` registered nodes, and the grid a server pushes through,
    set up as flwr's run_simulation and its engine set them up (the caller sets TaskIdentity to SERVER_IDENTITY)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=SERVER_IDENTITY["_run_id"])
    run.primary_task_id, run.federation_id = SERVER_IDENTITY["_task_id"], NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    node_ids = list(_register_nodes(nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, node_ids, grid


def pass_seconds(nodes: int, out: int, sample: int) -> dict[str, float]:
    """Seconds of one pass that finds nothing, Flower's and ours, with `out` of `nodes` nodes' messages delivered."""
    state, node_ids, grid = flower_link_state(nodes)
    grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="train") for n in node_ids[:out]])
    assert len(take_messages(state, node_ids)) == out  # handed to their nodes, as while the nodes work
    start = time.perf_counter()
    assert take_messages(state, node_ids) == []
    ours = time.perf_counter() - start
    asked = node_ids[:sample]
    start = time.perf_counter()
    for node in asked:
        assert state.get_message_ins(node_id=node, limit=1) == []
    flower = (time.perf_counter() - start) * nodes / len(asked)
    return {"nodes": nodes, "out": out, "flower_pass_seconds": flower, "our_pass_seconds": ours,
            "flower_busy_share": flower / (flower + FLOWER_INTERVAL)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_pass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="943:100,943:941,5658:5656",
                        help="comma-separated NODES:OUT (registered nodes : messages out)")
    parser.add_argument("--sample", type=int, default=300, help="most nodes Flower's pass is timed over")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    sizes = [tuple(int(part) for part in size.split(":")) for size in args.sizes.split(",")]
    for name, value in SERVER_IDENTITY.items():
        setattr(TaskIdentity, name, value)
    rows = [pass_seconds(nodes, out, args.sample) for nodes, out in sizes]
    lines = ["| nodes | messages out | Flower's pass | ours | ratio | Flower's loop: busy share of a core |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['nodes']:,} | {r['out']:,} | {r['flower_pass_seconds']:.3f} s | "
              f"{r['our_pass_seconds'] * 1e3:.1f} ms | {r['flower_pass_seconds'] / r['our_pass_seconds']:,.0f}x | "
              f"{r['flower_busy_share']:.0%} |" for r in rows]
    return finish(args, {"command": argv, "rows": rows}, lines)


if __name__ == "__main__":
    main()
