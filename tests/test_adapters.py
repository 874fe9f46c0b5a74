"""PEFT modules: configs, seeded fresh adapters, state round-trips, and a shared base left clean."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from client.adapters import (
    adapter_state,
    attach_fresh,
    load_adapter_state,
    peft_config,
    personal_adapter_name,
    trainable_parameters,
)
from common.config import PeftSettings


def remove_adapters(model: PeftModel):
    """What the product does to take adapters out of the shared base again."""
    if model.active_peft_config.is_prompt_learning:
        return model.get_base_model()
    return model.unload()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    changed = [k for k, v in state.items() if not torch.equal(v, expected[k])]
    assert not changed, f"base weights changed: {changed[:3]}"


def adapter_params(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """Parameters of adapter `name` (peft puts the adapter name into each parameter's path)."""
    found = {k: p for k, p in model.named_parameters() if f".{name}." in k or k.endswith(f".{name}")}
    assert found, f"no parameters for adapter {name!r}"
    return found


def randomize(model: PeftModel, name: str, seed: int) -> None:
    """Give adapter `name` non-trivial weights (fresh LoRA is a no-op: B = 0; fresh IA3 is all ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_params(model, name).values():
            param.add_(0.2 * torch.randn(param.shape, generator=gen).to(param.dtype))


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "kind, config_type", [("lora", LoraConfig), ("ia3", IA3Config), ("prompt", PromptTuningConfig)]
)
def test_settings_give_the_right_peft_config(kind, config_type):
    config = peft_config(PeftSettings(kind=kind))
    assert type(config) is config_type
    assert config.task_type == "CAUSAL_LM"


def test_lora_config_carries_the_settings():
    config = peft_config(PeftSettings(kind="lora", r=4, alpha=32, target_modules=("q_proj", "k_proj", "v_proj")))
    assert config.r == 4 and config.lora_alpha == 32
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert config.lora_dropout == 0.0  # dropout would make training order-dependent on the RNG


def test_prompt_config_carries_the_length():
    assert peft_config(PeftSettings(kind="prompt", virtual_tokens=5)).num_virtual_tokens == 5


def test_bad_kind_is_rejected_with_the_allowed_kinds():
    with pytest.raises(ValueError, match=r"'qlora'.*lora, ia3, prompt"):
        PeftSettings(kind="qlora")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, text", [({"r": 0}, "r=0"), ({"r": -2}, "r=-2"), ({"virtual_tokens": 0}, "tokens=0")])
def test_bad_sizes_are_rejected(bad, text):
    with pytest.raises(ValueError, match=text):
        PeftSettings(**bad)


def test_personal_adapter_name():
    assert personal_adapter_name("42") == "user-42"
    assert personal_adapter_name("42", "k1-pag") == "user-42-k1-pag"


# ---------------------------------------------------------------------------------- seeded initialisation


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_same_seed_same_initial_weights(tiny, kind):
    base, _ = tiny
    settings = PeftSettings(kind=kind)
    first = attach_fresh(base, settings, "first", seed=7)
    try:
        state_a = adapter_state(first, "first")
        attach_fresh(first, settings, "second", seed=7)  # added to the same PeftModel, after "first"
        assert first.active_adapter == "second"
        state_b = adapter_state(first, "second")
    finally:
        remove_adapters(first)
    second = attach_fresh(base, settings, "first", seed=7)  # a fresh wrap of the (cleaned) base
    try:
        state_c = adapter_state(second, "first")
    finally:
        remove_adapters(second)
    assert state_a and set(state_a) == set(state_b) == set(state_c)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
        assert torch.equal(state_a[key], state_c[key]), key


@pytest.mark.parametrize("kind", ["lora", "prompt"])  # IA3 starts at all-ones whatever the seed
def test_different_seeds_differ(tiny, kind):
    base, _ = tiny
    settings = PeftSettings(kind=kind)
    model = attach_fresh(base, settings, "first", seed=1)
    try:
        attach_fresh(model, settings, "second", seed=2)
        state_a, state_b = adapter_state(model, "first"), adapter_state(model, "second")
    finally:
        remove_adapters(model)
    differing = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert differing, "seeds 1 and 2 gave identical adapters"


def test_only_the_new_adapter_trains(tiny):
    base, _ = tiny
    model = attach_fresh(base, PeftSettings(), "first", seed=1)
    try:
        attach_fresh(model, PeftSettings(), "second", seed=2)
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".second." in k for k in trainable), trainable[:4]
        assert 0 < trainable_parameters(model)[1] < 0.05
    finally:
        remove_adapters(model)


# ------------------------------------------------------------------------------------- state round trip


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_adapter_state_round_trip(tiny, kind):
    base, _ = tiny
    settings = PeftSettings(kind=kind)
    ids = torch.tensor([[1, 42, 314, 1592, 65, 35]])
    model = attach_fresh(base, settings, "src", seed=3)
    try:
        randomize(model, "src", seed=11)
        state = adapter_state(model, "src")
        assert all(v.dtype == torch.float32 for v in state.values())
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        attach_fresh(model, settings, "dst", seed=4)
        before = adapter_state(model, "dst")
        assert any(not torch.equal(before[k], state[k]) for k in state)
        load_adapter_state(model, "dst", state)
        after = adapter_state(model, "dst")
        assert set(after) == set(state)
        for key in state:
            assert torch.equal(after[key], state[key]), key
        with torch.no_grad():
            got = model(input_ids=ids).logits  # "dst" is active
        assert torch.equal(got, expected)
    finally:
        remove_adapters(model)


def test_adapter_state_is_a_snapshot_that_later_training_leaves_alone(tiny):
    base, _ = tiny  # float32 on the CPU: the conversion to float32 alone would hand out the live weights
    model = attach_fresh(base, PeftSettings(kind="lora"), "src", seed=3)
    try:
        state = adapter_state(model, "src")
        kept = {k: v.clone() for k, v in state.items()}
        randomize(model, "src", seed=11)
        assert all(torch.equal(state[k], kept[k]) for k in state)
        assert any(not torch.equal(adapter_state(model, "src")[k], kept[k]) for k in state)
    finally:
        remove_adapters(model)


def test_load_adapter_state_rejects_foreign_weights(tiny):
    base, _ = tiny
    model = attach_fresh(base, PeftSettings(), "first", seed=0)
    try:
        state = adapter_state(model, "first")
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_Z.weight"] = torch.zeros(2, 2)
        with pytest.raises(ValueError, match="unexpected weights"):
            load_adapter_state(model, "first", state)
    finally:
        remove_adapters(model)


# ------------------------------------------------------------------------------------ clean shared base


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_removing_adapters_leaves_the_shared_base_exactly_as_it_was(tiny, kind):
    base, _ = tiny
    reference = snapshot(base)
    ids = torch.tensor([[1, 42, 314, 1592, 65, 35]])
    with torch.no_grad():
        logits_before = base(input_ids=ids).logits
    model = attach_fresh(base, PeftSettings(kind=kind), "user", seed=5)
    randomize(model, "user", seed=6)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.equal(adapted, logits_before), "the adapter had no effect, so the test proves nothing"
    restored = remove_adapters(model)
    assert restored is base
    assert_same_state(base, reference)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, logits_before)
