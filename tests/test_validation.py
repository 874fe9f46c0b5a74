"""Bad data and bad flags stop `flower-simulation` before anything is written or started: exit 2, one line naming
the file or flag, the record, the value and what was expected, and no traceback (unless --verbose)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from client.export import MANIFEST
from client.export import main as adapter_main
from common.exit_status import BAD_INPUT
from simulation.cli import main
from simulation.deploy.cli import main as deploy_main
from simulation.studies.cli import main as study_main

REPO = Path(__file__).resolve().parents[1]
TAGS = ["comedy", "action"]


def oppu_users(task: str = "LaMP-2M") -> list[dict]:
    """Two valid users in OPPU's format (each case below breaks one thing)."""
    users = []
    for u in (1, 2):
        if task == "LaMP-2M":
            profile = [{"id": f"h{i}", "description": f"movie {u}.{i}", "tag": TAGS[i % 2]} for i in range(3)]
            query = [{"id": f"q{u}", "input": f"description: movie {u}", "gold": "comedy"}]
        else:  # LaMP-3
            profile = [{"id": f"h{i}", "text": f"review {u}.{i}", "score": i + 1} for i in range(3)]
            query = [{"id": f"q{u}", "input": f"review: item {u}", "gold": "4"}]
        users.append({"user_id": f"u{u}", "profile": profile, "query": query})
    return users


def broken(change: Callable[[list[dict]], object], task: str = "LaMP-2M") -> list[dict]:
    users = oppu_users(task)
    change(users)
    return users


def _set(target: dict, key: str, value: object) -> None:
    target[key] = value


OPPU_CASES = {
    "history tag outside the tag list": (
        "LaMP-2M", broken(lambda u: _set(u[0]["profile"][1], "tag", "horror")),
        "user 'u1': history item 'h1': field 'tag' is 'horror'; expected one of the LaMP-2M labels: sci-fi,",
    ),
    "gold outside the tag list": (
        "LaMP-2M", broken(lambda u: _set(u[1]["query"][0], "gold", "Comedy")),
        "user 'u2': query 'q2': field 'gold' is 'Comedy'; expected one of the LaMP-2M labels",
    ),
    "rating out of range": (
        "LaMP-3", broken(lambda u: _set(u[0]["profile"][2], "score", 7), "LaMP-3"),
        "user 'u1': history item 'h2': field 'score' is '7'; expected a rating from 1 to 5",
    ),
    "rating not a number": (
        "LaMP-3", broken(lambda u: _set(u[0]["query"][0], "gold", "five"), "LaMP-3"),
        "user 'u1': query 'q1': field 'gold' is 'five'; expected a rating from 1 to 5",
    ),
    "rating nan as text": (
        "LaMP-3", broken(lambda u: _set(u[0]["query"][0], "gold", "nan"), "LaMP-3"),
        "query 'q1': field 'gold' is 'nan'; expected a rating from 1 to 5",
    ),
    "duplicate user id": (
        "LaMP-2M", broken(lambda u: _set(u[1], "user_id", "u1")),
        "user 'u1': user id appears twice; expected unique user ids",
    ),
    "duplicate query id": (
        "LaMP-2M", broken(lambda u: _set(u[1]["query"][0], "id", "q1")),
        "user 'u2': query 'q1': id appears twice (also user 'u1'); expected unique query ids",
    ),
    "duplicate history item id": (
        "LaMP-2M", broken(lambda u: _set(u[0]["profile"][2], "id", "h0")),
        "user 'u1': history item 'h0': id appears twice; expected unique history item ids within a user",
    ),
    "user with no queries": (
        "LaMP-2M", broken(lambda u: _set(u[1], "query", [])),
        "user 'u2' has no queries; expected at least one",
    ),
    "text longer than the limit": (
        "LaMP-2M", broken(lambda u: _set(u[0]["profile"][0], "description", "x" * 20_001)),
        "history item 'h0': field 'description' has 20,001 characters, more than --max-text-chars 20000",
    ),
    "query input longer than the limit": (
        "LaMP-2M", broken(lambda u: _set(u[0]["query"][0], "input", "y" * 20_001)),
        "query 'q1': field 'input' has 20,001 characters, more than --max-text-chars 20000 ('yyy",
    ),
    "history longer than the limit": (
        "LaMP-2M",
        broken(lambda u: _set(u[0], "profile", [{"id": f"h{i}", "description": "d", "tag": "comedy"}
                                                for i in range(10_001)])),
        "user 'u1' has 10,001 history items, more than --max-user-history 10000; raise the limit with "
        "--max-user-history N",
    ),
}
UNSAFE_USER_IDS = {
    "": "is empty", "a/b": "contains '/'", "a\\b": "contains '\\\\'", "..": "starts with '.'",
    ".hidden": "starts with '.'", "a\x00b": "contains NUL or another non-printable character",
    "x" * 201: "is longer than 200 bytes",
}
for _user_id, _problem in UNSAFE_USER_IDS.items():
    OPPU_CASES[f"user id {_user_id[:8]!r}"] = (
        "LaMP-2M", broken(lambda u, user_id=_user_id: _set(u[0], "user_id", user_id)),
        f": user id {_problem}; expected a name usable as a directory",
    )


