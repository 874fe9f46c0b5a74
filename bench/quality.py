"""Quality beside the simplest baselines, in one run: every method and reference row, paired CIs, rules, cost.

    python -m bench.quality --num-clients 20                      # validation split (the default here)
    python -m bench.quality --num-clients 100 --split test        # the final check, after choices are made
    python -m bench.quality --num-clients 20 -- --personal-lr 2e-3   # flags after -- go to flower-simulation

It runs `flower-simulation` (run directory runs/bench-quality-<time> unless given) and prints:
- each method and non-LLM reference row (`ref-*`): primary metric, difference to `base` and to the best
  reference row with paired per-user bootstrap 95% CIs (what report.md shows);
- for label tasks, every decision rule on the same adapters: the label probabilities each device kept in its
  store are re-read here (this bench runs where the node stores are, like the adapter-similarity study); the
  median column is the plain median, also for the shared model's methods that answer at a calibrated quantile;
- rating tasks: each method's expected rating (mean, spread, correlation with the gold), what it knows beyond
  its decision;
- MovieLens: the no-LLM ceiling rows (bench.item_knowledge's *population* and *level + item*, with movie offsets
  from the other users in the run's node stores) beside ref-recent-mean, and the share of that reachable gain
  each method took;
- cost: CPU seconds per test user (training, profile, evaluation) and the primary-metric gain over `base`
  per CPU second.
Tune with `--split validation` (each test user's latest history items before the queries); the test
queries are for the final figures only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import expected_spread, finish
from bench.item_knowledge import ceiling_predictions, item_offsets
from client.data import load_oppu
from client.history import validation_view
from client.references import RECENT_MEAN
from common.bootstrap import paired_difference
from common.config import RunConfig
from common.metrics import (
    DECISION_RULES,
    Statistics,
    combine,
    decide,
    expected_rating,
    finalize,
    primary_metric,
    statistics,
)
from common.store import read_json
from common.tasks import get_task
from server.report import best_reference


def kept_probabilities(run_dir: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(method, one test user's predictions with label probabilities) for each test user's node store."""
    for node in json.loads((run_dir / "nodes.json").read_text()):
        if node["role"] != "test":
            continue
        kept = read_json(run_dir / "clients" / node["user"] / "predictions.json") or {}
        for method, rows in kept.items():
            if rows and "probabilities" in rows[0]:
                yield method, rows


def rule_statistics(task, run_dir: Path, rules: list[str]) -> dict[str, dict[str, list]]:
    """{method: {rule: [per-user statistics]}} recomputed from the label probabilities kept in node stores."""
    by_method: dict[str, dict[str, list]] = {}
    for method, rows in kept_probabilities(run_dir):
        golds = [r["gold"] for r in rows]
        for rule in rules:
            predictions = [decide(task.labels, r["probabilities"], rule) for r in rows]  # type: ignore[arg-type]
            by_method.setdefault(method, {}).setdefault(rule, []).append(statistics(task, predictions, golds))
    return by_method


def expected_ratings(task, run_dir: Path) -> dict[str, dict[str, float | None]]:
    """{method: mean, sd and correlation with the gold of its expected rating over every question}: what a
    method knows beyond its decision (a base whose expected rating follows the item but spreads little answers
    the same rating everywhere under any rule)."""
    pairs: dict[str, tuple[list[float], list[float]]] = {}
    for method, rows in kept_probabilities(run_dir):
        expected, golds = pairs.setdefault(method, ([], []))
        expected += [expected_rating(task.labels, r["probabilities"]) for r in rows]
        golds += [float(r["gold"]) for r in rows]
    return {method: expected_spread(expected, golds) for method, (expected, golds) in pairs.items()}


def item_ceiling(task, run_dir: Path, config: dict[str, Any]) -> dict[str, dict[str, Statistics]]:
    """{user: {row: statistics}} of the no-LLM ceiling rows (bench.item_knowledge) on each test user's evaluated
    questions: `ceiling:population` (mean rating + the movie's offset) and `ceiling:level+item` (the user's recent
    mean + the movie's offset), with offsets learned from the history items of every other user in the run's node
    stores (leave one out; never a query's gold). Read here, where the stores are: no node sends any of it."""
    cfg = RunConfig.from_record(config)
    nodes = json.loads((run_dir / "nodes.json").read_text())
    users = {n["user"]: load_oppu(run_dir / "clients" / n["user"] / "data.json", task.name)[0] for n in nodes}
    rows = {}
    for node in (n for n in nodes if n["role"] == "test"):
        user = users[node["user"]]
        seen = validation_view(user, task, cfg.validation_items) if cfg.split == "validation" else user
        mean, offsets = item_offsets([u for name, u in users.items() if name != user.user_id], 0)
        golds = [q.gold for q in seen.queries]
        rows[user.user_id] = {f"ceiling:{name}": statistics(task, [f"{a:g}" for a in answers], golds)
                              for name, answers in ceiling_predictions(seen, mean, offsets).items()}
    return rows


