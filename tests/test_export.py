"""Users own their adapters: export with a manifest, verified import, plain peft loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from client.data import synthetic_users
from client.evaluate import predict, query_prompts
from client.export import AdapterImportError, export_adapter, import_adapter, main
from client.model_build import resolve_model
from client.model_loading import load_fresh
from client.personalize import personalize_user
from common.config import RunConfig
from common.exit_status import BAD_INPUT
from common.model_files import MANIFEST as MODEL_MANIFEST
from common.model_files import model_hash
from common.store import UserStore
from common.tasks import get_task
from simulation.cli import main as simulation_main

CFG = RunConfig(task="LaMP-2M", model="tiny-random", methods="base,oppu", personal_lr=1e-2, personal_epochs=2,
                batch_tokens=256)


@pytest.fixture(scope="module")
def trained(tiny, tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model, tokenizer = tiny
    run_dir = tmp_path_factory.mktemp("export-run")
    user = synthetic_users(1, history_len=12)[0]
    personalize_user(CFG, user, UserStore(run_dir, user.user_id), model, model, tokenizer, model_hash(tiny_model_dir))
    return run_dir, user


def test_export_then_plain_peft_load_reproduces_predictions(tiny, tiny_model_dir, trained, tmp_path: Path) -> None:
    run_dir, user = trained
    out = tmp_path / "mine"
    manifest = export_adapter(run_dir, user.user_id, out)
    assert manifest["base_model_sha256"] == model_hash(tiny_model_dir)
    assert manifest["quantization"] == "none"
    assert manifest["task"] == "LaMP-2M" and manifest["peft_config"]["r"] == 8
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    _, tokenizer = tiny
    task = get_task("LaMP-2M")
    prompts = query_prompts(user, task, tokenizer, CFG.prompt_settings(), None)
    loaded = PeftModel.from_pretrained(load_fresh(tiny_model_dir), out)
    loaded.eval()
    stored = json.loads((UserStore(run_dir, user.user_id).predictions).read_text())["oppu"]
    assert predict(loaded, tokenizer, task, prompts)[0] == [s["prediction"] for s in stored]


def test_import_verifies_hashes_and_base(tiny_model_dir, trained, tmp_path: Path) -> None:
    run_dir, user = trained
    out = tmp_path / "export"
    export_adapter(run_dir, user.user_id, out)
    target = tmp_path / "elsewhere"
    assert import_adapter(out, target, tiny_model_dir)["user"] == user.user_id
    assert (target / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    (other_base / MODEL_MANIFEST).write_text(json.dumps({"name": "other", "sha256": "0" * 64}))
    with pytest.raises(AdapterImportError, match="base model mismatch"):
        import_adapter(out, tmp_path / "t2", other_base)

    weights = out / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterImportError, match="sha256 does not match the manifest"):
        import_adapter(out, tmp_path / "t3", tiny_model_dir)
    assert not (tmp_path / "t3").exists()


def test_cli_reports_errors(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, user = trained
    assert main(["export", str(run_dir), user.user_id, str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "nobody", str(tmp_path / "b")]) == BAD_INPUT
    assert capsys.readouterr().err == (f"oppu-adapter: {run_dir}: no user 'nobody' there (expected one of 1 users in "
                                       f"clients/: {user.user_id})\n")
    assert main(["export", str(run_dir), user.user_id, str(tmp_path / "c"), "--variant", "k5"]) == BAD_INPUT
    assert capsys.readouterr().err.endswith("no trained adapter (expected oppu-adapter.json beside peft's files); "
                                            "this user's trained variants: k0\n")
    with pytest.raises(SystemExit) as refused:
        main(["export", str(run_dir), user.user_id, str(tmp_path / "d"), "--variant", "bogus"])
    assert refused.value.code == BAD_INPUT
    assert "adapter variant 'bogus': expected k<N> or k<N>-pag" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "bcd")


@pytest.fixture(scope="module")
def task_adapted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny run with task adaptation, fp32, whose test user's adapter is exported below."""
    run_dir = tmp_path_factory.mktemp("task-run") / "run"
    data = tmp_path_factory.mktemp("owner-home") / "users.json"
    data.write_text(json.dumps([u.to_json() for u in synthetic_users(3, history_len=10)]))
    assert simulation_main(["--task", "LaMP-2M", "--data", str(data), "--model", "tiny-random", "--num-clients", "1",
                            "--train-clients", "2", "--rounds", "1", "--methods", "base,oppu", "--dtype", "float32",
                            "--personal-epochs", "2", "--batch-tokens", "256", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_an_export_loads_as_users_load_it_on_the_task_adapted_base(tiny, tiny_model_dir, task_adapted_run, tmp_path):
    run_dir = task_adapted_run
    user_id = json.loads((run_dir / "nodes.json").read_text())[0]["user"]
    out = tmp_path / "mine"
    manifest = export_adapter(run_dir, user_id, out)
    # as README says: plain peft, the run's task adapter merged into the base, then the exported adapter
    base = PeftModel.from_pretrained(load_fresh(tiny_model_dir, "cpu", "float32"), run_dir / "server" / "task_adapter")
    loaded = PeftModel.from_pretrained(base.merge_and_unload(), out)
    loaded.eval()
    stored = load_file(out / "adapter_model.safetensors")
    in_model = get_peft_model_state_dict(loaded)
    assert set(in_model) == set(stored)
    assert all(torch.equal(in_model[name], stored[name]) for name in stored)  # the tensors it loaded, not others

    user = UserStore(run_dir, user_id)
    data = json.loads(user.data.read_text())
    person = next(u for u in synthetic_users(3, history_len=10) if u.user_id == data["user_id"])
    _, tokenizer = tiny
    task = get_task("LaMP-2M")
    cfg = RunConfig.from_record(manifest["config"])
    prompts = query_prompts(person, task, tokenizer, cfg.prompt_settings(0), None)
    run_says = json.loads(user.predictions.read_text())
    assert predict(loaded, tokenizer, task, prompts)[0] == [s["prediction"] for s in run_says["oppu"]]
    assert predict(base.merge_and_unload(), tokenizer, task, prompts)[0] == [s["prediction"] for s in run_says["base"]]


def test_an_export_names_files_and_models_never_local_paths(task_adapted_run, tmp_path):
    user_id = json.loads((task_adapted_run / "nodes.json").read_text())[0]["user"]
    out = tmp_path / "mine"
    manifest = export_adapter(task_adapted_run, user_id, out)
    assert manifest["config"]["data"] == "users.json" and manifest["config"]["model"] == "tiny-random"
    assert manifest["peft_config"]["base_model_name_or_path"] == "tiny-random"
    shared = "".join(p.read_text() for p in out.glob("*.json"))
    assert str(Path.home()) not in shared and "/tmp/" not in shared and "owner-home" not in shared
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"
    assert import_adapter(out, tmp_path / "elsewhere", resolve_model("tiny-random"))["user"] == user_id  # hashes hold