def _lamp_2m(profile_tag: str = "comedy") -> tuple[list[dict], dict]:
    questions = [
        {"id": f"{n}", "input": f"description: film {n}",
         "profile": [{"id": f"p{n}", "description": "d", "tag": profile_tag}]}
        for n in (100, 101)
    ]
    return questions, {"task": "LaMP_2", "golds": [{"id": "100", "output": "comedy"}, {"id": "101", "output": "action"}]}


def _lamp_case(change: Callable[[list[dict], dict], object]) -> tuple[list[dict], dict]:
    questions, outputs = _lamp_2m()
    change(questions, outputs)
    return questions, outputs


LAMP_CASES = {
    "duplicate gold id": (
        _lamp_case(lambda q, o: o["golds"].append({"id": "100", "output": "comedy"})),
        "outputs.json: golds[2]: id '100' appears twice (also golds[0]); expected one gold output per question",
    ),
    "gold outside the tag list": (
        _lamp_case(lambda q, o: _set(o["golds"][1], "output", "horror")),
        "outputs.json: golds[1]: field 'output' is 'horror'; expected one of the LaMP-2M labels",
    ),
    "duplicate question id": (
        _lamp_case(lambda q, o: _set(q[1], "id", "100")),
        "questions.json: entry 1: id '100' appears twice (also entry 0); expected unique question ids",
    ),
    "history tag outside the tag list": (
        _lamp_2m(profile_tag="horror"),
        "questions.json: user '100': history item 'p100': field 'tag' is 'horror'; expected one of the LaMP-2M labels",
    ),
    "one item id with two contents": (
        _lamp_case(lambda q, o: q[0]["profile"].append({"id": "p100", "description": "other", "tag": "comedy"})),
        "questions.json: entry 0 (id 100): profile[1]: id 'p100' names another item of user '100' with other fields",
    ),
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str], run_dir: Path) -> tuple[int, str]:
    """(exit status, stderr) of flower-simulation's entry point, after checking it wrote no run directory."""
    try:
        status = main([*argv, "--run-dir", str(run_dir)])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    assert not run_dir.exists()
    return status, capsys.readouterr().err


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], run_dir: Path, message: str) -> str:
    status, err = run(argv, capsys, run_dir)
    assert status == 2, err
    assert message in err
    assert "Traceback" not in err
    return err


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(OPPU_CASES))
def test_bad_oppu_data_is_refused_before_anything_is_written(tmp_path, capsys, case):
    task, users, message = OPPU_CASES[case]
    data = write_json(tmp_path / "users.json", users)
    err = refused(["--task", task, "--data", str(data), "--model", "tiny-random"], capsys, tmp_path / "run", message)
    assert err.startswith(f"flower-simulation: --data: {data}: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json"]


@pytest.mark.parametrize("case", sorted(LAMP_CASES))
def test_bad_lamp_data_is_refused(tmp_path, capsys, case):
    (questions, outputs), message = LAMP_CASES[case]
    q, o = write_json(tmp_path / "questions.json", questions), write_json(tmp_path / "outputs.json", outputs)
    refused(["--task", "LaMP-2M", "--data", f"{q}:{o}", "--model", "tiny-random"], capsys, tmp_path / "run", message)


