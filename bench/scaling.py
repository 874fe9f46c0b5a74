"""Personal-adapter training time against history length and item length, as the OPPU paper's Figure 8.

    python -m bench.scaling                                   # SmolLM2, 1 thread, default sweeps
    python -m bench.scaling --items 10,50 --tokens 10,100 --out runs/bench/scaling.json --plot runs/bench/scaling.png

A synthetic MovieLens user whose history items each carry a movie text of exactly T tokens gets a fresh
LoRA (r=8 on q,v) trained for one epoch by `client.training.train_adapter`, as a personal adapter is in a
run (no retrieval, the run's dtype for this machine). Two sweeps:
- items: the number of history items N in --items, at --fixed-tokens tokens per item;
- tokens per item: T in --tokens, at --fixed-items items.
Each sweep gets a least-squares line seconds = a + b*x; b is the marginal cost of one more item (or of one
more token in every item), a the fixed cost. One untimed warm-up training runs first.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.common import (
    common_flags,
    finish,
    load_model,
    train_fresh_lora,
    training_flops,
)
from client.data import HistoryItem, User
from client.training import history_examples
from common.config import PromptSettings, TrainingSettings
from common.store import atomic_write_bytes
from common.tasks import RATINGS, get_task

TASK = "MovieLens"
SETTINGS = TrainingSettings(epochs=1, lr=1e-3, max_batch_tokens=512)  # the run's personal-training batch budget
CANDIDATE_WORDS = (
    "river night city robot family war love ship space winter school music king train secret storm letter "
    "doctor clock forest bridge house water light story world life time money power game road heart friend"
).split()


def one_token_words(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Words that are a single token both alone and after a space, so T of them joined by spaces are T tokens."""
    words = [w for w in CANDIDATE_WORDS
             if all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1 for text in (w, " " + w))]
    if len(words) < 2:
        raise ValueError("the tokenizer splits nearly every candidate word; synthetic items need other words")
    return words


def synthetic_user(tokenizer: PreTrainedTokenizerBase, items: int, tokens_per_item: int, seed: int) -> User:
    """A MovieLens user with `items` history items whose `movie` field is exactly `tokens_per_item` tokens.

    Words are drawn from a seeded generator, so every sweep point is reproducible. The movie text alone is
    T tokens; each training example adds a constant prompt overhead (instruction, "movie:", answer cue)
    and the answer (a score "1".."5" and EOS), so an example's length is T plus a constant.
    """
    if items < 1 or tokens_per_item < 1:
        raise ValueError(f"items and tokens per item must be >= 1, got {items} and {tokens_per_item}")
    words = one_token_words(tokenizer)
    rng = random.Random(seed)
    history = []
    for i in range(items):
        movie = " ".join(rng.choices(words, k=tokens_per_item))
        length = len(tokenizer(movie, add_special_tokens=False)["input_ids"])
        if length != tokens_per_item:
            raise AssertionError(f"synthetic movie text is {length} tokens, expected {tokens_per_item}")
        history.append(HistoryItem(id=f"s{i}", fields={"movie": movie, "score": rng.choice(RATINGS)}))
    return User(user_id=f"scaling-{items}x{tokens_per_item}", task=TASK, history=history)


