"""Node ids drawn from the run's seed, so that a simulation with the same flags can be repeated exactly.

Flower's simulation engine (flwr 1.42, `vce_api._register_nodes`) gives each simulated node a random 64-bit id from
`os.urandom`, and the server knows nodes only by id: each task-adaptation round samples training nodes with the
seed (server/strategy.py), so with new ids every run trained the shared adapter on other users, and three runs of
the default flags on the same test users gave `base` 0.766-0.828 MAE (docs/quality.md, session 24). Here the
engine's registration draws the ids from the seed instead, in partition order, so the same flags sample the same
users, train the same adapters and write the same report (with the server reading replies in node-id order,
server/exchange.py, and clients rounding SecAgg+ vectors repeatably, common/secure_update.py). A deployment's
SuperLink draws its own ids as before. Under `flwr run` Flower's engine has drawn its random ids before any app of
ours loads, so the server orders nodes by the ids this module would have drawn (`flower_simulation_order`): the
same run config then samples the same users and sums their updates in the same order as flower-simulation does.

What the server may learn from it: no message changes, so the privacy audit is unchanged; code that knows the seed
and the partition rule (test users are the longest histories) could tell which partition a node id holds, much as
a deployment's server knows its nodes by their identity (not their data).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from flwr.common.constant import NODE_ID_NUM_BYTES, SUPERLINK_NODE_ID

from simulation.waiting import ENGINE_NODES


def seeded_node_ids(seed: int, count: int) -> list[int]:
    """`count` distinct node ids drawn from `seed` as Flower draws them (unsigned, NODE_ID_NUM_BYTES bytes, never 0
    nor the SuperLink's own id)."""
    rng = random.Random(f"node-ids|{seed}")
    taken = {0, SUPERLINK_NODE_ID}
    ids: list[int] = []
    while len(ids) < count:
        node_id = rng.getrandbits(8 * NODE_ID_NUM_BYTES)
        if node_id not in taken:
            taken.add(node_id)
            ids.append(node_id)
    return ids


def install_seeded_node_ids(seed: int) -> None:
    """Make Flower's simulation engine register its nodes under `seeded_node_ids(seed, n)` (partition i gets the
    i-th); refuses a Flower whose engine registers nodes another way, rather than run with ids it did not choose.

    The engine's in-memory link state draws an id for each node it creates; for the registering thread only, the
    draw returns the seeded ids instead (the state's other draws, run and message ids, stay Flower's)."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate

    if not callable(getattr(in_memory_linkstate, "generate_rand_int_from_bytes", None)) or not callable(
        getattr(vce_api, "_register_nodes", None)
    ):
        raise RuntimeError("flwr's simulation engine no longer registers nodes as simulation/node_ids.py expects "
                           "(flwr changed): update it for this flwr version")
    flower_register: Callable[..., dict[int, int]] = getattr(vce_api._register_nodes, "flower_register",
                                                              vce_api._register_nodes)

    def register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        wanted = seeded_node_ids(seed, num_nodes)
        drawn = iter(wanted)
        registering = threading.get_ident()
        flower_draw = in_memory_linkstate.generate_rand_int_from_bytes

        def draw(num_bytes: int, exclude: set[int] | None = None) -> int:
            if threading.get_ident() != registering or num_bytes != NODE_ID_NUM_BYTES:
                return flower_draw(num_bytes, exclude)
            return next(drawn)

        in_memory_linkstate.generate_rand_int_from_bytes = draw
        try:
            nodes = flower_register(num_nodes, state_factory)
        finally:
            in_memory_linkstate.generate_rand_int_from_bytes = flower_draw
        if nodes != {node_id: i for i, node_id in enumerate(wanted)}:
            raise RuntimeError("flwr's simulation engine did not register the seeded node ids (flwr changed): "
                               "update simulation/node_ids.py for this flwr version")
        return nodes

    register.flower_register = flower_register  # type: ignore[attr-defined]
    vce_api._register_nodes = register


def flower_simulation_order(seed: int, engine_nodes: Mapping[int, int] = ENGINE_NODES) -> Callable[[int], int]:
    """The server's node order under `flwr run` (ServerOptions.node_order): each node's key is the id
    flower-simulation gives its partition (`seeded_node_ids`), read from the engine's node-to-partition mapping
    (`engine_nodes`, complete once the engine's loop runs, before any reply); a node not in it keeps its own id."""

    @cache
    def seeded() -> list[int]:
        return seeded_node_ids(seed, max(engine_nodes.values()) + 1)

    def key(node_id: int) -> int:
        partition = engine_nodes.get(node_id)
        return node_id if partition is None else seeded()[partition]

    return key
