"""Process supervision: every process oppu-deploy starts is stopped by PID, with every process below it, at the end,
on failure, on Ctrl-C and on SIGTERM; if oppu-deploy itself is killed (even by SIGKILL), a watchdog process kills
them."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, cast

import psutil

from common.exit_status import DONE, FAILED
from simulation.deploy.diagnosis import why_exited

REPO = Path(__file__).resolve().parents[2]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different TCP ports on `host` that nothing listens on now: held open together while the kernel
    chooses, so that processes started one after another, none yet listening, never get the same port."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen) -> None:
    """Until `host:port` accepts connections (a bind-all address: its loopback, as Flower's SuperExec does)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} before listening on "
                               f"{host}:{port}")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def wait_for_exit(process: subprocess.Popen, name: str, timeout: float) -> int:
    """`process`'s exit status; a TimeoutError naming it after `timeout` seconds."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{name} did not finish within {timeout:.0f} s") from None


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running (a zombie has exited; it only waits to be reaped)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop_trees(roots: list[psutil.Process], grace: float) -> None:
    """Stop each running root and every process below it (SuperExec, ServerApp, ClientApps), which may have left
    its session: TERM, up to `grace` seconds to exit, then KILL (at once with grace 0)."""
    victims: list[psutil.Process] = []
    for root in running(roots):
        try:
            victims += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace
    for how in ("terminate", "kill") if grace else ("kill",):
        for victim in reversed(running(victims)):  # the deepest first
            try:
                getattr(victim, how)()
            except psutil.NoSuchProcess:
                pass
        while running(victims) and time.monotonic() < deadline:
            time.sleep(0.1)


def watch_launcher() -> None:
    """The watchdog: reads the pids of the processes oppu-deploy starts, one a line, from stdin. Its stdin ends when
    oppu-deploy exits, however it exits (a SIGKILL too closes the pipe's other end): it then kills what is left."""
    started = []
    for line in sys.stdin:
        try:
            started.append(psutil.Process(int(line)))  # psutil keeps its start time: a reused pid is not it
        except psutil.NoSuchProcess:
            pass
    stop_trees(started, grace=0)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops us like Ctrl-C: the `with` block's exit stops every started process


class Processes:
    """Processes this launcher started, each in its own session, stopped by PID (TERM, then KILL) whatever happens;
    if this process is killed, a watchdog process (own session, reading a pipe from us) kills them.

    Used as `with Processes(...) as processes:`, the one place a role's processes are stopped: inside the block
    SIGTERM stops the launcher like Ctrl-C (KeyboardInterrupt), and leaving the block, however, stops every started
    process and restores the SIGTERM handler."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.started: list[subprocess.Popen] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "watchdog.log", "ab") as log:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", "from simulation.deploy.processes import watch_launcher; watch_launcher()"],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            )
        self.pids = cast(IO[bytes], self.watchdog.stdin)

    def __enter__(self) -> Processes:
        self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def start(self, name: str, command: list[str], cwd: Path = REPO) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                       start_new_session=True)
        self.started.append(process)
        self.pids.write(f"{process.pid}\n".encode())
        self.pids.flush()
        return process

    def run(self, name: str, command: list[str], timeout: float) -> None:
        """A short command, watched like the others; its output goes to its log."""
        status = wait_for_exit(self.start(name, command), name, timeout)
        if status:
            raise RuntimeError(f"{name} exited with {status}; see {self.log_dir / f'{name}.log'}")

    def serve(self, watched: dict[str, subprocess.Popen]) -> int:
        """Keep long-running processes up until Ctrl-C or SIGTERM (exit 0), or until one of them exits (exit 1,
        saying why); leaving the `with` block then stops every process."""
        try:
            while True:
                for name, process in watched.items():
                    if process.poll() is not None:
                        log = self.log_dir / f"{name}.log"
                        print(f"oppu-deploy: {name} exited with {process.returncode} (log: {log}):\n    "
                              f"{why_exited(log)}", file=sys.stderr)
                        return FAILED
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("oppu-deploy: stopped; every started process was stopped", file=sys.stderr)
            return DONE

    def stop_all(self) -> None:
        """Stop every started process that still runs, with its descendants, then the watchdog."""
        # (a child that exited after poll() stays a zombie until waited for, so its pid is still its own)
        stop_trees([psutil.Process(p.pid) for p in self.started if p.poll() is None], grace=10)
        for process in self.started:
            process.wait()
        self.pids.close()
        self.watchdog.wait()
