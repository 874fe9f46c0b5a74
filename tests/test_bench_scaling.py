"""The scaling benchmark builds items of the asked length, fits lines exactly, and sweeps end to end."""

from __future__ import annotations

import json

import pytest

from bench.scaling import fit, main, synthetic_user


def test_synthetic_items_have_exactly_the_asked_tokens(tiny):
    tokenizer = tiny[1]
    for tokens in (1, 7, 50):
        user = synthetic_user(tokenizer, 5, tokens, seed=3)
        assert len(user.history) == 5 and user.task == "MovieLens"
        for item in user.history:
            assert len(tokenizer(item.fields["movie"], add_special_tokens=False)["input_ids"]) == tokens
            assert item.fields["score"] in {"1", "2", "3", "4", "5"}
    assert synthetic_user(tokenizer, 3, 5, seed=1) == synthetic_user(tokenizer, 3, 5, seed=1)


def test_fit_recovers_an_exact_line():
    xs = [1.0, 2.0, 5.0, 10.0]
    result = fit(xs, [2 + 3 * x for x in xs])
    assert result["slope"] == pytest.approx(3)
    assert result["intercept"] == pytest.approx(2)
    assert result["r2"] == pytest.approx(1)


def test_main_sweeps_both_axes(tiny_model_dir, tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    results = main(["--model", "tiny-random", "--items", "2,4,6", "--tokens", "5,10", "--fixed-items", "3",
                    "--fixed-tokens", "5", "--out", str(out), "--plot", str(png)])
    assert json.loads(out.read_text()) == results
    assert png.read_bytes().startswith(b"\x89PNG")
    items, tokens = results["sweeps"]["items"], results["sweeps"]["tokens_per_item"]
    assert [p["items"] for p in items["points"]] == [2, 4, 6]
    assert [p["tokens_per_item"] for p in tokens["points"]] == [5, 10]
    assert all(p["tokens_per_item"] == 5 for p in items["points"])
    assert all(p["items"] == 3 and p["examples"] == 3 for p in tokens["points"])
    trained = [p["tokens"] for p in items["points"]]
    assert trained == sorted(set(trained))  # strictly increasing with the history length
    # one more token in each of 3 items is 3 more trained tokens per epoch
    assert tokens["points"][1]["tokens"] - tokens["points"][0]["tokens"] == 3 * 5
    for sweep in (items, tokens):
        assert set(sweep["fit"]) == {"slope", "intercept", "r2"}
        assert all(p["seconds"] > 0 and p["tokens_per_s"] > 0 for p in sweep["points"])
