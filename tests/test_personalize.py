"""Per-user personalization: isolated adapters, a shared base left clean, planted preferences learnt,
the node-local store, the run config's method names, and the cached PAG profile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from client.adapters import attach_fresh, load_adapter_state
from client.data import synthetic_users
from client.evaluate import predict, query_prompts
from client.model_loading import load_base, load_fresh
from client.personalize import personalize_user
from client.profile import user_profile
from client.task_adapter import initial_task_state, task_adapted_base, task_lora
from common.config import RunConfig
from common.methods import parse_method
from common.metrics import combine, finalize, statistics
from common.model_files import model_hash
from common.store import UserStore, read_json
from common.tasks import get_task

TASK = get_task("LaMP-2M")
CFG = RunConfig(
    task="LaMP-2M", model="tiny-random", methods="base,oppu", personal_lr=1e-2, personal_epochs=4, batch_tokens=256
)
USERS = synthetic_users(4, history_len=24)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_weights(model, reference: dict[str, torch.Tensor]) -> list[str]:
    state = model.state_dict()
    assert set(state) == set(reference), "the base's parameter names changed"
    return [k for k, v in state.items() if not torch.equal(v, reference[k])]


def adapter_file(run_dir, user, variant="k0"):
    return UserStore(run_dir, user.user_id).adapter(f"user-{user.user_id}-{variant}") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def shared_run(tiny, tiny_model_dir, tmp_path_factory):
    """All four users personalized one after the other on the process's one shared base, as a worker does."""
    base, tokenizer = tiny
    run_dir = tmp_path_factory.mktemp("run")
    reference = snapshot(base)
    results, changed = {}, {}
    for user in USERS:
        stats, timings = personalize_user(CFG, user, UserStore(run_dir, user.user_id), base, base, tokenizer,
                                          model_hash(tiny_model_dir))
        results[user.user_id] = stats
        changed[user.user_id] = changed_weights(base, reference)
        assert set(timings) == {"train-k0-seconds", "evaluate-seconds"}  # CFG has no profile method
        assert all(seconds > 0 for seconds in timings.values())
    return {"dir": run_dir, "results": results, "changed": changed, "reference": reference}


# ----------------------------------------------------------------------------------------- isolation


def test_shared_base_is_unchanged_after_each_user(tiny, shared_run):
    base, _ = tiny
    for user_id, changed in shared_run["changed"].items():
        assert not changed, f"after user {user_id}: base weights changed: {changed[:3]}"
    assert not isinstance(base, PeftModel)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules()), "adapter layers left in the base"
    assert not any(p.requires_grad for p in base.parameters())
    assert not base.training


def test_adapter_of_a_later_user_does_not_depend_on_earlier_users(tiny_model_dir, tmp_path, shared_run):
    """User B trained after user A on the shared base == B trained alone on a freshly loaded base."""
    user_a, user_b = USERS[0], USERS[1]
    fresh, tokenizer = load_fresh(tiny_model_dir, "cpu"), load_base(tiny_model_dir, "cpu")[1]  # an unshared, just-loaded copy
    alone_results, _ = personalize_user(CFG, user_b, UserStore(tmp_path, user_b.user_id), fresh, fresh, tokenizer,
                                        model_hash(tiny_model_dir))
    alone = load_file(adapter_file(tmp_path, user_b))
    after_a = load_file(adapter_file(shared_run["dir"], user_b))
    assert alone and set(alone) == set(after_a)
    differing = [k for k in alone if not torch.equal(alone[k], after_a[k])]
    assert not differing, f"user B's adapter depends on what was trained before it: {differing[:3]}"
    assert alone_results == shared_run["results"][user_b.user_id]

    of_a = load_file(adapter_file(shared_run["dir"], user_a))
    assert set(of_a) == set(after_a)
    assert all(not torch.equal(of_a[k], after_a[k]) for k in of_a), "users A and B share adapter weights"


