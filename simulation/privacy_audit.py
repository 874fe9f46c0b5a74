"""`oppu-audit RUN_DIR`: check a run's message logs against each other and the node-local stores; exit 1 on any
violation.

Neither side's log is trusted alone: every check reads both. Checks: both logs are whole (no missing file, no
undecodable or repeated line; a message a client received again in a new worker process, after the worker running it
died, is a redelivery, not a repeat); no tensor in a reply (as the client sent it or the server received it) is, by
name or content hash, a personal adapter's; every reply carries only the keys its phase allows (a secure-adapt reply
no tensor); a test user's node replies only to announce, model transfer, calibrate and personalize messages; in a
secure-aggregation run (run.json or a message's run config says so) no clear adapt-phase update reaches the server;
no planted canary string appears in any payload, and audit/canaries.json lists every canary the node stores hold;
the logs agree per attempt and message id in both directions (every message one side sent the other side received,
with the same content hash and node). An attempt is one Flower run (its run id is on every line): an interrupted
attempt that a resumed one followed may leave messages sent but never received, nothing else. Writes
<run>/audit/summary.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from common import protocol as p
from common.audit_log import tensor_sha256
from common.exit_status import BAD_INPUT, DONE, FAILED
from common.store import atomic_write_json
from simulation.node_stores import CANARY

PHASES = {p.ANNOUNCE: "announce", p.MODEL_CHUNK: "transfer", p.ADAPT: "adapt", p.CALIBRATE: "calibrate",
          p.PERSONALIZE: "personalize", p.SECURE_ADAPT: "secure-adapt"}
ALLOWED_REPLY_CONFIG = {p.ANNOUNCE: {p.ROLE, p.HAS_MODEL}, p.MODEL_CHUNK: {p.CHUNK_STORED},
                        p.SECURE_ADAPT: p.ALLOWED_SECURE_REPLY_CONFIG}
ALLOWED_REPLY_METRIC = {p.PERSONALIZE: p.ALLOWED_PERSONALIZE_METRIC, p.ADAPT: p.ALLOWED_ADAPT_METRIC,
                        p.CALIBRATE: p.ALLOWED_CALIBRATE_METRIC, p.SECURE_ADAPT: p.ALLOWED_SECURE_METRIC}
LOG_FIELDS = ("time", "side", "direction", "src", "dst", "message_id", "run", "message_type", "error", "records",
              "content_sha256")
SIDES = ("server", "client")
# where the other side logs the same message, and (for a reply) where its own side logged the request
COUNTERPART = {("server", "out"): ("client", "in"), ("client", "in"): ("server", "out"),
               ("client", "out"): ("server", "in"), ("server", "in"): ("client", "out")}
REQUEST = {("client", "out"): ("client", "in"), ("server", "in"): ("server", "out")}


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(entries, problems) of one side's JSONL log; each entry gets its "line" (file:number) for violations,
    and a line that is not a whole entry of this side is a problem, not a traceback."""
    side = path.stem
    entries, problems = [], []
    for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
        where = f"{path.parent.name}/{path.name}:{number}"
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not a whole JSON line (truncated or corrupt: {e.msg}, column {e.colno})")
            continue
        missing = [f for f in LOG_FIELDS if f not in entry] if isinstance(entry, dict) else list(LOG_FIELDS)
        if missing:
            problems.append(f"{where}: not an audit entry (no {', '.join(missing)})")
        elif entry["side"] != side:
            problems.append(f"{where}: a {entry['side']} entry in the {side} log")
        else:
            entries.append({**entry, "line": where})
    return entries, problems


def read_logs(audit_dir: Path, sides: tuple[str, ...] = SIDES) -> tuple[list[dict[str, Any]], list[str], int]:
    """(entries of the sides' logs, problems, redeliveries): problems are a missing log, lines that are not entries,
    and repeated lines other than redeliveries (a message a client received again, on a new worker)."""
    entries, problems, redelivered = [], [], 0
    for side in sides:
        path = audit_dir / f"{side}.jsonl"
        if not path.exists():
            problems.append(f"{path}: missing, so no {side} side to check the other side's log against")
            continue
        found, unreadable = read_log(path)
        entries += found
        problems += unreadable
    first: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entry in entries:
        if (seen := first.setdefault(_key(entry), entry)) is entry:
            continue
        if _is_redelivery(entry, seen):
            redelivered += 1
        else:
            problems.append(f"{entry['line']}: repeats {seen['line']} ({entry['side']} {entry['direction']} message "
                            f"{entry['message_id']})")
    return entries, problems, redelivered


