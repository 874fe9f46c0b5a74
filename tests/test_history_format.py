"""History format ablation: what a history item teaches a personal adapter (both sides, its input, its output)."""

from __future__ import annotations

import pytest

from client import personalize
from client.data import HistoryItem, User, synthetic_users
from client.prompts import ANSWER_CUE, HISTORY_HEADER, build_prompt
from client.retrieval import HistoryRetriever
from client.training import history_examples
from common.config import PromptSettings, RunConfig
from common.model_files import model_hash
from common.store import UserStore
from common.tasks import get_task

TASK = get_task("LaMP-2M")
MARKERS = ["alpha", "bravo", "charlie", "delta", "echo"]


@pytest.fixture(scope="module")
def user() -> User:
    history = [HistoryItem(id=f"h{i}", fields={"description": f"{m} river night city", "tag": f"{m.upper()}TAG"})
               for i, m in enumerate(MARKERS)]
    return User(user_id="formats", task="LaMP-2M", history=history)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def examples(tokenizer, user, history_format, k=0, **settings):
    return history_examples(user, TASK, tokenizer, PromptSettings(k=k, history_format=history_format, **settings))


def test_both_is_question_then_answer(tiny, user):
    _, tokenizer = tiny
    for item, example in zip(user.history, examples(tokenizer, user, "both")):
        question, answer = TASK.item_example(item.fields)
        assert example.prompt == ids(tokenizer, question + ANSWER_CUE)
        assert example.answer == ids(tokenizer, answer) + [tokenizer.eos_token_id]


def test_input_learns_the_items_input_text_only(tiny, user):
    _, tokenizer = tiny
    for item, example in zip(user.history, examples(tokenizer, user, "input")):
        assert example.prompt == ids(tokenizer, ANSWER_CUE)  # no question: the cue alone precedes the text
        assert example.answer == ids(tokenizer, item.fields["description"]) + [tokenizer.eos_token_id]
        assert "TAG" not in tokenizer.decode(example.prompt + example.answer)


def test_output_learns_the_items_answer_only(tiny, user):
    _, tokenizer = tiny
    for item, example in zip(user.history, examples(tokenizer, user, "output")):
        assert example.prompt == ids(tokenizer, ANSWER_CUE)
        assert example.answer == ids(tokenizer, item.fields["tag"]) + [tokenizer.eos_token_id]
        assert "river" not in tokenizer.decode(example.prompt + example.answer)


@pytest.mark.parametrize("history_format", ["input", "output"])
def test_retrieved_items_stay_whole_and_are_the_same_as_with_both(tiny, user, history_format):
    _, tokenizer = tiny
    retriever = HistoryRetriever(TASK, user.history)
    both = examples(tokenizer, user, "both", k=2)
    for i, example in enumerate(examples(tokenizer, user, history_format, k=2)):
        question = TASK.item_example(user.history[i].fields)[0]
        retrieved = retriever.top_k(question, 2, before=i)  # found with the item's question, as for 'both'
        assert example.prompt == build_prompt(TASK, tokenizer, "", retrieved, None, 384).ids
        context = example.prompt[: -len(ids(tokenizer, ANSWER_CUE))]
        assert both[i].prompt[: len(context)] == context
        prompt = tokenizer.decode(example.prompt)
        assert (HISTORY_HEADER.strip() in prompt) == (i > 0)
        for item in retrieved:  # full items: input and answer
            assert TASK.item_text(item.fields) in prompt


def test_input_is_cut_at_the_prompt_budget_and_output_at_the_answer_budget(tiny):
    _, tokenizer = tiny
    long = " ".join(["river"] * 150)
    user = User("long", "LaMP-2M", [HistoryItem(id="h0", fields={"description": long, "tag": long})])
    settings = {"max_prompt_tokens": 100, "max_answer_tokens": 10}
    assert len(examples(tokenizer, user, "input", **settings)[0].answer) == 100 + 1  # + EOS
    assert len(examples(tokenizer, user, "output", **settings)[0].answer) == 10 + 1


def test_the_item_input_falls_back_to_every_field_when_the_answer_is_the_only_one():
    assert get_task("LaMP-7").item_input({"text": "my tweet"}) == "my tweet"
    assert get_task("LaMP-2N").item_input({"title": "T", "text": "body", "category": "sports"}) == "T\nbody"


def test_config_uses_the_format_for_personal_training_only():
    cfg = RunConfig(history_format="output")
    assert cfg.prompt_settings(2).history_format == "both"  # task adaptation and query prompts
    assert cfg.prompt_settings(2, False, cfg.history_format).history_format == "output"
    with pytest.raises(ValueError, match="history-format must be one of both, input, output, got 'answer'"):
        RunConfig(history_format="answer")
    with pytest.raises(ValueError, match="history format 'answer': expected one of both, input, output"):
        TASK.item_target({"description": "d", "tag": "t"}, "answer")  # type: ignore[arg-type]


def test_personal_training_gets_the_configured_format(tiny, tiny_model_dir, tmp_path, monkeypatch):
    base, tokenizer = tiny
    seen = []

    def recording(user, task, tokenizer, settings, *args, **kwargs):
        seen.append(settings.history_format)
        return history_examples(user, task, tokenizer, settings, *args, **kwargs)

    monkeypatch.setattr(personalize, "history_examples", recording)
    cfg = RunConfig(task="LaMP-2M", model="tiny-random", methods="oppu", history_format="input", personal_epochs=0.5)
    user = synthetic_users(1, history_len=4, num_queries=1)[0]
    personalize.personalize_user(cfg, user, UserStore(tmp_path, user.user_id), base, base, tokenizer,
                                 model_hash(tiny_model_dir))
    assert seen == ["input"]
