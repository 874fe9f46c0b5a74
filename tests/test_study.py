"""Studies: the paired per-user bootstrap, and whole studies on Flower's simulation engine with the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.bootstrap import paired_difference
from common.metrics import combine, finalize
from common.tasks import get_task
from simulation.flags import run_config_of
from simulation.studies.arms import STUDIES
from simulation.studies.cli import build_parser
from simulation.studies.cli import main as study_main
from simulation.studies.node_results import history_lengths, stored_statistics

RATING = get_task("MovieLens")
TAGGING = get_task("LaMP-2M")


def _rating(abs_error: float, n: float = 5.0) -> dict[str, float]:
    return {"n": n, "abs_error": abs_error, "sq_error": abs_error * abs_error / max(n, 1.0)}


def _tagging(correct: float, n: float = 5.0) -> dict:
    labels = len(TAGGING.labels)
    return {"n": n, "correct": correct, "tp": [0.0] * labels, "fp": [0.0] * labels, "fn": [0.0] * labels}


def test_consistent_improvement_has_an_interval_excluding_zero() -> None:
    users = [{"oppu": _rating(4.0 + (i % 3)), "base": _rating(10.0 + (i % 5))} for i in range(30)]
    diff = paired_difference(RATING, users, "oppu", "base")
    expected = (finalize(RATING, combine(u["oppu"] for u in users))["mae"]
                - finalize(RATING, combine(u["base"] for u in users))["mae"])
    assert diff.difference == pytest.approx(expected)
    assert diff.low <= diff.difference <= diff.high < 0
    assert diff.users == 30 and diff.resamples == 1000 and diff.level == 0.95


def test_no_systematic_difference_has_an_interval_including_zero() -> None:
    # half the users gain what the other half lose: the point difference is 0, the spread is large
    users = [{"oppu": _tagging(5.0 if i % 2 else 0.0), "base": _tagging(0.0 if i % 2 else 5.0)} for i in range(40)]
    diff = paired_difference(TAGGING, users, "oppu", "base")
    assert diff.difference == pytest.approx(0.0)
    assert diff.low < 0 < diff.high


def test_only_users_with_both_methods_count_and_the_seed_fixes_the_interval() -> None:
    users = [{"oppu": _rating(float(i)), "base": _rating(2.0 * i)} for i in range(1, 11)]
    users += [{"base": _rating(100.0)}, {"oppu": _rating(0.0), "base": _rating(0.0, n=0.0)}]
    diff = paired_difference(RATING, users, "oppu", "base", seed=3)
    assert diff.users == 10
    assert diff == paired_difference(RATING, users, "oppu", "base", seed=3)
    assert diff.difference == pytest.approx((sum(range(1, 11)) - 2 * sum(range(1, 11))) / 50)
    with pytest.raises(ValueError, match="no user has statistics for both 'pag' and 'base'"):
        paired_difference(RATING, users, "pag", "base")


TINY_STUDY = [
    "--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--personal-lr", "1e-2",
    "--personal-epochs", "4", "--batch-tokens", "256", "--max-history", "0", "--task-history", "4",
]
DEPTH_STUDY = ["retrieval-depth", "--num-clients", "3", "--train-clients", "2", "--rounds", "1", "--depths", "1,2",
               *TINY_STUDY]
DEPTH_METHODS = ["base", "rag-k1", "rag-k2", "oppu", "oppu+rag-k1", "oppu+rag-k2"]
PNG = b"\x89PNG\r\n\x1a\n"


def _check_rows_against_reports(table: dict, reports: dict[str, dict]) -> None:
    """Each row's metric is its report's (a method's or a reference row's); each difference, also the one against
    the best reference row, is the difference of the reports' metrics."""

    def reported(label: str) -> float:
        arm, name = label.split("/") if "/" in label else ("run", label)
        return {**reports[arm]["methods"], **reports[arm]["references"]}[name]["metrics"]["accuracy"]

    for row in table["rows"]:
        assert row["metric"] == pytest.approx(reported(row["label"]), abs=1e-12)
        for d in (row["difference"], row["baseline"]):
            if d is not None:
                assert d["low"] <= d["high"]
                assert d["difference"] == pytest.approx(reported(row["label"]) - reported(d["reference"]), abs=1e-12)


