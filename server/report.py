"""Combine users' statistics exactly and write report.json, report.md (paper Table 2 shape) and plot.png."""

from __future__ import annotations

import dataclasses
import io
import platform
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from client.references import DESCRIPTIONS
from common import protocol as p
from common.bootstrap import paired_difference
from common.metrics import Statistics, combine, finalize, primary_metric
from common.store import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.tasks import TaskSpec


def method_statistics(record: Mapping[str, Any]) -> dict[str, Statistics]:
    """One reply's flat metric record split back into {method: statistics} (one user's view)."""
    by_method: dict[str, Statistics] = {}
    for key, value in record.items():
        parsed = p.split_method_key(key)
        if parsed:
            by_method.setdefault(parsed[0], {})[parsed[1]] = list(value) if isinstance(value, list) else value
    return by_method


def statistics_by_method(replies: Iterable[Mapping[str, Any]]) -> dict[str, list[Statistics]]:
    """Replies regrouped as {method: [per-user statistics]}."""
    by_method: dict[str, list[Statistics]] = {}
    for record in replies:
        for method, stats in method_statistics(record).items():
            by_method.setdefault(method, []).append(stats)
    return by_method


def method_results(task: TaskSpec, replies: Iterable[Mapping[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: final metrics, number of users and of queries."""
    by_method = statistics_by_method(replies)
    results = {}
    for method in methods:
        users = by_method.get(method, [])
        total = combine(users)
        results[method] = {
            "metrics": finalize(task, total) if users else {},
            "users": len(users),
            "queries": int(total.get("n", 0)) if users else 0,
        }
    return results


def versions() -> dict[str, str]:
    """Versions of the pieces that shape results."""
    found = {"python": platform.python_version()}
    for package in ("flwr", "torch", "transformers", "peft", "rank-bm25", "rouge-score"):
        found[package] = version(package)
    return found


def markdown_table(task: TaskSpec, results: Mapping[str, Mapping[str, Any]]) -> str:
    """A table like the paper's Table 2: one row per metric, one column per method."""
    methods = list(results)
    metric_names = list(next((r["metrics"] for r in results.values() if r["metrics"]), {}))
    lead, higher_better = primary_metric(task)
    arrow = {True: "↑", False: "↓"}
    lines = [
        f"| {task.name} | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric in metric_names:
        better = higher_better if metric == lead else metric not in ("mae", "rmse")
        cells = [f"{results[m]['metrics'][metric]:.4f}" if metric in results[m]["metrics"] else "–" for m in methods]
        lines.append(f"| {metric} {arrow[better]} | " + " | ".join(cells) + " |")
    lines.append("| users | " + " | ".join(str(results[m]["users"]) for m in methods) + " |")
    lines.append("| queries | " + " | ".join(str(results[m]["queries"]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def best_reference(task: TaskSpec, references: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The reference row with the best primary metric (the bar a method must clear)."""
    lead, higher_better = primary_metric(task)
    scored = {name: r["metrics"][lead] for name, r in references.items() if lead in r["metrics"]}
    if not scored:
        return None
    sign = -1 if higher_better else 1
    return min(scored, key=lambda name: (sign * scored[name], name))  # ties: the first name, on any machine


def comparisons(
    task: TaskSpec, per_user: Mapping[str, Mapping[str, Statistics]], methods: list[str], references: list[str]
) -> list[dict[str, Any]]:
    """Each method against `base` and against every reference row: the primary-metric difference over the
    same users with its paired per-user bootstrap 95% CI."""
    users = list(per_user.values())
    rows = []
    for method in methods:
        for other in (["base"] if method != "base" and "base" in methods else []) + references:
            if any(u.get(method, {}).get("n") and u.get(other, {}).get("n") for u in users):
                rows.append(dataclasses.asdict(paired_difference(task, users, method, other)))
    return rows


def _comparison_lines(task: TaskSpec, report: Mapping[str, Any]) -> str:
    lead, higher_better = primary_metric(task)
    best = best_reference(task, report["references"])
    shown = [c for c in report["comparisons"] if c["reference"] in ("base", best)]
    if not shown:
        return ""
    lines = [
        f"\n{lead} difference (method minus the other; {'higher' if higher_better else 'lower'} is better), "
        "paired per-user bootstrap 95% CI over users:\n",
        "| method | vs | difference | 95% CI | users |", "|---|---|---|---|---|",
    ]
    for c in shown:
        better = c["low"] > 0 if higher_better else c["high"] < 0
        worse = c["high"] < 0 if higher_better else c["low"] > 0
        verdict = " (better)" if better else " (worse)" if worse else ""
        lines.append(f"| {c['method']} | {c['reference']} | {c['difference']:+.4f}{verdict} | "
                     f"[{c['low']:+.4f}, {c['high']:+.4f}] | {c['users']} |")
    return "\n".join(lines) + "\n"


def plot(task: TaskSpec, results: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Bar chart of the primary metric per method (matplotlib is imported here, where its headless backend is
    chosen before pyplot loads, and only by what plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lead, higher_better = primary_metric(task)
    methods = [m for m in results if lead in results[m]["metrics"]]
    values = [results[m]["metrics"][lead] for m in methods]
    fig, ax = plt.subplots(figsize=(1.4 * max(3, len(methods)), 3.6))
    bars = ax.bar(methods, values, color=["#999999" if "oppu" not in m else "#2a7ab9" for m in methods])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel(f"{lead} ({'higher' if higher_better else 'lower'} is better)")
    ax.set_title(f"{task.name}: {task.description}")
    fig.autofmt_xdate(rotation=20)
    fig.tight_layout()
    write_png(fig, path)


def write_png(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _task_adaptation_line(adaptation: Mapping[str, Any]) -> str:
    """How many training-user updates the task adapter averages, and which rounds lost some."""
    sampled = sum(adaptation.get("sampled_updates", {}).values())
    if not sampled:
        return ""
    failed = {r: n for r, n in adaptation["failed_updates"].items() if n}
    text = (f"Task adaptation: {adaptation['rounds']} FedAvg round(s)"
            + (" under secure aggregation (SecAgg+)" if adaptation.get("secure_aggregation") else "")
            + (f", reused from the run in {adaptation['copied_from']}" if adaptation.get("copied_from") else "") + "; ")
    if not failed:
        return text + f"all {sampled} training-user updates averaged.\n\n"
    return text + (f"**{sum(failed.values())} of {sampled} training-user updates failed** ("
                   + ", ".join(f"round {r}: {n}" for r, n in failed.items())
                   + "); the task adapter lacks them.\n\n")


def _privacy_line(dp: Mapping[str, Any] | None) -> str:
    if not dp:
        return ""
    mode = dp.get("mode", "server-side")  # (a report written before the modes had only the server's)
    if mode == "client-side":
        return (f"\nTask adaptation with client-side DP (Flower's LocalDpMod, noise added on each device): "
                f"epsilon {dp['epsilon_per_update']:.3g} per update, clipping norm {dp['clipping_norm']}: "
                f"(epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.0e}) per user after {dp['releases']} "
                f"update(s), {dp['accounting']}.\n")
    where = ("the server adds the noise" if mode == "server-side"
             else "each device adds its share of the noise before SecAgg+ masks its update")
    return (f"\nTask adaptation with client-level DP ({mode}: {where}): noise multiplier {dp['noise_multiplier']}, "
            f"clipping norm {dp['clipping_norm']}: (epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.0e}) after "
            f"{dp['releases']} release(s), {dp['accounting']} accounting.\n")


def _item_privacy_line(record: Mapping[str, Any] | None) -> str:
    dp = (record or {}).get("dp")
    if not dp:
        return ""
    return (f"\nItem table with user-level DP (--item-dp-epsilon: each training user's table scaled to L2 norm "
            f"{dp['clip']:g}, each device adds its share of the noise before SecAgg+ masks it): noise std "
            f"{dp['noise_std']:.3g} per sum, (epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.0e}) for its one "
            f"release; {record['items']} items kept.\n")


def _split_text(config: Mapping[str, Any]) -> str:
    if config.get("split") == "validation":
        return (f"**validation** (each test user's {config['validation-items']} latest history items, unseen by "
                "personal training; the test queries were not read)")
    return "the test queries"


def _decision_line(report: Mapping[str, Any]) -> str:
    rule = report.get("decision_rule")
    if not rule:
        return ""
    how = {"median": "the median of the model's label distribution (minimises MAE)",
           "mean": "the mean of the model's label distribution (minimises squared error)",
           "argmax": "the most likely label (argmax, as the paper)"}[rule]
    calibration = report.get("calibration")
    shared = ""
    if calibration:
        errors = calibration["mae_by_quantile"]
        shared = (f" The methods without a personal adapter answer at quantile {calibration['answer_quantile']:.2f} "
                  f"of it instead, picked on {calibration['users']} test users' {calibration['items']} validation "
                  f"items (the latest before their questions; MAE there {min(errors.values()):.3f}, at the median "
                  f"{errors['0.50']:.3f}).")
    return f"Answers read from label probabilities by decision rule `{rule}`: {how}.{shared}\n\n"


def _references_line(report: Mapping[str, Any]) -> str:
    if not report["references"]:
        return ""
    constant = report.get("constant_answer")
    return ("\nReference rows (`ref-*`, no LLM; computed on each device from the user's own history, only their "
            "statistics leave it): " + ", ".join(f"`{name}` {DESCRIPTIONS[name]}" for name in report["references"])
            + (f"; the best constant is {constant!r}" if constant is not None else "") + ".\n\n")


def unevaluated_test_users(report: Mapping[str, Any], expected: int) -> str | None:
    """Why not every one of the `expected` test users was evaluated (the first errors), or None."""
    users = report["users"]
    if not users["failed"] and users["evaluated"] >= expected:
        return None
    return (f"{users['failed']} test user(s) failed, {users['evaluated']} of {expected} evaluated:\n  "
            + "\n  ".join(report["errors"][:10]))


def missing_updates(report: Mapping[str, Any]) -> str | None:
    """How many training users' task-adaptation updates failed, over every round (Flower itself exits 0 after them),
    or None."""
    failed = sum(report["task_adaptation"]["failed_updates"].values())
    return f"{failed} training-user update(s) failed, so the task adapter lacks them" if failed else None


def write_report(run_dir: Path, task: TaskSpec, report: dict[str, Any]) -> None:
    """report.json, report.md and plot.png under the run directory."""
    atomic_write_json(run_dir / "report.json", report)
    results = {**report["methods"], **report["references"]}
    summary = (
        f"# OPPU-FL report: {task.name} ({task.description})\n\n"
        f"Base model `{report['model']['name']}` (sha256 {report['model']['sha256'][:12]}…), "
        f"{report['users']['evaluated']} of {report['users']['test']} test users evaluated, "
        f"{report['users']['failed']} failed. Evaluated on: {_split_text(report['config'])}.\n\n"
        + _task_adaptation_line(report["task_adaptation"]) + _decision_line(report) + markdown_table(task, results)
        + _references_line(report) + _comparison_lines(task, report)
        + _privacy_line(report["task_adaptation"].get("differential_privacy"))
        + _item_privacy_line(report.get("item_statistics"))
        + "\nTimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()) + "\n"
    )
    atomic_write_text(run_dir / "report.md", summary)
    plot(task, results, run_dir / "plot.png")