def time_training(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, user: User) -> dict[str, float]:
    """One epoch of a fresh personal LoRA on the user's history; the base is left clean (adapter unloaded)."""
    examples = history_examples(user, get_task(TASK), tokenizer, PromptSettings(k=0))
    result = train_fresh_lora(model, examples, tokenizer.pad_token_id, SETTINGS, seed=0)
    flops = training_flops(model, int(result["tokens"]), sum(len(e.answer) for e in examples))
    return {
        "examples": len(examples), "steps": result["steps"], "tokens": result["tokens"],
        "seconds": result["seconds"], "tokens_per_s": result["tokens"] / result["seconds"],
        "model_gflops": flops / result["seconds"] / 1e9,
    }


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line ys = intercept + slope * xs and its R^2 (1 when ys do not vary and the fit is exact)."""
    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    predicted = intercept + slope * np.asarray(xs, dtype=float)
    residual = float(np.sum((np.asarray(ys) - predicted) ** 2))
    total = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - residual / total if total > 0 else 1.0}


def sweep(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, axis: str, values: list[int],
          fixed: int) -> dict[str, Any]:
    """Time training at each value of `axis` ('items' or 'tokens_per_item') with the other held at `fixed`."""
    points = []
    for value in values:
        items, tokens = (value, fixed) if axis == "items" else (fixed, value)
        points.append({"items": items, "tokens_per_item": tokens,
                       **time_training(model, tokenizer, synthetic_user(tokenizer, items, tokens, seed=0))})
    return {"axis": axis, "fixed": fixed, "points": points, "fit": fit(values, [p["seconds"] for p in points])}


def plot(path: Path, sweeps: list[dict[str, Any]]) -> None:
    """Both sweeps with their fitted lines side by side, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    labels = {"items": ("history items", "tokens per item"), "tokens_per_item": ("tokens per item", "items")}
    for ax, result in zip(figure.subplots(1, 2), sweeps):
        xs = np.array([p[result["axis"]] for p in result["points"]], dtype=float)
        line = result["fit"]
        ax.plot(xs, [p["seconds"] for p in result["points"]], "o", label="measured")
        ax.plot(xs, line["intercept"] + line["slope"] * xs, "-",
                label=f"fit: {line['slope']:.3g} s/unit, R²={line['r2']:.3f}")
        name, other = labels[result["axis"]]
        ax.set(xlabel=name, ylabel="training seconds (1 epoch)", title=f"{name} ({result['fixed']} {other})")
        ax.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def int_list(text: str) -> list[int]:
    """A comma-separated list of at least two distinct positive integers (a line needs two x values)."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if len(set(values)) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need two or more distinct positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(parser)
    parser.add_argument("--items", type=int_list, default=[10, 25, 50, 100], help="history lengths of the items sweep")
    parser.add_argument("--tokens", type=int_list, default=[10, 25, 50, 100],
                        help="tokens per item of the tokens sweep")
    parser.add_argument("--fixed-items", type=int, default=50, help="history length during the tokens sweep")
    parser.add_argument("--fixed-tokens", type=int, default=50, help="tokens per item during the items sweep")
    parser.add_argument("--plot", type=Path, default=None, help="also draw both sweeps and their fits into this PNG")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args, "auto")
    time_training(model, tokenizer, synthetic_user(tokenizer, min(args.items), args.fixed_tokens, seed=0))  # warm-up
    sweeps = [sweep(model, tokenizer, "items", args.items, args.fixed_tokens),
              sweep(model, tokenizer, "tokens_per_item", args.tokens, args.fixed_items)]
    if args.plot:
        plot(args.plot, sweeps)
    table = [
        f"{args.model}, {str(model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s), 1 epoch",
        "| items | tokens/item | examples | steps | tokens | seconds | tokens/s | model GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {p['items']} | {p['tokens_per_item']} | {p['examples']} | {p['steps']:.0f} | {p['tokens']:.0f} | "
          f"{p['seconds']:.2f} | {p['tokens_per_s']:.0f} | {p['model_gflops']:.1f} |" for s in sweeps for p in s["points"]),
        "",
        "| sweep | held fixed | slope (s per unit) | intercept (s) | R^2 |",
        "|---|---|---|---|---|",
        *(f"| {s['axis']} | {s['fixed']} | {s['fit']['slope']:.4f} | {s['fit']['intercept']:.3f} | {s['fit']['r2']:.4f} |"
          for s in sweeps),
    ]
    settings = {"model": args.model, "dtype": str(model.dtype).removeprefix("torch."), "epochs": SETTINGS.epochs,
                "max_batch_tokens": SETTINGS.max_batch_tokens, "peft": "lora r=8 q,v"}
    return finish(args, {"settings": settings, "sweeps": {s["axis"]: s for s in sweeps}}, table)


if __name__ == "__main__":
    main()
