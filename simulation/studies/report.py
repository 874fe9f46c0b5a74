"""A study's tables (metric per row, bootstrap CI of each difference) and figure, as <name>.json/.md/.png.

A table is built from per-user statistics keyed by label ("oppu", "ia3/oppu", ...): a row's metric is
combined exactly over the users that have the label, its difference is paired over the users that have
both the label and the row's reference (server/bootstrap.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.bootstrap import Difference, paired_difference
from common.metrics import Statistics, combine, finalize, primary_metric
from common.store import atomic_write_json, atomic_write_text
from common.tasks import TaskSpec
from server.report import write_png


@dataclass(frozen=True)
class Row:
    label: str
    metric: float
    users: int
    difference: Difference | None = None  # against the row's reference, if it has one
    extra: dict[str, Any] = field(default_factory=dict)  # study-specific columns (e.g. trainable parameters)


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


def build_table(
    task: TaskSpec,
    title: str,
    per_user: Sequence[Mapping[str, Statistics]],
    rows: Sequence[tuple[str, str | None]],
    extra: Mapping[str, dict[str, Any]] | None = None,
) -> Table:
    """Rows given as (label, reference label or None); `extra` adds columns per label."""
    lead, _ = primary_metric(task)
    built = []
    for label, reference in rows:
        users = [u[label] for u in per_user if label in u]
        if not users:
            raise ValueError(f"table {title!r}: no user has statistics for {label!r}")
        built.append(Row(
            label, finalize(task, combine(users))[lead], len(users),
            paired_difference(task, per_user, label, reference) if reference else None,
            dict((extra or {}).get(label, {})),
        ))
    return Table(title, built)


def _markdown(task: TaskSpec, result: StudyResult) -> str:
    lead, higher_better = primary_metric(task)
    lines = [f"# {result.title} ({task.name}, {lead} {'↑' if higher_better else '↓'})", ""]
    for table in result.tables:
        extra = list(dict.fromkeys(key for row in table.rows for key in row.extra))
        lines += [f"## {table.title}", "",
                  f"| method | {lead} | users | difference | vs | 95% CI | " + "".join(f"{k} | " for k in extra),
                  "|---|---:|---:|---:|---|---|" + "---:|" * len(extra)]
        for row in table.rows:
            d = row.difference
            compared = (f"{d.difference:+.4f} | {d.reference} | [{d.low:+.4f}, {d.high:+.4f}]"
                        if d else "– | – | –")
            cells = "".join(f"{_cell(row.extra.get(k, '–'))} | " for k in extra)
            lines.append(f"| {row.label} | {row.metric:.4f} | {row.users} | {compared} | {cells}")
        lines.append("")
    lines.append("Differences are label minus reference over the same users; 95% CIs from a paired bootstrap "
                 "over users (1000 resamples, metric recomputed from summed statistics).")
    lines += [f"- {note}" for note in result.notes]
    lines += ["", "Runs: " + ", ".join(f"`{arm}`: {path}" for arm, path in result.arms.items()), ""]
    return "\n".join(lines)


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
