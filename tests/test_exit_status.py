"""Every command follows one exit rule (common/exit_status.py): bad input or flags exit BAD_INPUT with one line
that names the command and what to fix; nothing is started or written for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.export import main as adapter_main
from common.exit_status import BAD_INPUT, DONE
from simulation.cli import main as simulation_main
from simulation.deploy.cli import main as deploy_main
from simulation.privacy_audit import main as audit_main
from simulation.studies.arms import STUDIES
from simulation.studies.cli import main as study_main

TINY = ["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random"]


def _bad_inputs(tmp_path: Path) -> list[tuple[str, object, list[str], str]]:
    """(command, its main, argv, what its one line must name)."""
    missing = str(tmp_path / "no-such-run")
    return [
        ("flower-simulation", simulation_main, ["--num-clients", "0", *TINY, "--run-dir", str(tmp_path / "a")],
         "--num-clients 0"),
        ("flower-simulation", simulation_main, ["--rounds", "-1", *TINY], "rounds"),
        ("oppu-deploy", deploy_main, ["local", "--num-clients", "0", *TINY, "--run-dir", str(tmp_path / "b")],
         "--num-clients 0"),
        ("oppu-study", study_main, ["activity", "--buckets", "0", *TINY, "--study-dir", str(tmp_path / "c")],
         "--buckets"),
        ("oppu-study", study_main, ["similarity", missing, "--variant", "k0-nonsense"], "--variant"),
        ("oppu-study", study_main, ["similarity", missing], f"{missing}: need personal adapters"),
        ("oppu-audit", audit_main, [missing], missing),
        ("oppu-adapter", adapter_main, ["export", missing, "someone", str(tmp_path / "d")], missing),
    ]


@pytest.mark.parametrize("case", range(8))  # the cases of _bad_inputs
def test_bad_input_exits_bad_input_with_one_line(case: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prog, main, argv, named = _bad_inputs(tmp_path)[case]
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own exit for a value it refuses
        status = stop.code
    err = capsys.readouterr().err
    assert status == BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    assert lines[-1].startswith(f"{prog}") and named in lines[-1], err
    assert not any(tmp_path.iterdir()), "bad input must leave nothing behind"


HELP = [(simulation_main, []), (deploy_main, []), (study_main, []), (audit_main, []), (adapter_main, []),
        *[(deploy_main, [role]) for role in ("local", "superlink", "register", "supernode", "partition", "run")],
        *[(study_main, [study]) for study in STUDIES],
        (adapter_main, ["export"]), (adapter_main, ["import"])]


@pytest.mark.parametrize(("main", "argv"), HELP)
def test_every_help_page_prints_and_exits_done(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help renders every flag's help text (a stray '%' in one would end it in a TypeError)."""
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == DONE
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(("main", "argv", "says_its_default"), [
    (simulation_main, [], "--cache-dir CACHE_DIR"), (deploy_main, ["local"], "--node-caches NODE_CACHES"),
    (study_main, ["activity"], "--study-dir STUDY_DIR")])
def test_help_gives_each_default_once_and_only_a_real_one(main, argv: list[str], says_its_default: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The run's flags say their default after the help: a value (--rounds 40, --dp-noise 0.0), never 'None' or
    'False', and not twice where the help text already says it in its own words."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 40)" in text and "(default: 0.0)" in text
    own_words = text.split(f"{says_its_default} ")[1].split(" --")[0]
    assert own_words.count("default") == 1, own_words