def _references_of(table: dict) -> list[str]:
    return [row["label"] for row in table["rows"] if row["label"].split("/")[-1].startswith("ref-")]


def _check_best_reference(table: dict, arm: str | None = None) -> None:
    """The table lists the run's reference rows (those of `arm` in a study of several runs), and every other row
    is compared with the one of highest accuracy among them."""
    references = _references_of(table)
    prefix = f"{arm}/" if arm else ""
    assert references and all(label.startswith(prefix + "ref-") for label in references)
    metric = {row["label"]: row["metric"] for row in table["rows"]}
    best = max(references, key=lambda label: (metric[label], label))
    assert metric[best] == max(metric[label] for label in references)
    for row in table["rows"]:
        if row["label"] in references:
            assert row["baseline"] is None
        else:
            assert row["baseline"]["reference"] == best


@pytest.fixture(scope="module")
def depth_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One retrieval-depth study: 3 test users, 2 training users, depths 1 and 2."""
    study_dir = tmp_path_factory.mktemp("study") / "depth"
    assert study_main([*DEPTH_STUDY, "--study-dir", str(study_dir)]) == 0
    return study_dir


def test_retrieval_depth_study_in_one_run(depth_study: Path) -> None:
    report = json.loads((depth_study / "run" / "report.json").read_text())
    assert sorted(report["methods"]) == sorted(DEPTH_METHODS) and len(report["per_user"]) == 3
    written = json.loads((depth_study / "retrieval-depth.json").read_text())
    assert written["metric"] == "accuracy" and written["arms"] == {"run": str(depth_study / "run")}
    against_base, adapter_gain = written["tables"]
    assert [row["label"] for row in against_base["rows"]] == DEPTH_METHODS + sorted(report["references"])
    _check_best_reference(against_base)
    assert [row["difference"]["reference"] for row in adapter_gain["rows"]] == ["base", "rag-k1", "rag-k2"]
    assert all(row["baseline"] is None for row in adapter_gain["rows"])
    for table in written["tables"]:
        _check_rows_against_reports(table, {"run": report})
    assert adapter_gain["rows"][0]["difference"]["difference"] > 0  # planted preferences: OPPU beats the base
    assert written["figure"]["x"] == [0, 1, 2]
    assert written["figure"]["series"]["RAG+OPPU"][0] == against_base["rows"][3]["metric"]
    assert (depth_study / "retrieval-depth.png").read_bytes()[:8] == PNG
    markdown = (depth_study / "retrieval-depth.md").read_text()
    best = against_base["rows"][1]["baseline"]["reference"]
    assert "95% CI" in markdown and f"vs {best} (best reference) | 95% CI |" in markdown
    assert f"{best}: the best reference row over these users" in markdown


def test_a_finished_study_is_reused_and_other_settings_are_refused(
    depth_study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert study_main([*DEPTH_STUDY, "--study-dir", str(depth_study)]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert study_main([*DEPTH_STUDY, "--study-dir", str(depth_study), "--seed", "1"]) == 2
    assert "was run with other settings (seed 0 there, 1 here); pass another --study-dir" in capsys.readouterr().err


def test_activity_buckets_read_from_the_node_stores(depth_study: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(depth_study / "run", run_dir)
    args = build_parser().parse_args(["activity", "--buckets", "2", "--methods", ",".join(DEPTH_METHODS), *TINY_STUDY])
    cfg = run_config_of(args, build_parser())
    STUDIES["activity"].finish(cfg, {"run": run_dir}, args, tmp_path)
    written = json.loads((tmp_path / "activity.json").read_text())
    lengths = sorted(history_lengths(run_dir).values())
    references = sorted(json.loads((run_dir / "report.json").read_text())["references"])
    assert [[row["label"] for row in t["rows"]] for t in written["tables"]] == [DEPTH_METHODS + references] * 2
    assert [t["rows"][0]["users"] for t in written["tables"]] == [2, 1]
    for table in written["tables"]:
        _check_best_reference(table)
    best = [t["rows"][0]["baseline"]["reference"] for t in written["tables"]]
    name = f"{best[0]} (best reference)" if len(set(best)) == 1 else "best reference row"
    assert written["figure"]["series"][name] == [
        next(r["metric"] for r in t["rows"] if r["label"] == b) for t, b in zip(written["tables"], best)]
    assert written["figure"]["x"] == [f"{lengths[0]}–{lengths[1]} items", f"{lengths[2]}–{lengths[2]} items"]
    assert (tmp_path / "activity.png").read_bytes()[:8] == PNG
    # a node store that no longer holds what the server received is refused
    user = json.loads((run_dir / "nodes.json").read_text())[0]["user"]
    result = json.loads((run_dir / "clients" / user / "result.json").read_text())
    result["statistics"]["oppu"]["correct"] += 1
    (run_dir / "clients" / user / "result.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="do not hold what the server received"):
        stored_statistics(run_dir)


@pytest.mark.parametrize("study, arms", [("behaviour-shift", ("full", "least-relevant")),
                                         ("history-format", ("both", "input", "output"))])
def test_studies_of_several_runs_compare_each_method_with_the_reference_rows(
    depth_study: Path, tmp_path: Path, study: str, arms: tuple[str, ...]
) -> None:
    """The analysis of a study of several runs (here copies of one run, which hold every method these studies
    ask for) puts the reference rows beside the methods: each arm's own where they read that arm's history
    (behaviour-shift), else the first arm's."""
    runs = {arm: tmp_path / arm for arm in arms}
    for run_dir in runs.values():
        shutil.copytree(depth_study / "run", run_dir)
    args = build_parser().parse_args([study, "--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random"])
    STUDIES[study].finish(run_config_of(args, build_parser()), runs, args, tmp_path)
    written = json.loads((tmp_path / f"{study}.json").read_text())
    report = json.loads((depth_study / "run" / "report.json").read_text())
    for table in written["tables"]:
        _check_rows_against_reports(table, dict.fromkeys(arms, report))
    compared = [t for t in written["tables"] if _references_of(t)]
    if study == "behaviour-shift":
        assert [t["title"] for t in compared] == [f"Against the non-personalized model, {arm} history" for arm in arms]
        for arm, table in zip(arms, compared):
            _check_best_reference(table, arm)
    else:
        assert len(compared) == 1
        _check_best_reference(compared[0], arms[0])
        assert "are the `both` run's" in (tmp_path / f"{study}.md").read_text()
    assert (tmp_path / f"{study}.png").read_bytes()[:8] == PNG


