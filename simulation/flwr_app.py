"""The ServerApp and ClientApp that `flwr run` loads (pyproject's [tool.flwr.app.components]): ours, with Flower's
simulation engine made to wait as `flower-simulation` makes it (simulation/waiting.py).

On the local simulation connection `flwr run` runs Flower's own engine, whose loop asks its link state for every
node's message ten times a second, each query looking through every message out: with the 943 nodes of
MovieLens-100K that kept 71 % of a core busy while 100 test users trained, and a whole core in the item-table round
(a third to a half of a 2-core machine; docs/benchmarks.md). Flower's simulation runtime imports the ClientApp
before it starts that loop, so loading this module puts ours in its place, where the engine's module is loaded, i.e.
where an engine can run; and the server's wait between pulls ends when the engine stores a reply. The server
orders nodes by the ids flower-simulation would have given them (simulation/node_ids.py), so that the same settings
give the same run on both. In a SuperNode's process, or a ServerApp's on a SuperLink, no engine runs: nothing is
installed, the server's wait is a plain sleep (no store ever signals one there) and nodes keep their own ids.

A SuperNode loads this module for its ClientApp in a fresh process for every message, so the server's code (torch,
transformers: 6 s and 340 MB a message) is imported only when the ServerApp runs.
"""

from __future__ import annotations

import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.app import make_client_app
from simulation.node_ids import flower_simulation_order
from simulation.waiting import install_patient_extractor, wait_for_reply

ENGINE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"  # loaded by Flower's simulation runtime before any app

if ENGINE_MODULE in sys.modules:
    install_patient_extractor()
client_app = make_client_app()
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """OPPU on `flwr run`'s grid, with the run config `flwr run` gives (server/app.py: run_flwr)."""
    from server.app import run_flwr  # here, in the ServerApp's process only (see above)

    run_flwr(grid, context, wait_for_reply, flower_simulation_order)
