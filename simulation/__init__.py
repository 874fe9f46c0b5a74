"""The commands: flower-simulation, oppu-deploy, oppu-study and oppu-audit.

Importing this package turns Flower's telemetry off for this process and every process it starts, unless the
user set FLWR_TELEMETRY_ENABLED: at each engine, SuperLink and SuperNode start Flower sends an event (platform
details and a source id kept in FLWR_HOME) to telemetry.flower.ai from a background thread. Nothing should leave a
machine that runs users' data unless the user asked for it. The thread's HTTPS set-up also held OpenSSL's locks
while Ray forked its GCS, and the forked child spun on one of them forever (a suite run hung so).
"""

import os
import sys

FLOWER_TELEMETRY = "FLWR_TELEMETRY_ENABLED"  # read by Flower once, when flwr.supercore.telemetry is imported

os.environ.setdefault(FLOWER_TELEMETRY, "0")
if (_telemetry := sys.modules.get("flwr.supercore.telemetry")) is not None:  # flwr came first (bench/attack.py)
    _telemetry.FLWR_TELEMETRY_ENABLED = os.environ[FLOWER_TELEMETRY]