def test_raised_limits_admit_the_data(tmp_path, capsys):
    long_text = broken(lambda u: _set(u[0]["profile"][0], "description", "x" * 20_001))
    data = write_json(tmp_path / "users.json", long_text)
    argv = ["--task", "LaMP-2M", "--data", str(data), "--model", "tiny-random"]
    refused(argv, capsys, tmp_path / "run", "more than --max-text-chars 20000")
    argv += ["--max-text-chars", "30000"]
    refused([*argv, "--max-user-history", "2"], capsys, tmp_path / "run",
            "user 'u1' has 3 history items, more than --max-user-history 2")
    # within both limits the data passes; the run then stops at the next check (too few users), still unwritten
    refused(argv, capsys, tmp_path / "run", "--num-clients 100 exceeds the 2 users in the data")


def test_unreadable_files_are_refused_naming_the_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps(oppu_users()).replace("movie 1.0", "caf\u00e9").encode("latin-1"))
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(oppu_users("LaMP-3")).replace('"gold": "4"', '"gold": NaN', 1))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # valid JSON, deeper than Python's parser can hold
    for data, message in [
        (latin1, f"--data: {latin1}: not UTF-8 text (byte 0xe9 at offset"),
        (tmp_path, f"--data: {tmp_path}: is a directory; expected a JSON file"),
        (tmp_path / "missing.json", f"--data: {tmp_path / 'missing.json'}: file not found"),
        (nan, f"--data: {nan}: not valid JSON (NaN is not a JSON number"),
        (deep, f"--data: {deep}: JSON nested too deeply to read"),
    ]:
        task = "LaMP-3" if data == nan else "LaMP-2M"
        refused(["--task", task, "--data", str(data), "--model", "tiny-random"], capsys, tmp_path / "run", message)


BAD_FLAGS = {
    "--personal-epochs 0": (["--personal-epochs", "0"], "personal-epochs must be > 0, got 0.0"),
    "--local-epochs -1": (["--local-epochs", "-1"], "local-epochs must be > 0, got -1.0"),
    "--personal-lr 0": (["--personal-lr", "0"], "personal-lr must be > 0, got 0.0"),
    "--k -1": (["--k", "-1"], "k must be >= 1, got -1"),
    "--dp-noise nan": (["--dp-noise", "nan"], "dp-noise must be a finite number, got nan"),
    "--task-lr inf": (["--task-lr", "inf"], "task-lr must be a finite number, got inf"),
    "--dp-delta 1": (["--dp-delta", "1"], "dp-delta must be in (0, 1), got 1.0"),
    "--batch-tokens 0": (["--batch-tokens", "0"], "batch-tokens must be >= 1, got 0"),
    "--num-queries 0": (["--num-queries", "0"], "num-queries must be >= 1, got 0"),
    "--max-text-chars 0": (["--max-text-chars", "0"], "max-text-chars must be >= 1, got 0"),
    "--lora-targets ,": (["--lora-targets", ","], "lora-targets names no module, got ','"),
    "--timeout 0": (["--timeout", "0"], "flower-simulation: --timeout 0.0: expected a finite number of seconds > 0"),
    "--timeout nan": (["--timeout", "nan"], "--timeout nan: expected a finite number of seconds > 0"),
    "--num-clients 0": (["--num-clients", "0"], "--num-clients 0: expected at least 1 test user"),
    "--lora-targets q_proj,qkv": (
        ["--lora-targets", "q_proj,qkv"],
        "--lora-targets q_proj,qkv: qkv names no linear layer of --model tiny-random; expected names from "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_refused_before_ray_starts(tmp_path, capsys, case):
    argv, message = BAD_FLAGS[case]
    refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", *argv], capsys, tmp_path / "run",
            message)


def test_lora_targets_are_checked_against_a_local_models_config(tmp_path, capsys):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", str(model), "--cache-dir", str(tmp_path / "cache"),
             "--lora-targets", "q_proj,c_attn"], capsys, tmp_path / "run", "c_attn names no linear layer of --model")