def ceiling_table(task, run_dir: Path, report: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The ceiling rows beside ref-recent-mean, and how much of the gain they reach each method took (paired CIs)."""
    lead, _ = primary_metric(task)
    ceiling = item_ceiling(task, run_dir, report["config"])
    per_user = [{**(read_json(run_dir / "clients" / user / "result.json") or {}).get("statistics", {}), **rows}
                for user, rows in ceiling.items()]
    names = [*report["methods"], RECENT_MEAN, *next(iter(ceiling.values()))]
    value = {name: finalize(task, combine(u[name] for u in per_user if name in u))[lead] for name in names}
    reachable = value[RECENT_MEAN] - value["ceiling:level+item"]
    table = ["", f"No-LLM ceiling from the run's {len(json.loads((run_dir / 'nodes.json').read_text())) - 1} other "
             "users' histories (leave one out): how much of the gain it reaches each method took",
             f"| row | {lead} | vs {RECENT_MEAN} (95% CI) | share of the reachable gain |", "|---|---|---|---|"]
    results = {}
    for name in names:
        if name == RECENT_MEAN:
            continue
        d = paired_difference(task, per_user, name, RECENT_MEAN)
        share = (value[RECENT_MEAN] - value[name]) / reachable if reachable else float("nan")
        results[name] = {lead: value[name], "vs_recent_mean": [d.difference, d.low, d.high], "share": share}
        table.append(f"| {name} | {value[name]:.4f} | {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | "
                     f"{share:.0%} |")
    return table, results


def cpu_seconds_per_user(run_dir: Path) -> float:
    """Mean over test users of the seconds their device spent (each node's own timings, one core each)."""
    nodes = json.loads((run_dir / "nodes.json").read_text())
    totals = [sum((read_json(run_dir / "clients" / n["user"] / "result.json") or {}).get("timings", {}).values())
              for n in nodes if n["role"] == "test"]
    return sum(totals) / len(totals) if totals else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=20, help="test users (flower-simulation --num-clients)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="what test users are evaluated on (flower-simulation --split)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/bench-quality-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("simulation_flags", nargs="*", help="more flower-simulation flags, after --")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path("runs") / f"bench-quality-{datetime.now():%Y%m%d-%H%M%S}"
    command = [str(Path(sys.executable).with_name("flower-simulation")), "--num-clients", str(args.num_clients),
               "--split", args.split, "--run-dir", str(run_dir), *args.simulation_flags]
    start = time.perf_counter()
    status = subprocess.run(command).returncode
    wall = time.perf_counter() - start
    report = read_json(run_dir / "report.json")
    if status != 0 or report is None:
        raise SystemExit(f"bench.quality: {' '.join(command)} exited {status}; see {run_dir}")
    task = get_task(report["config"]["task"])
    lead, higher_better = primary_metric(task)
    rows = {**report["methods"], **report["references"]}
    best = best_reference(task, report["references"])
    compared = {(c["method"], c["reference"]): c for c in report["comparisons"]}

    def cell(method: str, other: str | None) -> str:
        c = compared.get((method, other)) if other else None
        return f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" if c else "–"

    calibration = report.get("calibration")
    shared = (f" (base, rag, pag: at quantile {calibration['answer_quantile']:.2f}, picked on the test users' "
              "validation items)" if calibration else "")
    table = [
        f"{task.name}, split {args.split}, {report['users']['evaluated']} users, decision rule "
        f"{report['decision_rule']}{shared}; {lead} ({'higher' if higher_better else 'lower'} is better)",
        "", f"| row | {lead} | vs base (95% CI) | vs {best} (95% CI) |", "|---|---|---|---|",
    ]
    for name, row in rows.items():
        table.append(f"| {name} | {row['metrics'].get(lead, float('nan')):.4f} | {cell(name, 'base')} | "
                     f"{cell(name, best) if name != best else '–'} |")
    results: dict[str, Any] = {"command": command, "wall_seconds": wall, "split": args.split, "best_reference": best,
                               "rows": rows, "comparisons": report["comparisons"]}
    if task.labels:
        rules = [r for r in DECISION_RULES if r != "auto" and (task.metric == "regression" or r == "argmax")]
        by_rule = rule_statistics(task, run_dir, rules)
        table += ["", "| method | " + " | ".join(f"{lead} ({r})" for r in rules) + " |", "|---|" + "---|" * len(rules)]
        results["rules"] = {}
        for method, per_rule in by_rule.items():
            values = {rule: finalize(task, combine(users))[lead] for rule, users in per_rule.items()}
            results["rules"][method] = values
            table.append(f"| {method} | " + " | ".join(f"{values[r]:.4f}" for r in rules) + " |")
    if task.metric == "regression":
        results["expected_rating"] = expected_ratings(task, run_dir)
        table += ["", "| method | expected rating: mean | sd | corr. with gold |", "|---|---|---|---|"]
        table += [f"| {method} | {e['mean']:.2f} | {e['sd']:.3f} | "
                  f"{'n/a' if e['corr'] is None else format(e['corr'], '+.3f')} |"
                  for method, e in results["expected_rating"].items()]
    if task.name == "MovieLens":
        lines, results["ceiling"] = ceiling_table(task, run_dir, report)
        table += lines
    seconds = cpu_seconds_per_user(run_dir)
    base = rows.get("base", {}).get("metrics", {}).get(lead)
    table += ["", f"CPU seconds per test user: {seconds:.1f}; wall {wall / 60:.1f} min"]
    results["cpu_seconds_per_user"] = seconds
    if base is not None and seconds:
        gains = {m: (r["metrics"][lead] - base) * (1 if higher_better else -1) / seconds
                 for m, r in report["methods"].items() if m != "base" and lead in r["metrics"]}
        results["gain_over_base_per_cpu_second"] = gains
        table += [f"{lead} gain over base per CPU second of a user: "
                  + ", ".join(f"{m} {g:+.5f}" for m, g in gains.items())]
    return finish(args, results, table)


if __name__ == "__main__":
    main()