def _is_redelivery(entry: dict[str, Any], first: dict[str, Any]) -> bool:
    """A client received the same message again in another process: Ray runs a message once more on the worker
    that replaces one that died running it. A copied line (same process) stays a repeat."""
    pids = entry.get("pid"), first.get("pid")  # logs written before lines had a pid have no redeliveries
    return ((entry["side"], entry["direction"]) == ("client", "in")
            and entry["content_sha256"] == first["content_sha256"] and None not in pids and pids[0] != pids[1])


def _key(entry: dict[str, Any], way: tuple[str, str] | None = None) -> tuple[Any, ...]:
    """What identifies one line: side, direction, attempt (Flower run id) and message id."""
    return (*(way or (entry["side"], entry["direction"])), entry["run"], entry["message_id"])


def _is_reply(entry: dict[str, Any]) -> bool:
    return (entry["side"], entry["direction"]) in REQUEST


def _node(entry: dict[str, Any]) -> int:
    """The client node of a message: the receiver of a request, the sender of a reply."""
    return entry["src"] if _is_reply(entry) else entry["dst"]


def personal_tensors(run_dir: Path) -> tuple[set[str], set[str]]:
    """(adapter names, tensor content hashes) of every personal adapter in the node-local stores."""
    names, hashes = set(), set()
    for weights in run_dir.glob("clients/*/adapters/*/adapter_model.safetensors"):
        names.add(weights.parent.name)
        hashes.update(tensor_sha256(t) for t in load_file(str(weights)).values())
    return names, hashes


def _where(entry: dict[str, Any]) -> str:
    return (f"{entry['line']} {entry['side']} {entry['direction']} {entry.get('message_type')} message "
            f"{entry['message_id']} (node {entry['src']} -> {entry['dst']})")


def reply_violations(entry: dict[str, Any], adapter_names: set[str], adapter_hashes: set[str]) -> list[str]:
    """What is wrong with one reply, as its client sent it or as the server received it."""
    problems = []
    kind = entry.get("message_type")
    for key, record in entry["records"].items():
        if record["type"] == "arrays" and kind == p.SECURE_ADAPT:  # secaggplus_mod empties the FitRes arrays
            if record["tensors"]:
                problems.append(f"{_where(entry)}: carries a training user's update in clear ({key}: "
                                f"{len(record['tensors'])} tensors) in phase secure-adapt")
        elif record["type"] == "arrays":
            if kind != p.ADAPT:
                problems.append(f"{_where(entry)}: carries tensors ({key}) in phase {PHASES.get(kind, kind)}")
            for tensor in record["tensors"]:
                if tensor["sha256"] in adapter_hashes:
                    problems.append(f"{_where(entry)}: tensor {tensor['name']} equals a personal adapter tensor")
                if any(name in tensor["name"] for name in adapter_names):
                    problems.append(f"{_where(entry)}: tensor {tensor['name']} is named after a personal adapter")
        elif record["type"] == "metrics":
            allowed = ALLOWED_REPLY_METRIC.get(kind, p.ALLOWED_ADAPT_METRIC)
            bad = sorted(k for k in record["values"] if not allowed.match(k))
            if bad or kind not in ALLOWED_REPLY_METRIC:
                problems.append(f"{_where(entry)}: metric keys not allowed in this phase: {bad or list(record['values'])}")
        elif record["type"] == "config":
            bad = sorted(set(record["values"]) - ALLOWED_REPLY_CONFIG.get(kind, set()))
            if bad:
                problems.append(f"{_where(entry)}: config keys not allowed in a reply: {bad}")
    return problems


# the phases a test user's node may reply in: it announces, stores the model and sends metric statistics (of the
# shared model at each answer quantile, of every method); training (task-LoRA updates, item tables) is the training
# users' part
TEST_USER_PHASES = {p.ANNOUNCE, p.MODEL_CHUNK, p.CALIBRATE, p.PERSONALIZE}


def test_user_violations(entries: list[dict[str, Any]]) -> list[str]:
    """A test user's node (its announce reply says its role) sends nothing but replies in TEST_USER_PHASES."""
    replies = [e for e in entries if _is_reply(e)]
    test_nodes = {_node(e) for e in replies if e.get("message_type") == p.ANNOUNCE
                  and any(r["type"] == "config" and r["values"].get(p.ROLE) == "test" for r in e["records"].values())}
    return [f"{_where(e)}: a test user's node replies in phase {PHASES.get(kind, kind)} (test users send metric "
            "statistics only)"
            for e in replies if _node(e) in test_nodes and (kind := e.get("message_type")) not in TEST_USER_PHASES]


