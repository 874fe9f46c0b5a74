"""The paper's studies: which ordinary federated runs (arms) each needs, and the tables and figure made of them.

Within one run, differences pair users through the report's per-node statistics; across runs (same users,
same split) or by history length, through the node stores (simulation/node_results.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.adapters import attach_fresh, trainable_parameters
from client.model_build import resolve_model
from client.model_loading import load_weightless
from common.config import RunConfig
from common.methods import method_name, parse_variant
from common.tasks import TaskSpec, get_task
from simulation.errors import SetupError
from simulation.studies.node_results import (
    history_lengths,
    paired_by_user,
    stored_statistics,
)
from simulation.studies.report import (
    Figure,
    StudyResult,
    Table,
    best_reference_row,
    build_table,
    reference_labels,
    write_study,
)
from simulation.studies.similarity import similarity_inputs, write_similarity


@dataclass(frozen=True)
class Arm:
    """One federated run of a study, in `<study-dir>/<name>/`."""

    name: str
    config: RunConfig


@dataclass(frozen=True)
class Study:
    """A subcommand of `oppu-study`: its arms and what it writes once they all finished."""

    name: str
    help: str
    arms: Callable[[RunConfig, argparse.Namespace], list[Arm]]
    finish: Callable[[RunConfig, dict[str, Path], argparse.Namespace, Path], Path]  # -> the markdown written
    fixed: frozenset[str] = frozenset()  # RunConfig fields the arms set (no flags for them)
    defaults: dict[str, Any] = field(default_factory=dict)
    flags: Callable[[argparse.ArgumentParser], None] | None = None


def _tables(analyse: Callable[[TaskSpec, RunConfig, dict[str, Path], argparse.Namespace], StudyResult]) -> Callable:
    """A finish step that writes the analysis as <name>.json/.md/.png."""

    def finish(cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace, study_dir: Path) -> Path:
        task = get_task(cfg.task)
        result = analyse(task, cfg, runs, args)
        write_study(study_dir, task, result)
        return study_dir / f"{result.name}.md"

    return finish


def _arm_dirs(runs: dict[str, Path]) -> dict[str, str]:
    return {arm: str(path) for arm, path in runs.items()}


def _metrics(table: Table) -> dict[str, float]:
    return {row.label: row.metric for row in table.rows}


def _shared_references_note(arm: str) -> str:
    return (f"Reference rows (`ref-*`, non-LLM) are the `{arm}` run's: they read only the user's history, which every "
            "arm holds alike.")


# retrieval depth (paper Figure 5): one run, every depth as its own method


def _depths(text: str) -> list[int]:
    depths = sorted({int(k) for k in text.split(",") if k.strip()})
    if not depths or depths[0] < 1:
        raise argparse.ArgumentTypeError(f"give depths >= 1 separated by commas, e.g. 1,2,4; got {text!r}")
    return depths


def _depth_methods(depths: list[int]) -> list[str]:
    return ["base", *(method_name(False, k) for k in depths), "oppu", *(method_name(True, k) for k in depths)]


def _depth_arms(cfg: RunConfig, args: argparse.Namespace) -> list[Arm]:
    return [Arm("run", dataclasses.replace(cfg, methods=",".join(_depth_methods(args.depths))))]


def _depth_analysis(task: TaskSpec, cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace) -> StudyResult:
    report = json.loads((runs["run"] / "report.json").read_text())
    per_user = list(report["per_user"].values())
    methods = _depth_methods(args.depths)
    against_base = build_table(task, "Against the non-personalized model", per_user,
                               [("base", None), *((m, "base") for m in methods[1:])],
                               references=reference_labels(per_user))
    adapter_gain = build_table(task, "Personal adapter at each depth (RAG+OPPU vs RAG)", per_user,
                               [("oppu", "base"), *((method_name(True, k), method_name(False, k)) for k in args.depths)])
    metric = _metrics(against_base)
    figure = Figure("lines", [0, *args.depths], {
        "RAG": [metric["base"], *(metric[method_name(False, k)] for k in args.depths)],
        "RAG+OPPU": [metric["oppu"], *(metric[method_name(True, k)] for k in args.depths)],
    }, "retrieved history items k (k=0: base / OPPU)")
    return StudyResult("retrieval-depth", "Retrieval depth", task.name, [against_base, adapter_gain], figure,
                       _arm_dirs(runs))


# PEFT types (paper Figure 7): one run per kind of personal module


PEFT_ARMS = ("lora", "ia3", "prompt")


def peft_sizes(cfg: RunConfig, cache_dir: Path | None) -> dict[str, dict[str, float]]:
    """Trainable parameters of each personal PEFT kind on the base model, computed locally (nothing is sent)."""
    model_dir = resolve_model(cfg.model, cache_dir)
    sizes = {}
    for kind in PEFT_ARMS:
        model = attach_fresh(load_weightless(model_dir), dataclasses.replace(cfg, peft=kind).peft_settings(), "size", 0)
        trainable, share = trainable_parameters(model)
        sizes[kind] = {"trainable parameters": int(trainable), "trainable share": share}
    return sizes


def _peft_arms(cfg: RunConfig, args: argparse.Namespace) -> list[Arm]:
    return [Arm(kind, dataclasses.replace(cfg, peft=kind, methods="base,oppu")) for kind in PEFT_ARMS]


def _peft_analysis(task: TaskSpec, cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace) -> StudyResult:
    per_user = paired_by_user(runs)
    sizes = peft_sizes(cfg, args.cache_dir)
    extra = {f"{kind}/oppu": sizes[kind] for kind in PEFT_ARMS}
    gain = build_table(task, "Personal module against the non-personalized model, per PEFT type", per_user,
                       [row for kind in PEFT_ARMS for row in ((f"{kind}/base", None), (f"{kind}/oppu", f"{kind}/base"))],
                       extra, references=reference_labels(per_user, PEFT_ARMS[0]))
    versus_lora = build_table(task, "Against LoRA", per_user,
                              [("lora/oppu", None), ("ia3/oppu", "lora/oppu"), ("prompt/oppu", "lora/oppu")], extra)
    metric = _metrics(gain)
    figure = Figure("bars", [f"{kind} ({sizes[kind]['trainable share']:.3%})" for kind in PEFT_ARMS], {
        "base": [metric[f"{kind}/base"] for kind in PEFT_ARMS],
        "oppu": [metric[f"{kind}/oppu"] for kind in PEFT_ARMS],
    }, "personal PEFT type (trainable share of parameters)")
    return StudyResult("peft-types", "PEFT types", task.name, [gain, versus_lora], figure, _arm_dirs(runs),
                       [_shared_references_note(PEFT_ARMS[0])])


# activity levels (paper Figure 3): one run, users grouped by history length


def _activity_arms(cfg: RunConfig, args: argparse.Namespace) -> list[Arm]:
    if args.buckets < 1:
        raise SetupError(f"activity: --buckets must be >= 1, got {args.buckets}")
    return [Arm("run", cfg)]


def _activity_analysis(task: TaskSpec, cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace) -> StudyResult:
    run_dir = runs["run"]
    stats = stored_statistics(run_dir)
    lengths = history_lengths(run_dir)
    users = sorted(stats, key=lambda user: (lengths[user], user))
    methods = cfg.method_names()
    reference = "base" if "base" in methods else methods[0]
    rows = [(reference, None), *((m, reference) for m in methods if m != reference)]
    tables, labels = [], []
    for bucket in (list(b) for b in np.array_split(users, min(args.buckets, len(users)))):
        label = f"{lengths[bucket[0]]}–{lengths[bucket[-1]]} items"
        in_bucket = [stats[u] for u in bucket]
        tables.append(build_table(task, f"History of {label} ({len(bucket)} users)", in_bucket, rows,
                                  references=reference_labels(in_bucket)))
        labels.append(label)
    series: dict[str, list[float | None]] = {m: [_metrics(t)[m] for t in tables] for m in methods}
    best = [best_reference_row(t) for t in tables]
    if any(best):  # one bar per bucket: its own best reference row, named when every bucket has the same
        name = f"{best[0]} (best reference)" if len(set(best)) == 1 else "best reference row"
        series[name] = [_metrics(t)[b] if b else None for t, b in zip(tables, best)]
    figure = Figure("bars", labels, series,
                    "history length of the user (equal-count buckets of test users)")
    notes = [("History lengths are read from the node stores (clients/<user>/data.json) on the machine that holds "
              "them; test users are the users with the longest histories, so the buckets span that upper range.")]
    return StudyResult("activity", "Activity levels", task.name, tables, figure, _arm_dirs(runs), notes)


# behaviour shift (paper Table 3): full history vs each user's least relevant items only


SHIFT_METHODS = ("base", "rag-k1", "oppu", "oppu+rag-k1")
SHIFT_ARMS = {"full": "recent", "least-relevant": "least-relevant"}


def _shift_arms(cfg: RunConfig, args: argparse.Namespace) -> list[Arm]:
    return [Arm(arm, dataclasses.replace(cfg, methods=",".join(SHIFT_METHODS), max_history=0, history_selection=selection))
            for arm, selection in SHIFT_ARMS.items()]


def _shift_analysis(task: TaskSpec, cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace) -> StudyResult:
    per_user = paired_by_user(runs)
    shift = build_table(task, "Least relevant history against full history, per method", per_user,
                        [(f"least-relevant/{m}", f"full/{m}") for m in SHIFT_METHODS])
    against_base = [  # one table per arm: its reference rows read the history that arm keeps
        build_table(task, f"Against the non-personalized model, {arm} history", per_user,
                    [(f"{arm}/base", None), *((f"{arm}/{m}", f"{arm}/base") for m in SHIFT_METHODS[1:])],
                    references=reference_labels(per_user, arm))
        for arm in SHIFT_ARMS
    ]
    metric = {label: value for table in against_base for label, value in _metrics(table).items()}
    figure = Figure("bars", list(SHIFT_METHODS), {arm: [metric[f"{arm}/{m}"] for m in SHIFT_METHODS] for arm in SHIFT_ARMS},
                    "method")
    notes = [(f"least-relevant: the {cfg.selection_items} history items least similar to the user's queries "
              "(MiniLM embeddings, on the device); retrieval and personal training see only those. Both arms use "
              "--max-history 0 (all selected items).")]
    return StudyResult("behaviour-shift", "Behaviour shift", task.name, [shift, *against_base], figure, _arm_dirs(runs),
                       notes)


# history format (paper Table 4): what a history item teaches the personal adapter


FORMATS = ("both", "input", "output")


def _format_arms(cfg: RunConfig, args: argparse.Namespace) -> list[Arm]:
    return [Arm(f, dataclasses.replace(cfg, methods="base,oppu", history_format=f)) for f in FORMATS]


def _format_analysis(task: TaskSpec, cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace) -> StudyResult:
    per_user = paired_by_user(runs)
    gain = build_table(task, "Personal adapter against the non-personalized model, per history format", per_user,
                       [row for f in FORMATS for row in ((f"{f}/base", None), (f"{f}/oppu", f"{f}/base"))],
                       references=reference_labels(per_user, FORMATS[0]))
    versus_both = build_table(task, "Against input and output together", per_user,
                              [("both/oppu", None), ("input/oppu", "both/oppu"), ("output/oppu", "both/oppu")])
    metric = _metrics(gain)
    figure = Figure("bars", list(FORMATS), {m: [metric[f"{f}/{m}"] for f in FORMATS] for m in ("base", "oppu")},
                    "history items used for personal training")
    return StudyResult("history-format", "History format", task.name, [gain, versus_both], figure, _arm_dirs(runs),
                       [_shared_references_note(FORMATS[0])])


# adapter similarity (paper appendix G): read from the node stores of an existing or a fresh run


def _variant_method(variant: str) -> str:
    """The method whose personal adapter is `variant` (k0 -> oppu, k2 -> oppu+rag-k2, k0-pag -> oppu+pag)."""
    try:
        return parse_variant(variant).name
    except ValueError as error:
        raise SetupError(f"similarity: --variant: {error}") from None


def _similarity_arms(cfg: RunConfig, args: argparse.Namespace) -> list[Arm]:
    method = _variant_method(args.variant)
    if args.run:  # an existing run: its adapters are checked before anything is written
        try:
            similarity_inputs(args.run, args.variant)
        except ValueError as error:
            raise SetupError(f"similarity: {error}") from None
        return []
    return [Arm("run", dataclasses.replace(cfg, methods=method))]


def _similarity_finish(cfg: RunConfig, runs: dict[str, Path], args: argparse.Namespace, study_dir: Path) -> Path:
    out_dir = args.study_dir or args.run or study_dir
    write_similarity(args.run or runs["run"], out_dir, args.variant)
    return out_dir / "similarity.md"


def _similarity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, nargs="?", default=None,
                        help="an existing run directory (its node stores); without it, a fresh run is made")
    parser.add_argument("--variant", default="k0", help="which personal adapter: k0 (oppu), k1 (oppu+rag-k1), ...")


STUDIES = {study.name: study for study in (
    Study("retrieval-depth", "RAG-only and RAG+OPPU at retrieval depths k (paper Figure 5): one run",
          _depth_arms, _tables(_depth_analysis), frozenset({"methods"}),
          flags=lambda p: p.add_argument("--depths", type=_depths, default=[1, 2, 4],
                                         help="retrieval depths besides k=0, comma-separated")),
    Study("peft-types", "LoRA, (IA)3 and prompt tuning as the personal module (paper Figure 7): three runs",
          _peft_arms, _tables(_peft_analysis), frozenset({"methods", "peft"})),
    Study("activity", "Methods per history-length bucket of users (paper Figure 3): one run",
          _activity_arms, _tables(_activity_analysis), defaults={"methods": "base,rag,oppu,oppu+rag"},
          flags=lambda p: p.add_argument("--buckets", type=int, default=3, help="equal-count history-length buckets")),
    Study("behaviour-shift", "Full history vs the least relevant items only (paper Table 3): two runs",
          _shift_arms, _tables(_shift_analysis), frozenset({"methods", "max_history", "history_selection"})),
    Study("history-format", "Personal training on history input only / output only / both (paper Table 4): three runs",
          _format_arms, _tables(_format_analysis), frozenset({"methods", "history_format"})),
    Study("similarity", "Pairwise cosine similarity of users' personal adapters (paper appendix G)",
          _similarity_arms, _similarity_finish, frozenset({"methods"}), flags=_similarity_flags),
)}
