"""A study's tables (metric per row, bootstrap CI of each difference) and figure, as <name>.json/.md/.png.

A table is built from per-user statistics keyed by label ("oppu", "ia3/oppu", ...): a row's metric is
combined exactly over the users that have the label, its difference is paired over the users that have
both the label and the row's reference (common/bootstrap.py). A table given the run's reference rows (the
non-LLM baselines, `ref-*`) lists them too, and every other row gets a second difference: against the best of
them over the table's users, the bar a method must clear (as report.md does for a run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from client.references import PREFIX as REFERENCE_PREFIX
from common.bootstrap import Difference, paired_difference
from common.metrics import Statistics, combine, finalize, primary_metric
from common.store import atomic_write_json, atomic_write_text
from common.tasks import TaskSpec
from server.report import best_reference, write_png


@dataclass(frozen=True)
class Row:
    label: str
    metric: float
    users: int
    difference: Difference | None = None  # against the row's reference, if it has one
    extra: dict[str, Any] = field(default_factory=dict)  # study-specific columns (e.g. trainable parameters)
    baseline: Difference | None = None  # against the table's best reference row, if the table has them


@dataclass(frozen=True)
class Table:
    title: str
    rows: list[Row]


@dataclass(frozen=True)
class Figure:
    """Bars: one group per x, one bar per series. Lines: one line per series over numeric x."""

    kind: Literal["bars", "lines"]
    x: list[Any]
    series: dict[str, list[float | None]]
    xlabel: str


@dataclass(frozen=True)
class StudyResult:
    name: str
    title: str
    task: str
    tables: list[Table]
    figure: Figure
    arms: dict[str, str]  # arm -> its run directory
    notes: list[str] = field(default_factory=list)


def best_reference_row(table: Table) -> str | None:
    """The table's best reference row: the one its other rows were compared with (None: it has no reference rows)."""
    return next((row.baseline.reference for row in table.rows if row.baseline), None)


def reference_labels(per_user: Sequence[Mapping[str, Statistics]], arm: str | None = None) -> list[str]:
    """The reference rows (`ref-*`) the users' statistics hold: a run's own, or with `arm` those of that arm of a
    study ("<arm>/ref-recent-mean"), in their order in the first user's statistics."""
    prefix = REFERENCE_PREFIX if arm is None else f"{arm}/{REFERENCE_PREFIX}"
    return [label for label in (per_user[0] if per_user else {}) if label.startswith(prefix)]


def build_table(
    task: TaskSpec,
    title: str,
    per_user: Sequence[Mapping[str, Statistics]],
    rows: Sequence[tuple[str, str | None]],
    extra: Mapping[str, dict[str, Any]] | None = None,
    references: Sequence[str] = (),
) -> Table:
    """Rows given as (label, reference label or None); `extra` adds columns per label; `references` (reference-row
    labels) are listed after the rows, and every other row is compared with the best of them."""
    lead, _ = primary_metric(task)
    listed = [*rows, *((label, None) for label in references)]
    measured: dict[str, tuple[float, int]] = {}  # label -> (metric, users)
    for label, _ in listed:
        users = [u[label] for u in per_user if label in u]
        if not users:
            raise ValueError(f"table {title!r}: no user has statistics for {label!r}")
        measured[label] = finalize(task, combine(users))[lead], len(users)
    best = best_reference(task, {label: {"metrics": {lead: measured[label][0]}} for label in references})
    built = []
    for label, reference in listed:
        value, users = measured[label]
        built.append(Row(
            label, value, users,
            paired_difference(task, per_user, label, reference) if reference else None,
            dict((extra or {}).get(label, {})),
            paired_difference(task, per_user, label, best) if best and label not in references else None,
        ))
    return Table(title, built)


def _markdown(task: TaskSpec, result: StudyResult) -> str:
    lead, higher_better = primary_metric(task)
    lines = [f"# {result.title} ({task.name}, {lead} {'↑' if higher_better else '↓'})", ""]
    for table in result.tables:
        extra = list(dict.fromkeys(key for row in table.rows for key in row.extra))
        best = best_reference_row(table)
        lines += [f"## {table.title}", "",
                  f"| method | {lead} | users | difference | vs | 95% CI | "
                  + (f"vs {best} (best reference) | 95% CI | " if best else "") + "".join(f"{k} | " for k in extra),
                  "|---|---:|---:|---:|---|---|" + ("---:|---|" if best else "") + "---:|" * len(extra)]
        for row in table.rows:
            compared = _compared(row.difference, with_reference=True)
            against_best = f"{_compared(row.baseline, with_reference=False)} | " if best else ""
            cells = "".join(f"{_cell(row.extra.get(k, '–'))} | " for k in extra)
            lines.append(f"| {row.label} | {row.metric:.4f} | {row.users} | {compared} | {against_best}{cells}")
        if best:
            lines += ["", f"{best}: the best reference row over these users (reference rows are non-LLM predictors, "
                      "computed on each device from the user's own history and, where the run has one, the "
                      "population's item table)."]
        lines.append("")
    lines.append("Differences are label minus reference over the same users; 95% CIs from a paired bootstrap "
                 "over users (1000 resamples, metric recomputed from summed statistics).")
    lines += [f"- {note}" for note in result.notes]
    lines += ["", "Runs: " + ", ".join(f"`{arm}`: {path}" for arm, path in result.arms.items()), ""]
    return "\n".join(lines)


def _compared(d: Difference | None, with_reference: bool) -> str:
    """A difference as table cells: value, (the reference,) CI; dashes for none."""
    if d is None:
        return "– | – | –" if with_reference else "– | –"
    named = f" | {d.reference}" if with_reference else ""
    return f"{d.difference:+.4f}{named} | [{d.low:+.4f}, {d.high:+.4f}]"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plot(task: TaskSpec, result: StudyResult, path: Path) -> None:
    import matplotlib  # here, where the headless backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lead, higher_better = primary_metric(task)
    figure = result.figure
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(figure.x) * max(1, len(figure.series)) / 2 + 2), 3.8))
    if figure.kind == "lines":
        for name, values in figure.series.items():
            points = [(x, v) for x, v in zip(figure.x, values) if v is not None]
            ax.plot([x for x, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xticks(figure.x)
    else:
        width = 0.8 / max(1, len(figure.series))
        positions = np.arange(len(figure.x))
        for i, (name, values) in enumerate(figure.series.items()):
            heights = [np.nan if v is None else v for v in values]
            bars = ax.bar(positions + (i - (len(figure.series) - 1) / 2) * width, heights, width, label=name)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(positions, [str(x) for x in figure.x])
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(f"{lead} ({'higher' if higher_better else 'lower'} is better)")
    ax.set_title(f"{result.title} ({task.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_png(fig, path)


def write_study(out_dir: Path, task: TaskSpec, result: StudyResult) -> None:
    """<name>.json, <name>.md and <name>.png under the study directory."""
    lead, higher_better = primary_metric(task)
    atomic_write_json(out_dir / f"{result.name}.json",
                      {**dataclasses.asdict(result), "metric": lead, "higher_is_better": higher_better})
    atomic_write_text(out_dir / f"{result.name}.md", _markdown(task, result))
    _plot(task, result, out_dir / f"{result.name}.png")
