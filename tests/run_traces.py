"""What a run leaves behind that tests check: the processes still running for it, and the addresses its Ray
session's processes used and listened on (tests keep Ray on loopback)."""

from __future__ import annotations

import ipaddress
import re
import time
from pathlib import Path

import psutil

from simulation.deploy.processes import running

RAY_TEMP = Path("/tmp/ray")  # Ray's default temp dir: a folder per session


def logged_addresses(logs: Path) -> set[str]:
    """Every IPv4 address that appears as HOST:PORT in the session's .out/.log/.err files."""
    return {ip for path in logs.glob("*.*") if path.suffix in (".out", ".log", ".err")
            for ip in re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+", path.read_text(errors="replace"))}


def listening_addresses(pid: int) -> set[tuple[str, str]]:
    """(process name, address) of every TCP socket that the process `pid` and its descendants (Ray's GCS, raylet and
    workers) listen on now."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for process in tree:
        try:
            found |= {(process.name(), c.laddr.ip) for c in process.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return found


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also written as IPv4 in IPv6 (::ffff:127.0.0.1, as Ray's gRPC servers listen)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def session_logs(driver_pid: int) -> Path:
    """The logs of the Ray session that the process `driver_pid` started (Ray names its folder after that pid; the
    newest such folder, should an earlier process have had the same pid)."""
    found = list(RAY_TEMP.glob(f"session_*_{driver_pid}/logs"))
    assert found, f"no Ray session started by pid {driver_pid} in {RAY_TEMP}"
    return max(found, key=lambda logs: logs.stat().st_mtime)


def processes_naming(path: Path) -> list[psutil.Process]:
    """The running processes whose command line names `path` (a run directory, a stand-in machine's directory)."""
    return [process for process in psutil.process_iter(["cmdline"])
            if any(str(path) in part for part in process.info["cmdline"] or [])]


def command_lines(processes: list[psutil.Process]) -> list[str]:
    """What each process runs, for a failure message (a process that ends meanwhile is named by its pid)."""
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.NoSuchProcess:
            lines.append(f"pid {process.pid} (ended meanwhile)")
    return lines


def still_running(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Those of `processes` still running at `deadline` (time.monotonic()); [] as soon as every one has ended."""
    while (alive := running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive
