"""The training benchmark compares like with like: same examples, same objective, same FLOP count."""

from __future__ import annotations

import random

import torch

from bench.common import linear_params, training_flops
from bench.train_throughput import NAIVE_BATCH, naive_batches
from client.forward import answer_logprobs
from client.training import Example


def examples(count: int) -> list[Example]:
    rng = random.Random(0)
    return [Example([rng.randrange(10, 500) for _ in range(rng.randrange(3, 20))],
                    [rng.randrange(10, 500) for _ in range(rng.randrange(1, 4))] + [2]) for _ in range(count)]


def test_naive_batches_pad_to_a_multiple_of_8_and_label_only_answers(tiny):
    _, tokenizer = tiny
    data = examples(20)
    batches = naive_batches(data, tokenizer.pad_token_id, random.Random(0))
    assert [len(b["input_ids"]) for b in batches] == [NAIVE_BATCH, 20 - NAIVE_BATCH]
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == sum(len(e.answer) for e in data)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e.prompt) + len(e.answer) for e in data)


def test_naive_loss_equals_our_answer_loss_on_the_same_rows(tiny_model_dir):
    from client.model_loading import load_fresh

    model = load_fresh(tiny_model_dir, "cpu", "float32")
    data = examples(NAIVE_BATCH)
    batch = naive_batches(data, 0, random.Random(0))[0]
    with torch.no_grad():
        naive = model(**batch, use_cache=False).loss
        order = [next(i for i, e in enumerate(data) if torch.equal(
            batch["input_ids"][r, batch["attention_mask"][r].bool()], torch.tensor(e.prompt + e.answer)))
            for r in range(len(data))]
        logprobs, mask = answer_logprobs(model, [data[i].prompt for i in order], [data[i].answer for i in order], 0)
    assert torch.allclose(naive, -(logprobs * mask).sum() / mask.sum(), atol=1e-4)


def test_training_flops_count_the_frozen_linear_weights_and_the_scored_head(tiny):
    model, _ = tiny
    cfg = model.config
    per_layer = 2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * (
        cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads) + 3 * cfg.hidden_size * cfg.intermediate_size
    body, head = linear_params(model)
    assert body == cfg.num_hidden_layers * per_layer
    assert head == cfg.vocab_size * cfg.hidden_size
    assert training_flops(model, tokens=10, answer_tokens=2) == 4 * body * 10 + 4 * head * 2


def test_matmuls_alone_counts_each_product_of_the_work_and_times_it_again() -> None:
    from bench.common import matmuls_alone

    x, w = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(48, 32, dtype=torch.bfloat16)
    batched = torch.randn(2, 8, 8)

    def work() -> None:
        for _ in range(3):
            torch.nn.functional.linear(x, w)  # a transposed weight, as every frozen layer's forward
        x.float() @ w.float().t()
        torch.bmm(batched, batched)
        x + 1  # not a product

    floor = matmuls_alone(work)
    assert floor["matmul_calls"] == 5
    assert 0 < floor["matmul_seconds_alone"] < 1 and 0 < floor["matmul_seconds_in_loop"] < 1
    assert matmuls_alone(lambda: (work(), work()))["matmul_calls"] == 10
