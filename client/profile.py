"""PAG: a short text profile of the user, written on the device by the instruct base model, cached."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.data import User
from client.evaluate import generate
from common.store import atomic_write_json, read_saved_state
from common.tasks import TaskSpec

PROFILE_INSTRUCTION = (
    "Here are some items from one user's history ({description}):\n{items}\n"
    "In at most two sentences, describe this user's preferences and style."
)


def profile_request(
    task: TaskSpec, user: User, tokenizer: PreTrainedTokenizerBase, seed: int, sample_size: int, item_tokens: int = 48
) -> list[int]:
    """Chat prompt ids asking for a profile, from a seeded sample of the history (kept in time order)."""
    rng = random.Random(f"{seed}-{user.user_id}")
    picked = sorted(rng.sample(range(len(user.history)), min(sample_size, len(user.history))))
    lines = []
    for i in picked:
        ids = tokenizer(task.item_text(user.history[i].fields), add_special_tokens=False)["input_ids"][:item_tokens]
        lines.append("- " + tokenizer.decode(ids))
    text = PROFILE_INSTRUCTION.format(description=task.description, items="\n".join(lines))
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    return tokenizer(text + "\nProfile:", add_special_tokens=False)["input_ids"]


def user_profile(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    user: User,
    cache_file: Path,
    model_hash: str,
    seed: int,
    sample_size: int,
    max_new_tokens: int,
) -> str:
    """The user's profile: from the cache when made by the same model and settings, else written now."""
    history = json.dumps(user.to_json()["profile"], sort_keys=True).encode()
    key = {"model": model_hash, "task": task.name, "seed": seed, "sample_size": sample_size,
           "max_new_tokens": max_new_tokens, "history_sha256": hashlib.sha256(history).hexdigest()}
    cached = read_saved_state(cache_file)
    if cached and cached.get("key") == key:
        return cached["profile"]
    request = profile_request(task, user, tokenizer, seed, sample_size)
    profile = generate(model, tokenizer, [request], max_new_tokens, no_repeat_ngram_size=3)[0]
    atomic_write_json(cache_file, {"key": key, "profile": profile})
    return profile