def test_bad_run_dirs_are_refused(tmp_path, capsys):
    argv = ["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random"]
    a_file = write_json(tmp_path / "a-file", {})
    assert main([*argv, "--run-dir", str(a_file)]) == 2
    assert f"--run-dir {a_file}: is a file; expected a directory" in capsys.readouterr().err
    refused(argv, capsys, a_file / "run", f"--run-dir {a_file / 'run'}: {a_file} is a file; expected a directory")
    read_only = Path("/proc/sys/oppu-run")  # not writable even by root
    if os.access(read_only.parent, os.W_OK):
        pytest.skip("no read-only directory on this machine")
    refused(argv, capsys, read_only, f"--run-dir {read_only}: {read_only.parent} is not writable")


def test_a_cache_dir_that_is_a_file_is_refused(tmp_path, capsys):
    a_file = write_json(tmp_path / "a-file", {})
    refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--cache-dir", str(a_file)],
            capsys, tmp_path / "run", f"flower-simulation: --cache-dir {a_file}: is a file; expected a directory")
    assert deploy_main(["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--node-caches",
                        str(a_file), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"oppu-deploy: --node-caches {a_file}: is a file; expected a directory for "
                                       "the nodes' model caches\n")
    assert not (tmp_path / "run").exists()


def test_a_refused_resume_exits_2_with_one_line(tmp_path, capsys):
    argv = ["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--resume"]
    err = refused(argv, capsys, tmp_path / "run", f"flower-simulation: --resume: no earlier run found in {tmp_path / 'run'}")
    assert err.count("\n") == 1


def test_verbose_adds_the_traceback(tmp_path, capsys):
    status, err = run(["--timeout", "0", "--verbose"], capsys, tmp_path / "run")
    assert status == 2 and "Traceback" in err and err.endswith("expected a finite number of seconds > 0\n")


def test_the_command_itself_exits_2_with_one_line(tmp_path):
    data = write_json(tmp_path / "users.json", OPPU_CASES["history tag outside the tag list"][1])
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "--task", "LaMP-2M", "--data", str(data), "--model", "tiny-random",
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"flower-simulation: --data: {data}: user 'u1': history item 'h1': field 'tag' is 'horror'; expected one of "
        "the LaMP-2M labels: sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, "
        "psychology, fantasy, romance, thought-provoking, social commentary, violence, true story"
    ]
    assert not run_dir.exists()


def test_a_bad_value_is_one_line_not_the_usage_text(tmp_path, capsys):
    status, err = run(["--task", "LaMP-2M", "--data", "synthetic", "--personal-epochs", "0"], capsys, tmp_path / "run")
    assert (status, err) == (2, "flower-simulation: personal-epochs must be > 0, got 0.0\n")


def test_an_unknown_model_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    """A path that is no directory is no hub id either: refused without asking the hub (which stands at a closed
    loopback port here, so a request would show in the message)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.2:9")
    missing = str(tmp_path / "no-such-model")
    err = refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", missing, "--cache-dir", str(tmp_path / "cache")],
                  capsys, tmp_path / "run", f"flower-simulation: --model {missing!r}: expected smollm2, tiny-random, "
                  "a model directory or a reachable hub id (")
    assert "usage:" not in err and not list((tmp_path / "cache").rglob("*.json"))  # nothing half-built is kept
    assert "unreachable" not in err and "127.0.0.2" not in err


@pytest.mark.parametrize(("files", "why"), [
    ({}, "no config.json in {dir}"),
    ({"config.json": '{"hidden_size": 8}'}, "{dir}/config.json: Unrecognized model in {dir}"),
    ({"config.json": '{"model_type": "llama"}'}, "no tokenizer in {dir}: expected tokenizer.json or "),
])
def test_a_model_directory_without_what_transformers_reads_is_refused(tmp_path, capsys, files, why):
    """What the directory lacks, named, in one line; nothing enters the cache."""
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    for name, text in files.items():
        (model_dir / name).write_text(text)
    err = refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", str(model_dir), "--cache-dir",
                   str(tmp_path / "cache")], capsys, tmp_path / "run",
                  f"flower-simulation: --model {str(model_dir)!r}: expected smollm2, tiny-random, a model directory or "
                  f"a reachable hub id ({why.format(dir=model_dir)}")
    assert len(err.splitlines()) == 1 and not list((tmp_path / "cache").rglob("*.json"))


def test_a_hub_id_is_refused_at_once_where_the_hub_does_not_answer(tmp_path, capsys, monkeypatch):
    """One request, not huggingface_hub's 5 retries per file (52 s for a mistyped name on a machine without
    network); the hub stands at a closed loopback port."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.2:9")
    err = refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", "someone/no-such-model",
                   "--cache-dir", str(tmp_path / "cache")], capsys, tmp_path / "run",
                  "flower-simulation: --model 'someone/no-such-model': expected smollm2, tiny-random, a model "
                  "directory or a reachable hub id (http://127.0.0.2:9 is unreachable: ")
    assert len(err.splitlines()) == 1 and "Retrying" not in err


