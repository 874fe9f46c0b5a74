"""Training examples from a user's data and the adapter training loop (loss on answer tokens only)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from client.data import User
from client.forward import answer_logprobs
from client.prompts import build_prompt
from client.retrieval import HistoryRetriever
from common.config import PromptSettings, TrainingSettings
from common.tasks import TaskSpec


@dataclass(frozen=True)
class Example:
    """A prompt and the answer tokens the model must learn to produce after it (ending with EOS)."""

    prompt: list[int]
    answer: list[int]


def _answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str, limit: int) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"][:limit] + [tokenizer.eos_token_id]


def history_examples(
    user: User,
    task: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    settings: PromptSettings,
    profile: str | None = None,
    max_items: int | None = None,
) -> list[Example]:
    """One example per history item (the latest `max_items`); item i retrieves only from items before i.

    With `settings.history_format` 'input' or 'output' the prompt is the context (profile, retrieved items,
    found with the item's question as in 'both') and the answer cue, and the loss covers that one side.
    """
    retriever = HistoryRetriever(task, user.history)
    first = 0 if max_items is None else max(0, len(user.history) - max_items)
    # an item's input is as long as a question may be, so it is cut at the prompt budget, not the answer's
    limit = settings.max_prompt_tokens if settings.history_format == "input" else settings.max_answer_tokens
    examples = []
    for i in range(first, len(user.history)):
        question = task.item_example(user.history[i].fields)[0]
        retrieved = retriever.top_k(question, settings.k, before=i)
        shown, target = task.item_target(user.history[i].fields, settings.history_format)
        prompt = build_prompt(
            task, tokenizer, shown, retrieved, profile if settings.use_profile else None,
            settings.max_prompt_tokens,
        )
        examples.append(Example(prompt.ids, _answer_ids(tokenizer, target, limit)))
    return examples


def query_examples(
    user: User, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, settings: PromptSettings
) -> list[Example]:
    """A (training) user's queries with their golds, retrieving from the whole (earlier) history."""
    retriever = HistoryRetriever(task, user.history)
    return [
        Example(
            build_prompt(task, tokenizer, q.input, retriever.top_k(q.input, settings.k), None,
                         settings.max_prompt_tokens).ids,
            _answer_ids(tokenizer, q.gold, settings.max_answer_tokens),
        )
        for q in user.queries
    ]


def length_batches(lengths: list[int], max_batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length (little padding), each batch within the token budget, in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > max_batch_tokens:  # sorted: lengths[i] is the max
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def train_adapter(
    model: PeftModel,
    examples: list[Example],
    pad_id: int,
    settings: TrainingSettings,
    seed: int,
    desc: str = "training",
    progress: bool = False,
    after_step: Callable[[list[int], float], None] | None = None,
) -> dict[str, float]:
    """Train the active adapter on `examples`; returns mean loss, steps, tokens (answer tokens: those scored) and
    seconds.

    `after_step(batch indices, loss)` runs after each optimiser step, so a benchmark can evaluate mid-training
    (it must leave the model in train mode) without a second training loop.
    """
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    lengths = [len(e.prompt) + len(e.answer) for e in examples]
    plan: list[list[int]] = []
    whole, fraction = int(settings.epochs), settings.epochs - int(settings.epochs)
    for _ in range(whole):
        plan += length_batches(lengths, settings.max_batch_tokens, rng)
    if fraction:
        extra = length_batches(lengths, settings.max_batch_tokens, rng)
        plan += extra[: max(1, round(fraction * len(extra)))]
    if settings.max_steps is not None:
        plan = plan[: settings.max_steps]
    model.train()
    start, losses, tokens, answer_tokens = time.perf_counter(), [], 0, 0
    try:
        for batch in tqdm(plan, desc=desc, disable=not progress, leave=False):
            logprobs, mask = answer_logprobs(
                model, [examples[i].prompt for i in batch], [examples[i].answer for i in batch], pad_id
            )
            loss = -(logprobs * mask).sum() / mask.sum()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):  # a diverged adapter would be sent or evaluated as a result
                raise FloatingPointError(f"{desc}: training loss {losses[-1]} at step {len(losses)} of {len(plan)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens += sum(lengths[i] for i in batch)
            answer_tokens += sum(len(examples[i].answer) for i in batch)
            if after_step is not None:
                after_step(batch, losses[-1])
    finally:
        model.eval()  # the shared base is in eval mode between users, also after a failure
    if params[0].is_cuda:  # the last step's backward and update may still be queued on the GPU: count them
        torch.cuda.synchronize(params[0].device)
    return {
        "loss": sum(losses) / len(losses),
        "final_loss": losses[-1],
        "steps": float(len(plan)),
        "tokens": float(tokens),
        "answer_tokens": float(answer_tokens),
        "seconds": time.perf_counter() - start,
    }
