"""The run config has one set of defaults: RunConfig's, mirrored in pyproject's [tool.flwr.app.config]."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from common.config import RUN_KEYS, RunConfig, UserCounts, flwr_run_settings, run_settings
from simulation.engine import client_resources
from simulation.errors import SetupError
from simulation.flags import build_parser
from simulation.run_dir import prepare_run_dir

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_config_matches_runconfig_defaults() -> None:
    flwr_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    method_config = {k: v for k, v in flwr_config.items() if k not in RUN_KEYS}
    assert method_config == RunConfig().to_record()
    cfg, counts, run_dir = flwr_run_settings(flwr_config)
    assert (cfg, counts, run_dir.name) == (RunConfig(), UserCounts(100, 20), "flwr-run")
    assert {k: flwr_config[k] for k in RUN_KEYS} == RUN_KEYS  # the defaults of a `flwr run` without these keys
    assert flwr_run_settings({})[1:] == (UserCounts(100, 20), Path("runs/flwr-run").resolve())


def test_task_steps_take_task_batch_tokens_and_follow_batch_tokens_at_0() -> None:
    follows = RunConfig(batch_tokens=256, task_batch_tokens=0)
    assert follows.task_training().max_batch_tokens == follows.personal_training().max_batch_tokens == 256
    own = RunConfig(batch_tokens=256, task_batch_tokens=1024)
    assert (own.task_training().max_batch_tokens, own.personal_training().max_batch_tokens) == (1024, 256)
    assert own.task_adaptation_settings()["task-batch-tokens"] == 1024
    # a task adapter depends on the task steps' budget, whichever flag set it, and not on the personal one
    assert own.task_adaptation_settings() == RunConfig(batch_tokens=512, task_batch_tokens=1024).task_adaptation_settings()
    assert follows.task_adaptation_settings()["task-batch-tokens"] == 256
    assert follows.task_adaptation_settings() != RunConfig(batch_tokens=512, task_batch_tokens=0).task_adaptation_settings()
    assert "batch-tokens" not in own.task_adaptation_settings()
    with pytest.raises(ValueError, match="task-batch-tokens"):
        RunConfig(task_batch_tokens=-1)


def test_linear_task_lr_schedule_steps_down_to_one_rounds_share_in_the_last_round() -> None:
    linear = RunConfig(rounds=4, task_lr=2e-3, task_lr_schedule="linear")
    assert [linear.task_training(r).lr for r in (1, 2, 3, 4)] == pytest.approx([2e-3, 1.5e-3, 1e-3, 5e-4])
    assert [RunConfig(task_lr=2e-3, task_lr_schedule="constant").task_training(r).lr for r in (1, 4)] == [2e-3, 2e-3]
    assert linear.task_adaptation_settings()["task-lr-schedule"] == "linear"  # a task adapter records it
    with pytest.raises(ValueError, match="task-lr-schedule must be one of constant, linear, got 'cosine'"):
        RunConfig(task_lr_schedule="cosine")


def test_user_counts_rule_training_users_out_without_task_adaptation() -> None:
    counts = UserCounts(3, 5)
    assert (counts.training(RunConfig(rounds=2)), counts.nodes(RunConfig(rounds=2))) == (5, 8)
    assert (counts.training(RunConfig(rounds=0)), counts.nodes(RunConfig(rounds=0))) == (0, 3)
    with pytest.raises(ValueError, match="--num-clients 0: expected at least 1 test user"):
        UserCounts(0, 5)
    with pytest.raises(ValueError, match="--train-clients -1: expected 0 or more"):
        UserCounts(1, -1)
    every = UserCounts(3)  # --train-clients all, the simulation's default: every user outside the test users
    assert (every.training(RunConfig(rounds=2), available=40), every.training(RunConfig(rounds=2))) == (40, None)
    assert every.training(RunConfig(rounds=0), available=40) == 0 and every.users_hint() == 6
    assert counts.training(RunConfig(rounds=2), available=4) == 4  # never more than the data holds
    with pytest.raises(ValueError, match="a `flwr run` federation needs the number of training users"):
        every.nodes(RunConfig())


def test_from_record_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['lora-rank'\]"):
        RunConfig.from_record({"lora-rank": 4})
    with pytest.raises(ValueError, match="train-per-round must be >= 1, got 0"):
        RunConfig(train_per_round=0)
    with pytest.raises(ValueError, match="server-lr must be > 0 and server-momentum in"):
        RunConfig(server_momentum=1.0)
    for defense in ({"dp_noise": 1.0}, {"secure_aggregation": True}):
        with pytest.raises(ValueError, match="cannot be combined with dp-noise or secure-aggregation"):
            RunConfig(server_lr=2.0, **defense)
    assert RunConfig(server_lr=2.0, local_dp_epsilon=1.0).server_lr == 2.0  # post-processing of client-side DP
    with pytest.raises(ValueError, match="peft kind 'adapterx'"):
        RunConfig(peft="adapterx")
    with pytest.raises(ValueError, match="dtype must be auto, float32 or bfloat16; got 'fp16'"):
        RunConfig(dtype="fp16")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        RunConfig(device="gpu")
    assert RunConfig(device="cuda:1").device == "cuda:1"
    assert RunConfig.from_record({"k": 2, "methods": "rag,oppu+rag"}).method_names() == ["rag-k2", "oppu+rag-k2"]


def test_auto_gpu_share_splits_visible_gpus_among_concurrent_clients() -> None:
    # no GPU, or clients told to stay on the CPU: no share (Ray then hides GPUs, as wanted)
    assert client_resources(1.0, "auto", "auto", gpus=0, cpus=2) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert client_resources(1.0, "auto", "cpu", gpus=1, cpus=16)["num_gpus"] == 0.0
    # one H200 and 16 cores: 16 clients at once, a sixteenth each; 2 cores per client: an eighth
    assert client_resources(1.0, "auto", "auto", gpus=1, cpus=16)["num_gpus"] == 0.0625
    assert client_resources(2.0, "auto", "cuda", gpus=1, cpus=16)["num_gpus"] == 0.125
    # never more than one GPU per client; thirds round down to Ray's 1e-4 units so three fit on one GPU
    assert client_resources(1.0, "auto", "auto", gpus=4, cpus=2)["num_gpus"] == 1.0
    assert client_resources(1.0, "auto", "auto", gpus=1, cpus=3)["num_gpus"] * 3 <= 1.0
    assert client_resources(1.0, 0.5, "auto", gpus=0, cpus=2)["num_gpus"] == 0.5


def test_cuda_without_a_gpu_share_is_a_setup_error() -> None:
    with pytest.raises(SetupError, match="--device cuda needs a GPU, but none is visible"):
        client_resources(1.0, "auto", "cuda", gpus=0, cpus=2)
    with pytest.raises(SetupError, match="--gpus-per-client 0: Ray would hide the GPU"):
        client_resources(1.0, 0.0, "cuda:0", gpus=1, cpus=2)
    # a 4-bit base is CUDA only: with --device auto on a GPU host the share must not be 0 either
    assert client_resources(1.0, "auto", "auto", gpus=1, cpus=16, quantize="nf4")["num_gpus"] == 0.0625
    with pytest.raises(SetupError, match="--quantize nf4 with --gpus-per-client 0: Ray would hide the GPU"):
        client_resources(1.0, 0.0, "auto", gpus=1, cpus=16, quantize="nf4")
    with pytest.raises(SetupError, match="--quantize nf4 needs a GPU, but none is visible"):
        client_resources(1.0, "auto", "auto", gpus=0, cpus=2, quantize="nf4")


def test_gpus_per_client_flag_takes_auto_or_a_share(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args([]).gpus_per_client == "auto"
    assert build_parser().parse_args(["--gpus-per-client", "0.25"]).gpus_per_client == 0.25
    for bad in ("-1", "half", "nan", "inf"):
        with pytest.raises(SystemExit) as stopped:
            build_parser().parse_args(["--gpus-per-client", bad])
        assert stopped.value.code == 2
        assert f"expected 'auto' or a number >= 0, got '{bad}'" in capsys.readouterr().err


def test_cpus_per_client_flag_takes_cores_above_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """0 divided by zero in the GPU share, a negative count left the run waiting for clients Ray never started."""
    assert build_parser().parse_args([]).cpus_per_client == 1.0
    assert build_parser().parse_args(["--cpus-per-client", "0.5"]).cpus_per_client == 0.5
    for bad in ("0", "-1", "two", "nan", "inf"):
        with pytest.raises(SystemExit) as stopped:
            build_parser().parse_args(["--cpus-per-client", bad])
        assert stopped.value.code == 2
        assert f"expected a number of cores > 0, got '{bad}'" in capsys.readouterr().err


def test_train_clients_flag_takes_all_or_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    """The simulation draws on every user outside the test users by default; a deployment, whose SuperNodes are
    started per user, on a number (flwr run's)."""
    from simulation.deploy.cli import build_parser as deploy_parser

    assert build_parser().parse_args([]).train_clients is None
    assert build_parser().parse_args(["--train-clients", "all"]).train_clients is None
    assert build_parser().parse_args(["--train-clients", "7"]).train_clients == 7
    assert deploy_parser().parse_args(["local"]).train_clients == RUN_KEYS["train-clients"]
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["--train-clients", "most"])
    assert stopped.value.code == 2
    assert "expected a number of training users or 'all', got 'most'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_quantize_nf4_without_cuda_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    assert main(["--quantize", "nf4", "--model", "tiny-random", "--num-clients", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--quantize nf4 loads the base with bitsandbytes on a CUDA GPU" in err
    assert "no CUDA GPU is visible here" in err
    from simulation.deploy.cli import main as deploy_main
    from simulation.studies.cli import main as study_main

    tiny = ["--quantize", "nf4", "--model", "tiny-random", "--num-clients", "1"]
    assert deploy_main([*tiny, "--train-clients", "2"]) == 2 and study_main(["activity", *tiny]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["oppu-deploy", "oppu-study"]  # one line each
    assert all("--quantize nf4 loads the base with bitsandbytes on a CUDA GPU" in line for line in lines)
    # `oppu-deploy run` sends the run to SuperNodes on other machines: their GPUs, not this one's, decide
    from simulation.flags import build_parser, check_run_flags, run_config_of

    parser = build_parser()
    args = parser.parse_args([*tiny, "--train-clients", "2"])
    check_run_flags(args, run_config_of(args, parser), clients_here=False)
    with pytest.raises(ValueError, match="quantize must be one of none, nf4, got 'int8'"):
        RunConfig(quantize="int8")
    with pytest.raises(ValueError, match="quantize nf4 runs on CUDA only"):
        RunConfig(quantize="nf4", device="cpu")


def test_a_resume_under_other_settings_names_each_difference(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(run_settings(RunConfig(rounds=1), UserCounts(2, 4))))
    assert prepare_run_dir(RunConfig(rounds=1), UserCounts(2, 4), run_dir, resume=True) == run_dir
    with pytest.raises(SetupError) as refused:
        prepare_run_dir(RunConfig(rounds=2, personal_lr=5e-3), UserCounts(2, 5), run_dir, resume=True)
    assert str(refused.value).endswith(
        f"was run with other settings ({run_dir / 'run.json'}): rounds 1 there, 2 here; personal-lr "
        f"{RunConfig().personal_lr!r} there, 0.005 here; train-clients 4 there, 5 here")
