"""Across hosts on one machine: a SuperLink on 127.0.0.2 with a certificate for a hostname, SuperNodes started from
separate directories (standing in for machines) that hold only their own users' files and join by that hostname,
refused nodes (wrong CA, key not registered), `oppu-deploy run` and the audit on each side.

A hostname must resolve on the machine that joins by it, and a test may not edit /etc/hosts: each device machine's
processes run in their own mount namespace (`unshare --user --map-root-user --mount`) whose /etc/hosts is a file of
the test's mapping the hostname to 127.0.0.2, so they resolve it as a machine with that entry would. Flower 1.42's
SuperNode speaks HTTPS (httpx) and has no TLS target-name override, so the name must really resolve.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_traces import command_lines, processes_naming

from simulation.deploy.cli import main as deploy_main
from simulation.deploy.keys import make_tls
from simulation.deploy.processes import free_ports, running
from simulation.privacy_audit import main as audit_main

REPO = Path(__file__).resolve().parents[1]
HOSTNAME = "coordinator.oppu.test"
COORDINATOR_IP = "127.0.0.2"
RUN_ARGS = ["--num-clients", "2", "--train-clients", "1", "--rounds", "1", "--methods", "base,oppu", "--task",
            "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--batch-tokens", "256", "--personal-epochs", "1",
            "--max-history", "8", "--task-history", "4"]
MACHINE = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"']


STOP_WITHIN = 15.0  # seconds from Ctrl-C/SIGTERM until a role has stopped everything it started, busy machine or not


@pytest.fixture(scope="module", autouse=True)
def machines_stand_in() -> None:
    """The machines of these tests are mount namespaces: if this machine cannot make one, the tests fail saying
    why (they never skip, so the multi-machine checks cannot silently vanish from a suite that stays green)."""
    try:
        done = subprocess.run([*MACHINE, "/etc/hosts", "true"], capture_output=True, text=True, timeout=30)
        problem = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem:
        pytest.fail(f"`unshare --user --map-root-user --mount` gives each stand-in machine its own /etc/hosts, and "
                    f"it failed here ({problem})", pytrace=False)


def _deploy(args: list[str], log: Path, hosts: Path | None = None) -> subprocess.Popen:
    """`oppu-deploy ARGS` as its own process; with `hosts`, on a "machine" whose /etc/hosts is that file."""
    prefix = [*MACHINE, str(hosts)] if hosts else []
    with open(log, "wb") as out:
        return subprocess.Popen([*prefix, sys.executable, "-m", "simulation.deploy", *args], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {path} within {timeout:.0f} s: {log.read_text()}"
        time.sleep(0.2)


def _exit_of(process: subprocess.Popen, timeout: float, log: Path) -> int:
    """The exit status; a process still running after `timeout` is killed and the test fails with its log."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running {timeout:.0f} s after the signal; its log:\n{log.read_text()}") from None