def test_second_variant_does_not_disturb_the_first(tiny, tiny_model_dir, tmp_path, shared_run):
    """Training the oppu+rag adapter after the oppu one leaves oppu's saved file and its results as alone."""
    base, tokenizer = tiny
    user = USERS[0]
    cfg = dataclasses.replace(CFG, methods="base,oppu,oppu+rag")
    reference = snapshot(base)
    stats, timings = personalize_user(cfg, user, UserStore(tmp_path, user.user_id), base, base, tokenizer,
                                      model_hash(tiny_model_dir))
    assert set(stats) == {"base", "oppu", "oppu+rag-k1", "ref-mode"}  # the reference row comes with every run
    assert set(timings) == {"train-k0-seconds", "train-k1-seconds", "evaluate-seconds"}
    single = shared_run["results"][user.user_id]
    assert stats["base"] == single["base"] and stats["oppu"] == single["oppu"]
    k0, k0_single = load_file(adapter_file(tmp_path, user)), load_file(adapter_file(shared_run["dir"], user))
    assert all(torch.equal(k0[k], k0_single[k]) for k in k0_single)
    k1 = load_file(adapter_file(tmp_path, user, "k1"))
    assert any(not torch.equal(k1[k], k0[k]) for k in k0)
    assert not changed_weights(base, reference)


# ------------------------------------------------------------------------------------ planted preference


def test_personal_adapters_learn_planted_preferences(shared_run):
    results = shared_run["results"].values()
    accuracy = {
        method: finalize(TASK, combine(r[method] for r in results))["accuracy"] for method in ("base", "oppu")
    }
    assert sum(r["oppu"]["n"] for r in results) == 4 * len(USERS)
    assert accuracy["oppu"] >= accuracy["base"] + 0.3, accuracy
    assert accuracy["oppu"] >= 0.75, accuracy


# ----------------------------------------------------------------------------------------------- store


def test_store_layout_and_adapters_load_with_peft(tiny_model_dir, shared_run):
    run_dir = shared_run["dir"]
    for user in USERS:
        adapters = run_dir / "clients" / user.user_id / "adapters"
        assert sorted(p.name for p in adapters.iterdir()) == [f"user-{user.user_id}-k0"], "stray staging dirs?"
        folder = adapters / f"user-{user.user_id}-k0"
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == CFG.lora_r
        assert set(config["target_modules"]) == {"q_proj", "v_proj"}

    # the saved adapter alone reproduces the user's oppu results on a fresh base
    user = USERS[1]
    fresh, tokenizer = load_fresh(tiny_model_dir, "cpu"), load_base(tiny_model_dir, "cpu")[1]
    model = PeftModel.from_pretrained(fresh, UserStore(run_dir, user.user_id).adapter(f"user-{user.user_id}-k0"))
    model.eval()
    saved = load_file(adapter_file(run_dir, user))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    prompts = query_prompts(user, TASK, tokenizer, CFG.prompt_settings(), None)
    predictions, _ = predict(model, tokenizer, TASK, prompts)
    assert statistics(TASK, predictions, [q.gold for q in user.queries]) == shared_run["results"][user.user_id]["oppu"]


# ---------------------------------------------------------------------------------------------- config


def test_method_names_resolve_rag_depth():
    assert RunConfig(methods="base,rag,oppu+rag").method_names() == ["base", "rag-k1", "oppu+rag-k1"]
    assert RunConfig(methods="rag, oppu + rag,rag-k1", k=3).method_names() == ["rag-k3", "oppu+rag-k3", "rag-k1"]
    assert RunConfig(methods="oppu,oppu,base").method_names() == ["oppu", "base"]


def test_parse_method():
    method = parse_method("oppu+rag-k2+pag")
    assert (method.personal, method.k, method.profile, method.variant) == (True, 2, True, "k2-pag")
    assert parse_method("base").personal is False and parse_method("base").variant == "k0"


@pytest.mark.parametrize("bad, part", [("oppu+rga", "rga"), ("rag-k0", "rag-k0"), ("oppu+rag-kx", "rag-kx")])
def test_parse_method_names_the_bad_part(bad, part):
    with pytest.raises(ValueError, match=f"unknown part '{part}'"):
        parse_method(bad)


def test_bad_methods_in_the_config_are_rejected():
    with pytest.raises(ValueError, match="'lora2'"):
        RunConfig(methods="base,lora2")
    with pytest.raises(ValueError, match="at least one method"):
        RunConfig(methods=" , ")