def secure_run(run_dir: Path, entries: list[dict[str, Any]]) -> bool:
    """Whether the run was meant to aggregate securely: its run.json says so, or a message's run config does."""
    settings = run_dir / "run.json"
    declared = settings.exists() and json.loads(settings.read_text())["config"].get("secure-aggregation", False)
    return bool(declared) or any(
        record["type"] == "config" and record["values"].get("secure-aggregation") is True
        for entry in entries for record in entry["records"].values()
    )


def masking_violations(entries: list[dict[str, Any]]) -> list[str]:
    """In a secure-aggregation run no training user's update may travel in clear: the clear adapt phase must not
    run at all (its replies are single users' updates)."""
    return [f"{_where(e)}: carries a training user's update in clear in a secure-aggregation run"
            for e in entries if _is_reply(e) and e.get("message_type") == p.ADAPT]


def planted_canaries(run_dir: Path, listed_required: bool = True) -> tuple[dict[str, str], list[str]]:
    """(canary -> user, problems): the canaries audit/canaries.json lists together with those found in the node
    stores' data, so a missing or edited canaries.json neither hides a canary nor goes unnoticed. The server's side
    alone (`listed_required=False`) may lack the list: a coordinator holds no stores to have planted any."""
    path = run_dir / "audit" / "canaries.json"
    try:
        listed, problems = json.loads(path.read_text()) if listed_required or path.exists() else {}, []
    except (FileNotFoundError, json.JSONDecodeError) as e:
        state = "missing" if isinstance(e, FileNotFoundError) else f"not JSON ({e.msg})"
        listed, problems = {}, [f"{path}: {state}; it lists the planted canaries ({{}} when none were planted)"]
    canaries = {canary: user for user, canary in listed.items()}
    for data in sorted(run_dir.glob("clients/*/data.json")):
        for canary in sorted(set(CANARY.findall(data.read_text())) - set(canaries)):
            canaries[canary] = data.parent.name
            problems.append(f"{path}: does not list the canary planted in {data.relative_to(run_dir)}")
    return canaries, problems


def canary_violations(entry: dict[str, Any], canaries: dict[str, str]) -> list[str]:
    """Planted canary strings found anywhere in the entry's logged payload (values or raw-byte scans)."""
    text = json.dumps(entry["records"])
    return [f"{_where(entry)}: contains the history canary of user {user}" for c, user in canaries.items() if c in text]


def attempts(entries: list[dict[str, Any]]) -> list[Any]:
    """Flower run ids in the order they started: one per attempt (a --resume is a new Flower run)."""
    started: dict[Any, float] = {}
    for entry in entries:
        started[entry["run"]] = min(started.get(entry["run"], entry["time"]), entry["time"])
    return sorted(started, key=started.__getitem__)


def agreement_violations(entries: list[dict[str, Any]]) -> tuple[list[str], int]:
    """(violations, messages in flight when an earlier attempt was cut off): per attempt and message id, every
    line of one side has its counterpart on the other (same content hash and client node), and every reply answers
    a request its own side logged. Only an attempt that a later one followed may leave a message sent, not received."""
    logged = {e["side"] for e in entries}
    if len(logged) == 1:  # one log missing or emptied: one violation, not one per line of the other log
        (side,) = set(SIDES) - logged
        return [f"the {side} log has no entries to compare the other log's {len(entries)} with"], 0
    index: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entry in entries:
        index.setdefault(_key(entry), entry)
    runs = attempts(entries)
    problems, in_flight = [], 0
    for entry in index.values():
        way = (entry["side"], entry["direction"])
        other = index.get(_key(entry, COUNTERPART[way]))
        if other is None:
            if entry["direction"] == "out" and entry["run"] != runs[-1]:
                in_flight += 1
            elif not (way == ("server", "in") and entry["error"] and not entry["records"]):  # Flower's own error
                side, direction = COUNTERPART[way]  # reply (node gone, message expired) has no client line
                problems.append(f"{_where(entry)}: {'sent' if entry['direction'] == 'out' else 'received'}, but the "
                                f"{side} log has no '{direction}' line for it")
        elif entry["direction"] == "out":  # each pair once, from its sender
            if _node(entry) != _node(other):
                problems.append(f"{_where(entry)}: {other['line']} has it at node {_node(other)}")
            if entry["content_sha256"] != other["content_sha256"] and not (entry["error"] or other["error"]):
                problems.append(f"{_where(entry)}: content differs from {other['line']}")
        if _is_reply(entry) and _key(entry, REQUEST[way]) not in index:
            problems.append(f"{_where(entry)}: a reply to a request its own log has no '{REQUEST[way][1]}' line for")
    return problems, in_flight