def test_superlink_on_another_address_supernodes_from_their_own_directories(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Node caches start with the base model (tests/test_deploy.py has it sent): a ClientApp process per message, on
    2 cores, makes each of the six chunks cost ~20 s with three nodes."""
    partition, coordinator, run_dir = tmp_path / "partition", tmp_path / "coordinator", tmp_path / "run"
    assert deploy_main(["partition", "--out", str(partition), "--num-clients", "2", "--train-clients", "1",
                        "--task", "LaMP-2M", "--data", "synthetic", "--rounds", "1", "--canaries"]) == 0
    nodes = json.loads((partition / "nodes.json").read_text())
    assert sorted(n["role"] for n in nodes) == ["test", "test", "train"]
    users = [n["user"] for n in nodes]

    [port] = free_ports(1, COORDINATOR_IP)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{COORDINATOR_IP} {HOSTNAME}\n")
    started: list[subprocess.Popen] = []
    try:
        superlink_log = tmp_path / "superlink.out"
        superlink = _deploy(["superlink", "--dir", str(coordinator), "--host", COORDINATOR_IP, "--port", str(port),
                             "--name", HOSTNAME], superlink_log)
        started.append(superlink)
        _wait_for(coordinator / "join.json", superlink, superlink_log, 60)
        join = json.loads((coordinator / "join.json").read_text())
        assert join["address"] == f"{HOSTNAME}:{port}" and join["names"] == [HOSTNAME, COORDINATOR_IP]
        ca = coordinator / "tls" / "ca.pem"

        # machines: a holds a test and the training user, b the other test user, each only its own files
        machines = {"a": [users[0], users[2]], "b": [users[1]]}
        for machine, held in machines.items():
            for user in held:
                (tmp_path / machine).mkdir(exist_ok=True)
                shutil.copy(partition / "clients" / user / "data.json", tmp_path / machine / f"{user}.json")
            shutil.copy(ca, tmp_path / machine / "ca.pem")
        joining = ["--superlink", f"{HOSTNAME}:{port}", "--ca-cert"]
        keys = []
        for machine, held in machines.items():
            here = tmp_path / machine
            assert deploy_main(["supernode", *joining, str(here / "ca.pem"), "--dir", str(here / "nodes"),
                                "--keys-only", *(str(here / f"{u}.json") for u in held)]) == 0
            keys += [here / "nodes" / u / "node_key.pub" for u in held]
            for user in held:
                shutil.copytree(tiny_model_dir, here / "nodes" / user / "cache" / "models" / tiny_model_dir.name)
        # the coordinator registers the keys it was sent, by its own address (its certificate names it too)
        assert deploy_main(["register", "--superlink", f"{COORDINATOR_IP}:{port}", "--ca-cert", str(ca),
                            "--log-dir", str(coordinator / "register-logs"), *map(str, keys)]) == 0

        # refused: a machine trusting another CA, and one whose key nobody registered
        other_ca = make_tls(tmp_path / "other-ca", ["localhost"])[0]
        refused = {}
        for machine, machine_ca in (("wrong-ca", other_ca), ("unregistered", ca)):
            here = tmp_path / machine
            here.mkdir()
            shutil.copy(partition / "clients" / users[1] / "data.json", here / "user.json")
            log = tmp_path / f"{machine}.out"
            refused[machine] = (_deploy(["supernode", *joining, str(machine_ca), "--dir", str(here / "nodes"),
                                         str(here / "user.json")], log, hosts), log)
            started.append(refused[machine][0])
        supernodes = {}
        for machine, held in machines.items():
            here = tmp_path / machine
            log = tmp_path / f"{machine}.out"
            supernodes[machine] = (_deploy(["supernode", *joining, str(here / "ca.pem"), "--dir", str(here / "nodes"),
                                            *(str(here / f"{u}.json") for u in held)], log, hosts), log)
            started.append(supernodes[machine][0])

        for machine, reason in (("wrong-ca", "refused by TLS"), ("unregistered", "public key is not registered")):
            process, log = refused[machine]
            assert _exit_of(process, 60, log) == 1, log.read_text()
            assert reason in log.read_text(), log.read_text()

        assert deploy_main(["run", "--superlink", f"{COORDINATOR_IP}:{port}", "--ca-cert", str(ca), "--partition",
                            str(partition), "--run-dir", str(run_dir), *RUN_ARGS]) == 0
        # each role stops within seconds of Ctrl-C or SIGTERM, with every core busy with other work
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
        started += hogs
        for machine, (process, log) in supernodes.items():
            assert process.poll() is None, log.read_text()  # still serving after the run
            process.send_signal(signal.SIGINT)
            assert _exit_of(process, STOP_WITHIN, log) == 0, log.read_text()
        superlink.send_signal(signal.SIGTERM)
        assert _exit_of(superlink, STOP_WITHIN, superlink_log) == 0, superlink_log.read_text()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["users"] == {"test": 2, "evaluated": 2, "failed": 0, "train": 1}
    assert report["model"]["sent_to_nodes"] == 0
    for machine, held in machines.items():  # each machine holds its own users' stores only
        assert sorted(p.parent.name for p in (tmp_path / machine / "nodes").glob("*/clients/*/data.json")) == sorted(held)

    # the audit on each side alone: the coordinator's run directory, each node's own directory
    assert audit_main(["--side", "server", str(run_dir)]) == 0
    server = json.loads((run_dir / "audit" / "summary.json").read_text())
    assert server["canaries_planted"] == 3 and "logs-agree" not in server["checks"]
    client_logs = []
    for machine, held in machines.items():
        for user in held:
            node = tmp_path / machine / "nodes" / user
            assert audit_main(["--side", "client", str(node)]) == 0
            summary = json.loads((node / "audit" / "summary.json").read_text())
            assert summary["canaries_planted"] == 1 and summary["messages"]["client"] > 0
            client_logs.append((node / "audit" / "client.jsonl").read_text())
    # and both sides together, once the nodes' logs are collected beside the server's
    (run_dir / "audit" / "client.jsonl").write_text("".join(client_logs))
    assert audit_main([str(run_dir)]) == 0
    assert json.loads((run_dir / "audit" / "summary.json").read_text())["checks"]["logs-agree"]["passed"]

    deadline = time.monotonic() + 15
    while (alive := running(processes_naming(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, command_lines(alive)


def test_run_against_a_superlink_that_does_not_answer_says_what_flwr_run_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, _, _ = make_tls(tmp_path / "tls", [COORDINATOR_IP])
    [port] = free_ports(1, COORDINATOR_IP)  # nothing listens there
    status = deploy_main(["run", "--superlink", f"{COORDINATOR_IP}:{port}", "--ca-cert", str(ca), *RUN_ARGS,
                          "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.startswith(f"oppu-deploy run: the run failed (flwr run exit 1, no {tmp_path / 'run' / 'report.json'})")
    assert "flwr run said:" in err and "Connection to the SuperLink is unavailable" in err, err
