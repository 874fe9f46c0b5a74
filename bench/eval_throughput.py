"""Evaluation throughput: our batched evaluation against the reference OPPU code's inference, on the same prompts.

The reference (the official OPPU repository) predicts one prompt at a time: the prompt as a string,
re-tokenized, sampled (top-k 10, temperature 0.1, top-p 0.9) for up to 200 new tokens, decoded together with
the prompt and the prompt string-replaced away. Ours scores label tasks in one forward (`predict`) and
decodes generation tasks greedily, batched with the KV cache (`generate`). Two workloads:

- classification: MovieLens rating queries (labels 1..5, k=1 retrieved item) of the first test users;
  besides speed it reports how often the reference's text is a valid label ("valid_share");
- generation: LaMP-4-style headline prompts. There is no LaMP text offline, so each article is built from a
  real MovieLens user: the `item_text` of the user's latest 12 history items, oldest first, joined by "; ".

Both ways run on the same base, in the dtype a run picks on this machine (`client.model.pick_dtype`).
Figures are seconds of wall time on this machine at --threads, both ways in one run; the reference's
"new tokens" are the sampled ids up to and including EOS, ours are 0 for scoring (nothing is generated) and,
for generation, the re-tokenized output text plus the EOS where it stopped early, capped at the limit (an
estimate: `generate` returns text).

Run from the repository root:
    python -m bench.eval_throughput [--model smollm2] [--threads 1] [--prompts 20] [--generation-prompts 8]
                                    [--out results.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.common import common_flags, finish, load_model, test_users
from client.data import User
from client.evaluate import generate, predict, query_prompts
from client.prompts import build_prompt
from common.config import PromptSettings
from common.tasks import get_task

REFERENCE_MAX_NEW_TOKENS = 200
ARTICLE_ITEMS = 12  # history items per synthetic LaMP-4 article


@torch.inference_mode()
def reference_predictions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids_list: Sequence[list[int]]
) -> tuple[list[str], list[int]]:
    """The reference code's inference, prompt by prompt: (predicted texts, new tokens each, up to and incl. EOS)."""
    torch.manual_seed(0)
    texts, counts = [], []
    for ids in prompt_ids_list:
        prompt = tokenizer.decode(ids)
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(
            **inputs, do_sample=True, top_k=10, temperature=0.1, top_p=0.9,
            max_new_tokens=REFERENCE_MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        texts.append(tokenizer.batch_decode(out, skip_special_tokens=True)[0].replace(prompt, "").strip())
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        counts.append(new.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new else len(new))
    return texts, counts


def _timed(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def _way(prompts: int, seconds: float, new_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"seconds": round(seconds, 3), "prompts_per_s": round(prompts / seconds, 3), "new_tokens": new_tokens,
            **extra}


def _compare(prompts: Sequence[list[int]], ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompts": len(prompts), "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "ours": ours, "reference": reference, "speedup": round(reference["seconds"] / ours["seconds"], 2),
    }


def _valid_share(outputs: Sequence[str], labels: Sequence[str]) -> float:
    """Share of outputs that are exactly a label after strip: what a reference-style parser can score."""
    return round(sum(o.strip() in labels for o in outputs) / len(outputs), 3)


def _warm_up(model: PreTrainedModel, ids: list[int]) -> None:
    """One forward before any timing, so neither way pays the first call's one-time costs."""
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids], device=model.device))


def classification(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int) -> dict[str, Any]:
    """MovieLens rating of the first `n` queries of the test users: label scoring vs the reference's sampling."""
    task = get_task("MovieLens")
    prompts: list[list[int]] = []
    for user in test_users(n):  # every user has at least one query, so n users always suffice
        prompts += query_prompts(user, task, tokenizer, PromptSettings(k=1), None)[: n - len(prompts)]
        if len(prompts) == n:
            break
    _warm_up(model, prompts[0])
    ours, ours_s = _timed(lambda: predict(model, tokenizer, task, prompts)[0])
    (texts, counts), ref_s = _timed(lambda: reference_predictions(model, tokenizer, prompts))
    return _compare(
        prompts,
        _way(len(prompts), ours_s, 0, valid_share=_valid_share(ours, task.labels)),
        _way(len(prompts), ref_s, sum(counts), valid_share=_valid_share(texts, task.labels),
             max_new_tokens=max(counts)),
    )


def headline_prompts(tokenizer: PreTrainedTokenizerBase, users: Sequence[User]) -> list[list[int]]:
    """One LaMP-4 prompt per user; the article is the user's latest MovieLens items (see the module docstring)."""
    movielens, lamp4 = get_task("MovieLens"), get_task("LaMP-4")
    prompts = []
    for user in users:
        article = "; ".join(movielens.item_text(item.fields) for item in user.history[-ARTICLE_ITEMS:])
        prompts.append(build_prompt(lamp4, tokenizer, lamp4.question_template.format(text=article), [], None, 384).ids)
    return prompts


def generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int) -> dict[str, Any]:
    """Headline generation for `n` users: our greedy batched decoding vs the reference's one-by-one sampling."""
    lamp4 = get_task("LaMP-4")
    prompts = headline_prompts(tokenizer, test_users(n))
    _warm_up(model, prompts[0])
    ours, ours_s = _timed(lambda: generate(model, tokenizer, prompts, lamp4.max_new_tokens))
    # re-tokenized text + the EOS where it stopped early, capped at the limit (re-tokenizing may split differently)
    ours_tokens = [min(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1, lamp4.max_new_tokens)
                   for text in ours]
    (_, counts), ref_s = _timed(lambda: reference_predictions(model, tokenizer, prompts))
    return _compare(
        prompts,
        _way(len(prompts), ours_s, sum(ours_tokens), max_new_tokens=lamp4.max_new_tokens),
        _way(len(prompts), ref_s, sum(counts), max_new_tokens=max(counts)),
    )


def _table(results: dict[str, Any]) -> list[str]:
    rows = [
        f"{results['model']} in {results['dtype']} (both ways)",
        "| workload | way | prompts | seconds | prompts/s | new tokens | valid share | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in ("classification", "generation"):
        r = results[workload]
        for way in ("reference", "ours"):
            w = r[way]
            rows.append(
                f"| {workload} | {way} | {r['prompts']} | {w['seconds']:.2f} | {w['prompts_per_s']:.2f} | "
                f"{w['new_tokens']} | {w.get('valid_share', '')} | {r['speedup'] if way == 'ours' else 1.0:.2f}x |"
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both workloads, print the table and JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_flags(parser)
    parser.add_argument("--prompts", type=int, default=20, help="MovieLens rating prompts (classification)")
    parser.add_argument("--generation-prompts", type=int, default=8, help="LaMP-4-style headline prompts")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args, "auto")  # the dtype a run would pick here; both ways share it
    results = {
        "model": args.model, "dtype": str(model.dtype).removeprefix("torch."),
        "classification": classification(model, tokenizer, args.prompts),
        "generation": generation(model, tokenizer, args.generation_prompts),
    }
    return finish(args, results, _table(results))


if __name__ == "__main__":
    main()