def test_similarity_of_an_existing_run_is_written_beside_it(depth_study: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(depth_study / "run", run_dir)
    assert study_main(["similarity", str(run_dir), "--variant", "k1"]) == 0
    written = json.loads((run_dir / "similarity.json").read_text())
    assert written["variant"] == "k1" and len(written["users"]) == 3
    assert (run_dir / "similarity.png").read_bytes()[:8] == PNG


def test_peft_types_study_in_three_runs(tmp_path: Path) -> None:
    study_dir = tmp_path / "peft"
    argv = ["peft-types", "--num-clients", "2", "--train-clients", "0", "--rounds", "0",
            "--study-dir", str(study_dir), *TINY_STUDY]
    assert study_main(argv) == 0
    reports = {kind: json.loads((study_dir / kind / "report.json").read_text()) for kind in ("lora", "ia3", "prompt")}
    assert {kind: r["config"]["peft"] for kind, r in reports.items()} == {k: k for k in reports}
    written = json.loads((study_dir / "peft-types.json").read_text())
    gain, versus_lora = written["tables"]
    assert [row["label"] for row in gain["rows"]] == [f"{k}/{m}" for k in reports for m in ("base", "oppu")] + [
        f"lora/{name}" for name in sorted(reports["lora"]["references"])]
    _check_best_reference(gain, "lora")
    assert all(reports[kind]["references"] == reports["lora"]["references"] for kind in reports)
    for table in (gain, versus_lora):
        _check_rows_against_reports(table, reports)
    shares = {row["label"]: row["extra"]["trainable share"] for row in gain["rows"] if row["extra"]}
    assert set(shares) == {"lora/oppu", "ia3/oppu", "prompt/oppu"}
    assert all(0 < share < 1 for share in shares.values())
    assert [row["difference"]["reference"] for row in versus_lora["rows"][1:]] == ["lora/oppu", "lora/oppu"]
    assert (study_dir / "peft-types.png").read_bytes()[:8] == PNG
