"""bench.task_fedavg on the tiny model: the clients' data, Flower's weighted average, and both curves' points."""

from __future__ import annotations

import json

import pytest
import torch

from bench.task_ceiling import most_asked
from bench.task_fedavg import aggregate, freeze_lora_a, heaviest_raters, main, rater_examples, server_strategy
from client.adapters import adapter_state, attach_fresh
from client.data import load_movielens
from client.history import validation_view
from client.partition import split_users
from client.task_adapter import remove_adapters, task_lora
from client.training import train_adapter
from common.config import RunConfig, TrainingSettings, UserCounts
from common.tasks import get_task


def test_the_clients_are_the_heaviest_raters_with_one_example_per_rating(tiny):
    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(10, 0), RunConfig())
    outside = [u for u in users if u not in tests]
    movies = set(most_asked([validation_view(u, task, 5) for u in tests], 6))
    raters = heaviest_raters(outside, movies, 5)
    counts = [sum(item.id in movies for item in u.history) for u in raters]
    everyone = sorted((sum(item.id in movies for item in u.history) for u in outside), reverse=True)
    assert counts == everyone[:5]
    examples = rater_examples(raters[0], movies, tiny[1], RunConfig())
    assert len(examples) == counts[0]
    answers = [tiny[1].decode(e.answer, skip_special_tokens=True).strip() for e in examples]
    assert answers == [str(item.fields["score"]) for item in raters[0].history if item.id in movies]  # in order


def test_with_the_level_prompt_each_rating_is_asked_with_the_raters_level_before_it(tiny):
    """--level-prompt: the profile is the mean of the (up to 32) ratings before the rated item, never the item."""
    user = max(load_movielens(), key=lambda u: len(u.history))
    movies = {item.id for item in user.history[:40]}
    plain, leveled = (rater_examples(user, movies, tiny[1], RunConfig(), level) for level in (False, True))
    assert [e.answer for e in leveled] == [e.answer for e in plain]
    texts = [tiny[1].decode(e.prompt) for e in leveled]
    assert "User profile" not in texts[0]  # the first rating has no earlier one
    scores = [float(item.fields["score"]) for item in user.history]
    for i in (1, 5, 39):
        before = scores[max(0, i - 32): i]
        assert f"User profile: mean of the {len(before)} latest ratings {sum(before) / len(before):.1f}\n" in texts[i]
    assert all("User profile" not in tiny[1].decode(e.prompt) for e in plain)


def test_fedavg_is_the_example_weighted_mean_and_fedavgm_scales_the_update_with_momentum():
    start, one, two = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, 6.0])}
    plain = server_strategy(start, 1.0, 0.0)
    assert torch.allclose(aggregate(plain, 1, [one, two], [1, 3])["w"], torch.tensor([4.0, 5.0]))
    assert torch.allclose(aggregate(plain, 2, [one, two], [1, 1])["w"], torch.tensor([3.0, 4.0]))
    momentum = server_strategy(start, 2.0, 0.5)
    first = aggregate(momentum, 1, [one, two], [1, 1])["w"]  # update (3, 4) taken twice
    assert torch.allclose(first, torch.tensor([6.0, 8.0]))
    second = aggregate(momentum, 2, [{"w": first + 1}], [1])["w"]  # new update (1, 1); momentum 0.5 * (3, 4) + (1, 1)
    assert torch.allclose(second, first + 2 * torch.tensor([2.5, 3.0]))


def test_both_curves_start_alike_and_count_an_epoch_per_point(tiny, tmp_path):
    out = tmp_path / "fedavg.json"
    results = main(["--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--num-clients", "5",
                    "--asked-movies", "4", "--raters", "3", "--rounds", "2", "--out", str(out)])
    central, federated = results["curves"]["central"], results["curves"]["federated"]
    per_epoch = results["training"]["tokens_per_epoch"]
    assert [p["epoch"] for p in central] == [0, 1, 2] and [p["round"] for p in federated] == [0, 1, 2]
    assert [p["tokens"] for p in central] == [p["tokens"] for p in federated] == [0, per_epoch, 2 * per_epoch]
    assert central[0]["mae"] == federated[0]["mae"] and central[0]["corr"] == federated[0]["corr"]
    assert all(p["loss"] > 0 for p in central[1:] + federated[1:])
    assert results["training"]["clients"] == 3
    assert json.loads(out.read_text())["curves"] == results["curves"]
    assert not any("lora" in name for name, _ in tiny[0].named_modules())  # the shared base is left clean


def test_score_every_scores_every_nth_round_and_the_last(tiny, tmp_path):
    results = main(["--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--num-clients", "5",
                    "--asked-movies", "4", "--raters", "3", "--rounds", "3", "--score-every", "2", "--modes",
                    "federated", "--out", str(tmp_path / "every.json")])
    curve = results["curves"]["federated"]
    assert [p["round"] for p in curve] == [0, 2, 3]
    assert curve[2]["tokens"] == 3 * results["training"]["tokens_per_epoch"]


def test_with_lora_a_frozen_only_b_trains_and_a_stays_as_initialised(tiny, tmp_path):
    """--freeze-lora-a: every client shares A, so averaging the Bs averages the weight updates exactly."""
    results = main(["--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--num-clients", "5",
                    "--asked-movies", "4", "--raters", "3", "--rounds", "1", "--modes", "federated",
                    "--freeze-lora-a", "--out", str(tmp_path / "ffa.json")])
    assert [p["round"] for p in results["curves"]["federated"]] == [0, 1]
    model = attach_fresh(tiny[0], task_lora(RunConfig()), "probe", 0)
    try:
        before = adapter_state(model, "probe")
        freeze_lora_a(model)
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        assert trainable and all("lora_B" in name for name in trainable)
        user = load_movielens()[0]
        examples = rater_examples(user, {item.id for item in user.history[:4]}, tiny[1], RunConfig())
        train_adapter(model, examples, tiny[1].pad_token_id, TrainingSettings(lr=1e-2, max_batch_tokens=512), seed=0)
        after = adapter_state(model, "probe")
    finally:
        remove_adapters(model)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_bad_flags_are_refused(capsys):
    for argv, message in [(["--fraction-train", "0"], "--fraction-train 0.0: expected a share in (0, 1]"),
                          (["--modes", "both"], "expected central, federated or both"),
                          (["--raters", "0"], "--raters must be at least 1"),
                          (["--server-momentum", "1"], "server-lr must be > 0 and server-momentum in [0, 1), got 1.0 and 1.0")]:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
