"""Training examples, length batching, the answer-only forward pass and the adapter training loop."""

from __future__ import annotations

import math
import random

import pytest
import torch
from peft import PeftModel

from client.adapters import attach_fresh
from client.data import HistoryItem, User, synthetic_users
from client.evaluate import generate, label_probabilities
from client.forward import answer_logprobs, left_pad
from client.model_loading import load_base
from client.prompts import HISTORY_HEADER
from client.training import (
    Example,
    history_examples,
    length_batches,
    query_examples,
    train_adapter,
)
from common.config import PeftSettings, PromptSettings, TrainingSettings
from common.tasks import get_task

TASK = get_task("LaMP-2M")


def remove_adapters(model: PeftModel):
    if model.active_peft_config.is_prompt_learning:
        return model.get_base_model()
    return model.unload()


# ------------------------------------------------------------------------------------------ batching


def check_batches(lengths: list[int], budget: int, batches: list[list[int]]) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    for batch in batches:
        assert batch
        if len(batch) > 1:
            assert max(lengths[i] for i in batch) * len(batch) <= budget, (batch, [lengths[i] for i in batch])
    # batches are runs of the length-sorted order: their length ranges overlap at most at one value
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    for (_, high), (low, _) in zip(spans, spans[1:]):
        assert high <= low, spans


@pytest.mark.parametrize("seed", range(6))
def test_length_batches_respect_the_budget_and_cover_each_index_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(5, 300) for _ in range(rng.randint(1, 80))]
    budget = rng.choice([256, 512, 2048])
    batches = length_batches(lengths, budget, random.Random(seed))
    check_batches(lengths, budget, batches)


def test_length_batches_fill_batches_greedily():
    lengths = [10] * 10
    batches = length_batches(lengths, 40, random.Random(0))
    assert sorted(len(b) for b in batches) == [2, 4, 4]


def test_an_oversized_example_gets_a_batch_of_its_own():
    lengths = [1000, 10, 12, 11, 999]
    batches = length_batches(lengths, 256, random.Random(1))
    check_batches(lengths, 256, batches)
    assert [0] in batches and [4] in batches
    assert sorted(sorted(b) for b in batches if 0 not in b and 4 not in b) == [[1, 2, 3]]


def test_length_batches_order_depends_on_the_rng_only():
    lengths = [random.Random(3).randint(5, 200) for _ in range(50)]
    assert length_batches(lengths, 256, random.Random(9)) == length_batches(lengths, 256, random.Random(9))


def test_each_epoch_covers_every_example_once():
    """Several epochs drawn from one rng (as train_adapter does): each is a full permutation."""
    lengths = [random.Random(4).randint(5, 200) for _ in range(40)]
    rng = random.Random(2)
    epochs = [length_batches(lengths, 512, rng) for _ in range(3)]
    for batches in epochs:
        check_batches(lengths, 512, batches)
    assert epochs[0] != epochs[1]  # a new order each epoch


# ----------------------------------------------------------------------------------- answer log-probs


@pytest.fixture(scope="module")
def fp32(tiny_model_dir):
    """A float32 copy of the tiny base, for exact comparisons."""
    return load_base(tiny_model_dir, "cpu", "float32")


PROMPTS = [[1, 504, 2378, 314, 9023, 28, 1030, 44, 87, 12], [1, 77, 1592], [1, 4390, 600, 35, 22, 19]]
ANSWERS = [[412, 2], [3250, 18, 990, 2], [2]]