def traffic(server: list[dict[str, Any]]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Bytes and messages per phase (down = server to nodes, up = replies), and bytes per node."""
    phases: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    nodes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in server:
        phase = PHASES.get(e.get("message_type"), str(e.get("message_type")))
        way = "up" if _is_reply(e) else "down"
        phases[phase][f"bytes_{way}"] += e["bytes"]
        phases[phase][f"messages_{way}"] += 1
        nodes[str(_node(e))][f"bytes_{way}"] += e["bytes"]
    return {k: dict(v) for k, v in phases.items()}, {k: dict(v) for k, v in nodes.items()}


def audit(run_dir: Path, sides: tuple[str, ...] = SIDES) -> dict[str, Any]:
    """Run every check on the sides' logs (both: all of them; one side alone, as on a machine that holds only that
    side: every check but logs-agree); the summary that `oppu-audit` prints and writes."""
    entries, log_problems, redelivered = read_logs(run_dir / "audit", sides)
    canaries, canary_problems = planted_canaries(run_dir, listed_required="client" in sides)
    names, hashes = personal_tensors(run_dir)
    checks: dict[str, list[str]] = {
        "logs-whole": log_problems,
        "personal-tensors-and-keys": [v for e in entries if _is_reply(e) for v in reply_violations(e, names, hashes)],
        "canaries": canary_problems + [v for e in entries for v in canary_violations(e, canaries)],
        "updates-masked": masking_violations(entries) if secure_run(run_dir, entries) else [],
        "test-users-send-metrics-only": test_user_violations(entries),
    }
    in_flight = 0
    if len(sides) == 2:
        checks["logs-agree"], in_flight = agreement_violations(entries)
    server = [e for e in entries if e["side"] == "server"]
    phases, per_node = traffic(server if "server" in sides else entries)
    return {
        "run_dir": str(run_dir),
        "sides": list(sides),
        "messages": {"server": len(server), "client": len(entries) - len(server)},
        "attempts": attempts(entries),
        "sent_not_received_in_interrupted_attempts": in_flight,
        "redelivered_after_worker_death": redelivered,
        "personal_adapters_checked": len(names),
        "canaries_planted": len(canaries),
        "phases": phases,
        "nodes": per_node,
        "checks": {name: {"passed": not found, "violations": found} for name, found in checks.items()},
        "passed": not any(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oppu-audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path,
                        help="a run directory written by flower-simulation or oppu-deploy; with --side client, a "
                             "node's own directory (<dir>/<user> of `oppu-deploy supernode`)")
    parser.add_argument("--side", choices=("both", *SIDES), default="both",
                        help="the logs to check: both (all checks), or one side alone where only it is (the "
                             "coordinator's run directory: server; a device machine's node directory: client): every "
                             "check but logs-agree, which needs both logs (copy the nodes' audit/client.jsonl into "
                             "the run's audit/client.jsonl for it)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"oppu-audit: {args.run_dir}: no such run directory", file=sys.stderr)
        return BAD_INPUT
    if not (args.run_dir / "run.json").is_file() and not (args.run_dir / "audit").is_dir():
        print(f"oppu-audit: {args.run_dir}: neither run.json nor audit/ there; expected a run directory written by "
              "flower-simulation or oppu-deploy (with --side client, a node's own directory)", file=sys.stderr)
        return BAD_INPUT  # and nothing written into a directory that is no run's
    summary = audit(args.run_dir, SIDES if args.side == "both" else (args.side,))
    atomic_write_json(args.run_dir / "audit" / "summary.json", summary)
    print(f"audit of {args.run_dir} ({' and '.join(summary['sides'])} side{'s' * (len(summary['sides']) - 1)}): "
          f"{summary['messages']['server']} server / {summary['messages']['client']} client log entries, {summary['personal_adapters_checked']} personal adapters, "
          f"{summary['canaries_planted']} canaries")
    if len(summary["attempts"]) > 1:
        print(f"  {len(summary['attempts'])} attempts (resumed); sent but cut off by an interruption: "
              f"{summary['sent_not_received_in_interrupted_attempts']} messages")
    if summary["redelivered_after_worker_death"]:
        print(f"  {summary['redelivered_after_worker_death']} message(s) received again by a new worker after the "
              "first one died running them")
    for phase, stats in summary["phases"].items():
        print(f"  {phase:12s} down {stats.get('bytes_down', 0):>14,d} B in {stats.get('messages_down', 0):>4d} msgs"
              f"   up {stats.get('bytes_up', 0):>12,d} B in {stats.get('messages_up', 0):>4d} msgs")
    for name, check in summary["checks"].items():
        print(f"  [{'pass' if check['passed'] else 'FAIL'}] {name}")
        for violation in check["violations"][:20]:
            print(f"      {violation}")
    print("audit passed" if summary["passed"] else "audit FAILED")
    return DONE if summary["passed"] else FAILED


if __name__ == "__main__":
    sys.exit(main())
