"""Users own their adapters: export with a manifest, verified import, plain peft loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from peft import PeftModel

from client.data import synthetic_users
from client.evaluate import predict, query_prompts
from client.export import AdapterImportError, export_adapter, import_adapter, main
from client.model_cache import load_fresh
from client.personalize import personalize_user
from common.config import RunConfig
from common.model_files import MANIFEST as MODEL_MANIFEST
from common.model_files import model_hash
from common.store import UserStore
from common.tasks import get_task

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
    assert main(["export", str(run_dir), "nobody", str(tmp_path / "b")]) == 1
    assert "no trained adapter" in capsys.readouterr().err