def naive_answer_logprob_sums(model, prompts, answers) -> list[float]:
    """Each row alone, no padding, logits for every position: sum of the answer tokens' log-probs."""
    sums = []
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        sums.append(sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer)))
    return sums


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, multiple_of=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_forward_pads_a_batch_only_to_its_longest_row(fp32):
    """Padding is computed for nothing: a batch is as wide as its longest row (kernel caches bound the shapes)."""
    model, tokenizer = fp32
    batches = [PROMPTS, PROMPTS[1:2], [p + [9] * extra for p, extra in zip(PROMPTS, (3, 11, 20))]]
    widths = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            for rows in batches:
                answer_logprobs(model, rows, ANSWERS[: len(rows)], tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert widths == [max(len(p) + len(a) for p, a in zip(rows, ANSWERS)) for rows in batches]
    assert len(set(widths)) == 3


def test_answer_mask_has_one_entry_per_answer_token(fp32):
    model, tokenizer = fp32
    with torch.no_grad():
        logprobs, mask = answer_logprobs(model, PROMPTS, ANSWERS, tokenizer.pad_token_id)
    k = max(len(a) for a in ANSWERS)
    assert logprobs.shape == mask.shape == (len(PROMPTS), k)
    assert mask.sum(-1).tolist() == [len(a) for a in ANSWERS]
    for row, answer in enumerate(ANSWERS):  # the answer is right-aligned: the ones are the last len(answer)
        assert mask[row].tolist() == [False] * (k - len(answer)) + [True] * len(answer)
    assert (logprobs <= 0).all()


def test_answer_logprobs_match_a_full_forward_pass(fp32):
    """The batched, left-padded, last-K-logits computation equals scoring each row on its own."""
    model, tokenizer = fp32
    with torch.no_grad():
        logprobs, mask = answer_logprobs(model, PROMPTS, ANSWERS, tokenizer.pad_token_id)
    got = (logprobs * mask).sum(-1).tolist()
    expected = naive_answer_logprob_sums(model, PROMPTS, ANSWERS)
    assert got == pytest.approx(expected, abs=1e-4)


def test_vocabulary_head_reads_a_contiguous_block(fp32):
    """The head gets [B, K+1, H] as one contiguous tensor: a strided slice of the last positions makes torch
    copy the whole vocabulary matrix once per row (a batched matmul), 38x slower in bf16."""
    model, tokenizer = fp32
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            answer_logprobs(model, PROMPTS, ANSWERS, tokenizer.pad_token_id)
    finally:
        hook.remove()
    k = max(len(a) for a in ANSWERS)
    assert [tuple(x.shape[:2]) for x in seen] == [(len(PROMPTS), k + 1)]
    assert seen[0].is_contiguous()


def test_prompt_tokens_condition_but_are_not_scored(fp32):
    model, tokenizer = fp32
    changed = [list(p) for p in PROMPTS]
    changed[0][3] = 4711
    with torch.no_grad():
        before, mask_before = answer_logprobs(model, PROMPTS, ANSWERS, tokenizer.pad_token_id)
        after, mask_after = answer_logprobs(model, changed, ANSWERS, tokenizer.pad_token_id)
    assert torch.equal(mask_before, mask_after)
    assert not torch.allclose(before[0][mask_before[0]], after[0][mask_after[0]])  # the prompt conditions row 0
    for row in (1, 2):  # other rows are untouched by row 0's prompt
        assert torch.allclose(before[row][mask_before[row]], after[row][mask_after[row]], atol=1e-5)


@pytest.mark.parametrize("kind", [None, "lora", "ia3", "prompt"])
def test_left_padding_does_not_change_a_rows_logprobs(fp32, kind):
    """Each row scored inside a padded batch equals the row scored alone (float32: up to rounding)."""
    base, tokenizer = fp32
    model = base
    if kind is not None:
        model = attach_fresh(base, PeftSettings(kind=kind), "user", seed=3)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # non-trivial adapter weights (fresh LoRA is the identity)
            for param in (p for p in model.parameters() if p.requires_grad):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    try:
        with torch.no_grad():
            batch, mask = answer_logprobs(model, PROMPTS, ANSWERS, tokenizer.pad_token_id)
            for row in range(len(PROMPTS)):
                alone, alone_mask = answer_logprobs(model, PROMPTS[row : row + 1], ANSWERS[row : row + 1],
                                                    tokenizer.pad_token_id)
                assert torch.allclose(batch[row][mask[row]], alone[0][alone_mask[0]], atol=1e-4), (
                    f"row {row}: {batch[row][mask[row]].tolist()} != {alone[0][alone_mask[0]].tolist()}"
                )
    finally:
        if kind is not None:
            remove_adapters(model)


def test_left_padding_in_the_shared_bf16_base(tiny):
    model, tokenizer = tiny
    with torch.no_grad():
        batch, mask = answer_logprobs(model, PROMPTS, ANSWERS, tokenizer.pad_token_id)
        for row in range(len(PROMPTS)):
            alone, alone_mask = answer_logprobs(model, PROMPTS[row : row + 1], ANSWERS[row : row + 1],
                                                tokenizer.pad_token_id)
            assert torch.allclose(batch[row][mask[row]], alone[0][alone_mask[0]], atol=0.05)


# ------------------------------------------------------------------------------------------- examples

MARKERS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


@pytest.fixture(scope="module")
def marked_user() -> User:
    """Each item's description has its own marker word, and its tag (the answer) is unique too."""
    history = [
        HistoryItem(id=f"h{i}", fields={"description": f"{m} river night city", "tag": f"{m.upper()}TAG"},
                    date=f"2020-01-{i + 1:02d}")
        for i, m in enumerate(MARKERS)
    ]
    return User(user_id="marked", task="LaMP-2M", history=history)


def test_history_examples_never_see_the_item_itself_or_later_items(tiny, marked_user):
    _, tokenizer = tiny
    examples = history_examples(marked_user, TASK, tokenizer, PromptSettings(k=2))
    assert len(examples) == len(MARKERS)
    for i, example in enumerate(examples):
        prompt = tokenizer.decode(example.prompt)
        answer = tokenizer.decode(example.answer, skip_special_tokens=True)
        assert answer == f"{MARKERS[i].upper()}TAG"
        assert example.answer[-1] == tokenizer.eos_token_id
        assert prompt.count(MARKERS[i]) == 1, f"item {i}: its own item was retrieved into its prompt"
        assert f"{MARKERS[i].upper()}TAG" not in prompt, f"item {i}: its answer is in its prompt"
        later = [m for m in MARKERS[i + 1 :] if m in prompt or f"{m.upper()}TAG" in prompt]
        assert not later, f"item {i}: later items {later} leaked into its prompt"
        earlier = [m for m in MARKERS[:i] if f"{m.upper()}TAG" in prompt]
        assert len(earlier) == min(2, i), f"item {i}: retrieved {earlier}"
        assert (HISTORY_HEADER.strip() in prompt) == (i > 0)


def test_history_examples_without_retrieval_and_with_max_items(tiny, marked_user):
    _, tokenizer = tiny
    plain = history_examples(marked_user, TASK, tokenizer, PromptSettings(k=0))
    assert all(HISTORY_HEADER.strip() not in tokenizer.decode(e.prompt) for e in plain)
    latest = history_examples(marked_user, TASK, tokenizer, PromptSettings(k=2), max_items=4)
    assert [tokenizer.decode(e.answer, skip_special_tokens=True) for e in latest] == [
        f"{m.upper()}TAG" for m in MARKERS[-4:]
    ]
    full = history_examples(marked_user, TASK, tokenizer, PromptSettings(k=2))
    assert latest == full[-4:]  # the window changes which items train, not what they may retrieve


def test_query_examples_use_the_gold(tiny):
    _, tokenizer = tiny
    user = synthetic_users(1, history_len=6, num_queries=3)[0]
    examples = query_examples(user, TASK, tokenizer, PromptSettings(k=1))
    assert [tokenizer.decode(e.answer, skip_special_tokens=True) for e in examples] == [q.gold for q in user.queries]


# ------------------------------------------------------------------------------------------- training


def mean_answer_loss(model, examples: list[Example], pad_id: int) -> float:
    with torch.no_grad():
        logprobs, mask = answer_logprobs(model, [e.prompt for e in examples], [e.answer for e in examples], pad_id)
    return (-(logprobs * mask).sum() / mask.sum()).item()


def test_train_adapter_learns_a_planted_preference_and_leaves_the_base_alone(tiny):
    base, tokenizer = tiny
    user = synthetic_users(1, history_len=24)[0]
    examples = history_examples(user, TASK, tokenizer, PromptSettings())
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach_fresh(base, PeftSettings(), "user-planted", seed=0)
    try:
        before = mean_answer_loss(model, examples, tokenizer.pad_token_id)
        settings = TrainingSettings(epochs=4, lr=1e-2, max_batch_tokens=256)
        result = train_adapter(model, examples, tokenizer.pad_token_id, settings, seed=0)
        after = mean_answer_loss(model, examples, tokenizer.pad_token_id)
        assert not model.training
    finally:
        remove_adapters(model)
    lengths = [len(e.prompt) + len(e.answer) for e in examples]
    assert result["steps"] == 4 * len(length_batches(lengths, 256, random.Random(0)))
    assert result["tokens"] == 4 * sum(lengths)
    assert math.isfinite(result["loss"]) and result["final_loss"] < result["loss"]
    assert after < 0.5 * before, (before, after)
    state = base.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_train_adapter_step_plan(tiny):
    base, tokenizer = tiny
    user = synthetic_users(1, history_len=8)[0]
    examples = history_examples(user, TASK, tokenizer, PromptSettings())
    lengths = [len(e.prompt) + len(e.answer) for e in examples]
    per_epoch = len(length_batches(lengths, 256, random.Random(0)))
    assert per_epoch > 1
    model = attach_fresh(base, PeftSettings(), "user-steps", seed=0)
    try:
        half = train_adapter(model, examples, tokenizer.pad_token_id, TrainingSettings(1.5, 0.0, 256), seed=1)
        capped = train_adapter(model, examples, tokenizer.pad_token_id, TrainingSettings(3, 0.0, 256, 2), seed=1)
        with pytest.raises(ValueError, match="no training examples"):
            train_adapter(model, [], tokenizer.pad_token_id, TrainingSettings(), seed=1)
    finally:
        remove_adapters(model)
    assert half["steps"] == per_epoch + max(1, round(0.5 * per_epoch))
    assert capped["steps"] == 2


def test_a_diverged_adapter_is_an_error_not_a_result(tiny):
    """A NaN loss (as fused attention gave on CUDA) stops training with the step named, before a NaN update leaves."""
    base, tokenizer = tiny
    user = synthetic_users(1, history_len=8)[0]
    examples = history_examples(user, TASK, tokenizer, PromptSettings())
    model = attach_fresh(base, PeftSettings(), "user-nan", seed=0)
    try:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(1.0)
        with pytest.raises(FloatingPointError, match=r"user nan: training loss nan at step 1 of \d+"):
            train_adapter(model, examples, tokenizer.pad_token_id, TrainingSettings(1, 1e-3, 256), seed=1,
                          desc="user nan")
    finally:
        remove_adapters(model)


# ---------------------------------------------------------------------- consumers of the forward pass


def test_label_probabilities_are_the_renormalised_sequence_likelihoods(fp32):
    model, tokenizer = fp32
    labels = ("comedy", "based on a book", "sci-fi", "twist ending")
    prompts = [PROMPTS[0], PROMPTS[2]]
    probabilities = label_probabilities(model, tokenizer, labels, prompts, max_rows=3)  # chunks cut across prompts
    eos = [tokenizer.eos_token_id]
    candidates = [tokenizer(label, add_special_tokens=False)["input_ids"] + eos for label in labels]
    for prompt, row in zip(prompts, probabilities):
        sums = torch.tensor(naive_answer_logprob_sums(model, [prompt] * len(labels), candidates), dtype=torch.float64)
        assert row == pytest.approx(sums.softmax(-1).tolist(), abs=1e-4)
        assert sum(row) == pytest.approx(1.0)


def test_batched_greedy_generation_equals_one_at_a_time(fp32):
    model, tokenizer = fp32
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert any(batched)