def test_deploy_refuses_bad_data_with_exit_2(tmp_path, capsys):
    data = write_json(tmp_path / "users.json", OPPU_CASES["history tag outside the tag list"][1])
    run_dir = tmp_path / "run"
    assert deploy_main(["--task", "LaMP-2M", "--data", str(data), "--model", "tiny-random",
                        "--run-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"oppu-deploy: --data: {data}: user 'u1': history item 'h1'")
    assert not run_dir.exists()


def test_study_checks_the_number_of_users_once(tmp_path, capsys):
    study_dir = tmp_path / "study"
    assert study_main(["peft-types", "--num-clients", "0", "--task", "LaMP-2M", "--data", "synthetic",
                       "--model", "tiny-random", "--study-dir", str(study_dir)]) == 2
    assert capsys.readouterr().err.endswith("oppu-study: --num-clients 0: expected at least 1 test user\n")
    assert not study_dir.exists()


def test_deploy_checks_its_timeout(tmp_path, capsys):
    for bad in ("0", "-5", "inf"):
        assert deploy_main(["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--timeout", bad,
                            "--run-dir", str(tmp_path / "run")]) == 2
        assert f"oppu-deploy: --timeout {float(bad)}: expected a finite number of seconds > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_adapter_import_refuses_a_corrupt_manifest_and_an_unknown_model(tmp_path, capsys, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    valid = {"files": {}, "base_model_sha256": "0" * 64}
    for manifest, message in [
        ("{not json", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
                      "the export is damaged"),
        (json.dumps([1, 2]), "expected an object with 'files' (file name -> sha256) and 'base_model_sha256'"),
        (json.dumps({"files": {}}), "expected an object with 'files'"),
        (json.dumps({**valid, "files": {"../../escape": "0" * 64}}), "the manifest is damaged"),
    ]:
        (export / MANIFEST).write_text(manifest)
        assert adapter_main(["import", str(export), str(tmp_path / "target"), "--model", "tiny-random"]) == BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"oppu-adapter: {export / MANIFEST}: ") and message in err and "Traceback" not in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    assert adapter_main(["import", str(export), str(tmp_path / "target"), "--model", missing,
                         "--cache-dir", str(tmp_path / "cache")]) == BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"oppu-adapter: --model {missing!r}: expected smollm2, tiny-random, a model directory or")
    assert err.count("\n") == 1 and not (tmp_path / "target").exists()


def test_the_generated_cases_are_valid_without_their_change(tmp_path):
    """Each case breaks exactly one thing: the unbroken users load."""
    from client.data import load_lamp, load_oppu

    for task in ("LaMP-2M", "LaMP-3"):
        assert len(load_oppu(write_json(tmp_path / "ok.json", oppu_users(task)), task)) == 2
    questions, outputs = _lamp_2m()
    q, o = write_json(tmp_path / "q.json", questions), write_json(tmp_path / "o.json", outputs)
    assert len(load_lamp(q, o, "LaMP-2M")) == 2


def test_task_adaptation_without_training_users_is_refused(tmp_path, capsys):
    """The ServerApp found it only after every node had started."""
    refused(["--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--train-clients", "0", "--rounds",
             "1"], capsys, tmp_path / "run", "flower-simulation: --train-clients 0: task adaptation (--rounds 1) needs "
            "training users; give --train-clients 1 or more, or skip task adaptation with --rounds 0")