def test_from_record_round_trip_and_unknown_keys():
    assert RunConfig.from_record(CFG.to_record()) == CFG
    assert RunConfig.from_record({"personal-lr": "0.5", "rounds": 3}).personal_lr == 0.5
    with pytest.raises(ValueError, match="no-such-key"):
        RunConfig.from_record({"no-such-key": 1, "rounds": 2})
    with pytest.raises(ValueError, match="personal_lr"):
        RunConfig.from_record({"personal_lr": 0.1})  # the record's keys are kebab-case


# --------------------------------------------------------------------------------------------- profile


def test_profile_is_deterministic_and_cached(tiny, tiny_model_dir, tmp_path):
    base, tokenizer = tiny
    user, digest = USERS[0], model_hash(tiny_model_dir)

    def profile(cache_file, model_digest=digest):
        return user_profile(base, tokenizer, TASK, user, cache_file, model_digest, seed=0, sample_size=16, max_new_tokens=16)

    first_file, second_file = tmp_path / "a" / "profile.json", tmp_path / "b" / "profile.json"
    first, second = profile(first_file), profile(second_file)
    assert isinstance(first, str) and first == second
    stored = read_json(first_file)
    assert stored["profile"] == first and stored["key"]["model"] == digest

    mtime = first_file.stat().st_mtime_ns
    assert profile(first_file) == first
    assert first_file.stat().st_mtime_ns == mtime  # a cache hit does not write

    stored["profile"] = "EDITED: likes comedies"
    first_file.write_text(json.dumps(stored))
    assert profile(first_file) == "EDITED: likes comedies"  # served from the cache, not regenerated

    # another base model (hash) makes the cached profile stale: it is written again
    assert profile(first_file, "0" * 64) == first
    assert read_json(first_file) == {"key": {**stored["key"], "model": "0" * 64}, "profile": first}


def test_personalize_writes_the_profile_into_the_store(tiny, tiny_model_dir, tmp_path):
    base, tokenizer = tiny
    user, digest = USERS[2], model_hash(tiny_model_dir)
    cfg = dataclasses.replace(CFG, methods="pag")
    store = UserStore(tmp_path, user.user_id)
    stats, timings = personalize_user(cfg, user, store, base, base, tokenizer, digest)
    assert set(stats) == {"pag", "ref-mode"} and stats["pag"]["n"] == len(user.queries)
    assert set(timings) == {"profile-seconds", "evaluate-seconds"}  # no personal adapter: nothing trained
    stored = read_json(store.profile)
    key = dict(stored["key"])
    assert len(key.pop("history_sha256")) == 64  # a changed history makes a new profile
    assert key == {"model": digest, "task": "LaMP-2M", "seed": cfg.seed, "sample_size": cfg.profile_items,
                   "max_new_tokens": cfg.profile_max_tokens}
    assert isinstance(stored["profile"], str)
    assert not (store.root / "adapters").exists()  # no personal adapter for a non-personal method


# ------------------------------------------------------------------------------ task-adapted base


def test_task_adapted_base_owns_only_the_merged_weights(tiny, tiny_model_dir):
    """The merged base equals a merge into a freshly loaded copy, shares every untouched tensor, and leaves the base alone."""
    base, _ = tiny
    before = snapshot(base)
    state = {k: v + 0.05 for k, v in initial_task_state(base, CFG).items()}  # a task LoRA with nonzero B
    merged = task_adapted_base(tiny_model_dir, "cpu", CFG, state, "test-state")

    reference = attach_fresh(load_fresh(tiny_model_dir, "cpu"), task_lora(CFG), "task", 0)
    load_adapter_state(reference, "task", state)
    reference = reference.merge_and_unload()
    expected = dict(reference.named_parameters())
    base_params = dict(base.named_parameters())
    owned = set()
    for name, param in merged.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name
        if param.data_ptr() != base_params[name].data_ptr():
            owned.add(name)
    assert owned and all(name.split(".")[-2] in CFG.peft_settings().target_modules for name in owned)
    assert all(not torch.equal(merged.get_parameter(n), base_params[n]) for n in owned), "a copied weight is unchanged"
    assert not changed_weights(base, before), "building the merged base changed the shared base"
