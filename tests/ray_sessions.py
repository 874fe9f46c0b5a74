"""What a Ray session's own logs say about the addresses its processes used (tests keep Ray on loopback)."""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_SESSION_LOGS = Path("/tmp/ray/session_latest/logs")  # Ray's default temp dir: the latest session's logs


def logged_addresses(logs: Path = DEFAULT_SESSION_LOGS) -> set[str]:
    """Every IPv4 address that appears as HOST:PORT in the session's .out/.log/.err files."""
    return {ip for path in logs.glob("*.*") if path.suffix in (".out", ".log", ".err")
            for ip in re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+", path.read_text(errors="replace"))}
