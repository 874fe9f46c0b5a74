"""Why a Flower process exited, told from its log: Flower's exit message, with what a refusal means to the person
starting the node; else the end of the log."""

from __future__ import annotations

from pathlib import Path


def _lines(log: Path) -> list[str]:
    """The non-blank lines of a log; none while it does not exist."""
    return [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []


def log_tail(log: Path, lines: int = 6) -> str:
    """The last `lines` non-blank lines of a log, indented to follow a message."""
    return "\n    ".join(_lines(log)[-lines:])


REFUSALS = {  # what Flower's exit message says -> what it means to the person starting the node
    "CERTIFICATE_VERIFY_FAILED": "refused by TLS: the SuperLink's certificate is not signed by --ca-cert, or does "
                                 "not name the host in --superlink",
    "Failed to activate SuperNode": "refused by the SuperLink: this node's public key is not registered "
                                    "(oppu-deploy register ... <dir>/<user>/node_key.pub)",
}


def why_exited(log: Path) -> str:
    """Flower's exit message in a process's log (from its 'Exit Code' line), with what a refusal means; else the
    end of the log."""
    lines = _lines(log)
    start = next((i for i in range(len(lines) - 1, -1, -1) if "Exit Code" in lines[i]), None)
    if start is None:
        return log_tail(log)
    block = lines[start:start + next((i for i, line in enumerate(lines[start:]) if "For more information" in line),
                                     len(lines) - start)]
    meaning = [text for key, text in REFUSALS.items() if any(key in line for line in block)]
    return "\n    ".join([*meaning, *block])
