"""Flower's telemetry is off in our commands and every process they start, unless the user asks for it: Flower would
POST an event with platform details to telemetry.flower.ai at each engine, SuperLink and SuperNode start. Checked in
a fresh interpreter that imports flwr before our package (as bench/attack.py does) and asks Flower itself whether an
event would be sent ("disabled": no request made)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulation import FLOWER_TELEMETRY

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import os
import flwr.app  # loads flwr.supercore.telemetry, which reads FLWR_TELEMETRY_ENABLED once
import simulation
from flwr.supercore import telemetry
outcome = telemetry.create_event(telemetry.EventType.PING, None) if os.environ["FLWR_TELEMETRY_ENABLED"] == "0" else ""
print(os.environ["FLWR_TELEMETRY_ENABLED"], telemetry.FLWR_TELEMETRY_ENABLED, outcome)
"""


@pytest.mark.parametrize(("given", "seen"), [(None, "0 0 disabled"), ("1", "1 1")])
def test_flower_telemetry_is_off_unless_the_user_turns_it_on(given: str | None, seen: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != FLOWER_TELEMETRY}
    if given is not None:
        env[FLOWER_TELEMETRY] = given
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == seen  # before: "1 1" without the variable (Flower's default)
