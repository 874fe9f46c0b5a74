"""Readers of client.data: LaMP JSON, OPPU JSON, MovieLens-100K (recbole's copy) and synthetic users."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from client.data import (
    DataError,
    HistoryItem,
    Query,
    User,
    load_lamp,
    load_movielens,
    load_oppu,
    movielens_dir,
    synthetic_users,
)
from common.config import DataLimits
from common.tasks import MOVIE_TAGS, RATINGS, get_task


def write_lamp(tmp_path: Path, questions, outputs, stem: str = "dev") -> tuple[Path, Path]:
    q, o = tmp_path / f"{stem}_questions.json", tmp_path / f"{stem}_outputs.json"
    q.write_text(json.dumps(questions), encoding="utf-8")
    o.write_text(json.dumps(outputs), encoding="utf-8")
    return q, o


# One published-format entry per task: outputs "task", question input, profile items, gold.
# Profile items are deliberately listed newest first.
LAMP_CASES = {
    "LaMP-1": (
        "LaMP_1",
        'For an author who has written the paper with the title "Graph Drawing", which reference is '
        'related? Just answer with [1] or [2] without explanation. [1]: "Planar grids" [2]: "Soup"',
        [
            {"title": "Convex drawings", "abstract": "In a convex grid drawing ...", "id": "1001", "date": "2011-03-01"},
            {"title": "Orthogonal layouts", "abstract": "We study bends.", "id": "1000", "date": "2009-07-15"},
        ],
        "[1]",
    ),
    "LaMP-2N": (
        "LaMP_2",
        "Which category does this article relate to among the following categories? Just answer with "
        "the category name without further explanation. categories: [travel, education] article: Rates rise.",
        [
            {"title": "Fed moves", "text": "The Fed raised rates.", "category": "business", "id": "2001", "date": "2014-05-02"},
            {"title": "Alps trip", "text": "Hiking the Alps.", "category": "travel", "id": "2000", "date": "2013-11-20"},
        ],
        "business",
    ),
    "LaMP-2M": (
        "LaMP_2",
        "Which tag does this movie relate to among the following tags? Just answer with the tag name "
        "without further explanation. tags: [sci-fi, comedy] description: Robots rebel on Mars.",
        [
            {"description": "A ship lost in space.", "tag": "sci-fi", "id": "3001", "date": "2019-02-02"},
            {"description": "Two friends on a road trip.", "tag": "comedy", "id": "3000", "date": "2018-12-31"},
        ],
        "sci-fi",
    ),
    "LaMP-3": (
        "LaMP_3",
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
        "or 5 without further explanation. review: Broke after a day.",
        [
            {"text": "Works great.", "score": "4", "id": "4001", "date": "2016-08-09"},
            {"text": "Awful.", "score": 1, "id": "4000", "date": "2016-01-01"},
        ],
        "1",
    ),
    "LaMP-4": (
        "LaMP_4",
        "Generate a headline for the following article: The city council voted to build a bridge.",
        [
            {"title": "New park opens", "text": "A park opened downtown.", "id": "5001", "date": "2017-04-04"},
            {"title": "Storm hits coast", "text": "Heavy rain fell.", "id": "5000", "date": "2017-01-12"},
        ],
        "Council backs bridge",
    ),
    "LaMP-5": (
        "LaMP_5",
        "Generate a title for the following abstract of a paper: We propose a fast sorting network.",
        [
            {"title": "Sorting in parallel", "abstract": "Parallel sorting ...", "id": "6001", "date": "2005-06-01"},
            {"title": "Heaps revisited", "abstract": "We revisit heaps.", "id": "6000", "date": "2003-02-03"},
        ],
        "Fast sorting networks",
    ),
    "LaMP-7": (
        "LaMP_7",
        "Paraphrase the following tweet without any explanation before or after it: loving this rain",
        [
            {"text": "coffee first .. then the world", "id": "7001", "date": "2009-06-02"},
            {"text": "cant sleep again ..", "id": "7000", "date": "2009-05-30"},
        ],
        "this rain .. love it",
    ),
}


@pytest.mark.parametrize("task_name", sorted(LAMP_CASES))
def test_load_lamp_every_task(tmp_path, task_name):
    file_task, query_input, profile, gold = LAMP_CASES[task_name]
    q, o = write_lamp(
        tmp_path,
        [{"id": "900", "input": query_input, "profile": profile}],
        {"task": file_task, "golds": [{"id": "900", "output": gold}]},
    )
    users = load_lamp(q, o, task_name)
    assert len(users) == 1
    user = users[0]
    task = get_task(task_name)
    # user split: the question id is the user id
    assert user.user_id == "900" and user.task == task_name
    assert user.queries == [Query(id="900", input=query_input, gold=gold)]
    # history: chronological (the files list the newer item first), fields as text, only the task's fields
    expected = [
        HistoryItem(
            id=item["id"],
            fields={f: str(item[f]) for f in task.item_fields},
            date=item["date"],
        )
        for item in sorted(profile, key=lambda item: item["date"])
    ]
    assert user.history == expected
    assert [h.id for h in user.history] == [profile[1]["id"], profile[0]["id"]]


def test_lamp3_scores_as_string_or_number(tmp_path):
    profile = [
        {"text": "a", "score": "4", "id": "1"},
        {"text": "b", "score": 5, "id": "2"},
        {"text": "c", "score": 3.0, "id": "3"},
        {"text": "d", "score": 2.5, "id": "4"},
    ]
    q, o = write_lamp(
        tmp_path,
        [{"id": 7, "input": "review: x", "profile": profile}],
        {"task": "LaMP_3", "golds": [{"id": "7", "output": 4}]},
    )
    (user,) = load_lamp(q, o, "LaMP-3")
    assert [h.fields["score"] for h in user.history] == ["4", "5", "3", "2.5"]
    assert user.queries[0].gold == "4"
    assert user.queries[0].id == "7"  # numeric ids are read as text and still match the golds


def test_lamp_time_split_merges_users(tmp_path):
    a = {"text": "first tweet", "id": "a", "date": "2020-01-03"}
    b = {"text": "second tweet", "id": "b", "date": "2020-01-01"}
    c = {"text": "third tweet", "id": "c", "date": "2020-01-02"}
    d = {"text": "other user", "id": "d", "date": "2020-01-05"}
    questions = [
        {"id": "q1", "user_id": "u1", "input": "before or after it: x", "profile": [a, b]},
        {"id": "q2", "user_id": 42, "input": "before or after it: y", "profile": [d]},
        {"id": "q3", "user_id": "u1", "input": "before or after it: z", "profile": [b, c, a]},
    ]
    outputs = {"task": "LaMP_7", "golds": [{"id": "q3", "output": "Z"}, {"id": "q1", "output": "X"}, {"id": "q2", "output": "Y"}]}
    q, o = write_lamp(tmp_path, questions, outputs)
    users = load_lamp(q, o, "LaMP-7")
    assert [u.user_id for u in users] == ["u1", "42"]
    u1, u2 = users
    # merged and de-duplicated by item id, then sorted by date
    assert [h.id for h in u1.history] == ["b", "c", "a"]
    assert [h.fields for h in u1.history] == [{"text": "second tweet"}, {"text": "third tweet"}, {"text": "first tweet"}]
    assert u1.queries == [Query("q1", "before or after it: x", "X"), Query("q3", "before or after it: z", "Z")]
    assert [h.id for h in u2.history] == ["d"] and u2.queries == [Query("q2", "before or after it: y", "Y")]


def test_lamp_history_keeps_file_order_without_dates(tmp_path):
    profile = [
        {"title": "T3", "abstract": "A3", "id": "3", "date": "2010-01-01"},
        {"title": "T1", "abstract": "A1", "id": "1"},  # no date: order of the file is kept for all
        {"title": "T2", "abstract": "A2", "id": "2", "date": "2001-01-01"},
    ]
    q, o = write_lamp(
        tmp_path, [{"id": "9", "input": "x", "profile": profile}], {"task": "LaMP_5", "golds": [{"id": "9", "output": "t"}]}
    )
    (user,) = load_lamp(q, o, "LaMP-5")
    assert [h.id for h in user.history] == ["3", "1", "2"]
    assert [h.date for h in user.history] == ["2010-01-01", None, "2001-01-01"]


def test_lamp_history_mixed_naive_and_aware_dates_keep_file_order(tmp_path):
    profile = [
        {"text": "x", "id": "1", "date": "2020-01-02T00:00:00+00:00"},
        {"text": "y", "id": "2", "date": "2020-01-01"},
    ]
    q, o = write_lamp(
        tmp_path, [{"id": "9", "input": "x", "profile": profile}], {"task": "LaMP_7", "golds": [{"id": "9", "output": "t"}]}
    )
    (user,) = load_lamp(q, o, "LaMP-7")
    assert [h.id for h in user.history] == ["1", "2"]


# --- malformed LaMP input -------------------------------------------------------------------------------


def _lamp1_files(tmp_path, profile=None, entry_extra=None, outputs=None, questions=None):
    entry = {
        "id": "100",
        "input": "which reference is related? x",
        "profile": profile if profile is not None else [{"title": "T", "abstract": "A", "id": "1"}],
    }
    entry.update(entry_extra or {})
    return write_lamp(
        tmp_path,
        questions if questions is not None else [entry],
        outputs if outputs is not None else {"task": "LaMP_1", "golds": [{"id": "100", "output": "[1]"}]},
    )


def test_lamp_missing_item_field(tmp_path):
    q, o = _lamp1_files(tmp_path, profile=[{"title": "T", "abstract": "A", "id": "1"}, {"title": "T2", "id": "2"}])
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0 (id 100): profile[1]: missing field 'abstract'")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_missing_item_id(tmp_path):
    q, o = _lamp1_files(tmp_path, profile=[{"title": "T", "abstract": "A"}])
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0 (id 100): profile[0]: missing field 'id'")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_missing_input(tmp_path):
    q, o = _lamp1_files(tmp_path, questions=[{"id": "100", "profile": []}])
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0 (id 100): missing field 'input'")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_profile_not_a_list(tmp_path):
    q, o = _lamp1_files(tmp_path, profile={"title": "T", "abstract": "A", "id": "1"})
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0 (id 100): field 'profile' must be list, got dict")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_field_of_wrong_type(tmp_path):
    q, o = _lamp1_files(tmp_path, profile=[{"title": ["T"], "abstract": "A", "id": "1"}])
    with pytest.raises(
        DataError, match=re.escape(f"{q}: entry 0 (id 100): profile[0]: field 'title' must be str or int or float, got list")
    ):
        load_lamp(q, o, "LaMP-1")


def test_lamp_bool_is_not_a_number(tmp_path):
    q, o = write_lamp(
        tmp_path,
        [{"id": "1", "input": "x", "profile": [{"text": "t", "score": True, "id": "i"}]}],
        {"task": "LaMP_3", "golds": [{"id": "1", "output": "3"}]},
    )
    with pytest.raises(DataError, match=re.escape("profile[0]: field 'score' must be str or int or float, got bool")):
        load_lamp(q, o, "LaMP-3")


def test_lamp_date_of_wrong_type(tmp_path):
    q, o = _lamp1_files(tmp_path, profile=[{"title": "T", "abstract": "A", "id": "1", "date": 2010}])
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0 (id 100): profile[0]: field 'date' must be str, got int")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_user_id_of_wrong_type(tmp_path):
    q, o = _lamp1_files(tmp_path, entry_extra={"user_id": ["u1"]})
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0 (id 100): field 'user_id' must be str or int, got list")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_entry_not_an_object(tmp_path):
    q, o = _lamp1_files(tmp_path, questions=["just a string"])
    with pytest.raises(DataError, match=re.escape(f"{q}: entry 0: expected an object, got str")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_questions_not_a_list(tmp_path):
    q, o = _lamp1_files(tmp_path, questions={"id": "100"})
    with pytest.raises(DataError, match=re.escape(f"{q}: expected a list of questions, got dict")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_unknown_task(tmp_path):
    q, o = _lamp1_files(tmp_path)
    with pytest.raises(ValueError, match=r"unknown task 'LaMP-9'; expected one of: LaMP-1, LaMP-2N, .*MovieLens") as e:
        load_lamp(q, o, "LaMP-9")
    assert not isinstance(e.value, DataError)


def test_lamp_rejects_non_lamp_task(tmp_path):
    q, o = _lamp1_files(tmp_path)
    with pytest.raises(ValueError, match=r"task 'MovieLens' is not a LaMP task"):
        load_lamp(q, o, "MovieLens")


def test_lamp_outputs_task_mismatch(tmp_path):
    q, o = _lamp1_files(tmp_path, outputs={"task": "LaMP_3", "golds": [{"id": "100", "output": "[1]"}]})
    with pytest.raises(DataError, match=re.escape(f"{o}: field 'task' is 'LaMP_3', expected 'LaMP_1' for LaMP-1")):
        load_lamp(q, o, "LaMP-1")


def test_lamp2_variants_share_file_task_name(tmp_path):
    q, o = write_lamp(
        tmp_path,
        [{"id": "1", "input": "description: d", "profile": [{"description": "d", "tag": "comedy", "id": "i"}]}],
        {"task": "LaMP_2N", "golds": [{"id": "1", "output": "comedy"}]},
    )
    with pytest.raises(DataError, match=re.escape(f"{o}: field 'task' is 'LaMP_2N', expected 'LaMP_2' for LaMP-2M")):
        load_lamp(q, o, "LaMP-2M")


def test_lamp_outputs_missing_task(tmp_path):
    q, o = _lamp1_files(tmp_path, outputs={"golds": []})
    with pytest.raises(DataError, match=re.escape(f"{o}: missing field 'task'")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_gold_record_missing_output(tmp_path):
    q, o = _lamp1_files(tmp_path, outputs={"task": "LaMP_1", "golds": [{"id": "100"}]})
    with pytest.raises(DataError, match=re.escape(f"{o}: golds[0]: missing field 'output'")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_gold_missing_for_question(tmp_path):
    q, o = _lamp1_files(tmp_path, outputs={"task": "LaMP_1", "golds": [{"id": "101", "output": "[1]"}]})
    with pytest.raises(
        DataError, match=re.escape(f"{o}: no gold output for question id '100' ({q}: entry 0 (id 100))")
    ):
        load_lamp(q, o, "LaMP-1")


def test_lamp_empty_history(tmp_path):
    q, o = _lamp1_files(tmp_path, profile=[])
    with pytest.raises(DataError, match=re.escape(f"{q}: user '100' has an empty history (profile)")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_invalid_json(tmp_path):
    q, o = _lamp1_files(tmp_path)
    q.write_text('[{"id": "100", ', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{q}: not valid JSON (")):
        load_lamp(q, o, "LaMP-1")


def test_lamp_missing_file(tmp_path):
    q, o = _lamp1_files(tmp_path)
    missing = tmp_path / "nope_outputs.json"
    with pytest.raises(DataError, match=re.escape(f"{missing}: file not found")):
        load_lamp(q, missing, "LaMP-1")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.json'}: file not found")):
        load_lamp(tmp_path / "nope.json", o, "LaMP-1")


# --- OPPU format ------------------------------------------------------------------------------------------


def test_load_oppu(tmp_path):
    records = [
        {
            "user_id": 17,
            "profile": [
                {"id": "b", "text": "later", "score": 5, "date": "2021-02-01"},
                {"id": "a", "text": "earlier", "score": "2", "date": "2021-01-01"},
            ],
            "query": [{"id": 1, "input": "review: new", "gold": 4}, {"id": "2", "input": "review: old", "gold": "3"}],
        },
        {
            "user_id": "u2", "task": "LaMP-3", "profile": [{"id": "c", "text": "t", "score": "1"}],
            "query": [{"id": "3", "input": "review: u2", "gold": 2.0}],
        },
    ]
    path = tmp_path / "users.json"
    path.write_text(json.dumps(records))
    users = load_oppu(path, "LaMP-3")
    assert users == [
        User(
            user_id="17",
            task="LaMP-3",
            history=[
                HistoryItem("a", {"text": "earlier", "score": "2"}, "2021-01-01"),
                HistoryItem("b", {"text": "later", "score": "5"}, "2021-02-01"),
            ],
            queries=[Query("1", "review: new", "4"), Query("2", "review: old", "3")],
        ),
        User("u2", "LaMP-3", [HistoryItem("c", {"text": "t", "score": "1"}, None)], [Query("3", "review: u2", "2")]),
    ]


def test_load_oppu_single_user_file(tmp_path):
    path = tmp_path / "one.json"
    query = {"id": "q", "input": "i", "gold": "g"}
    path.write_text(json.dumps({"user_id": "x", "profile": [{"id": "1", "text": "hi"}], "query": [query]}))
    assert load_oppu(path, "LaMP-7") == [User("x", "LaMP-7", [HistoryItem("1", {"text": "hi"})], [Query("q", "i", "g")])]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"profile": [], "query": []}, "user 0: missing field 'user_id'"),
        ({"user_id": "u", "query": []}, "user 0 (user_id u): missing field 'profile'"),
        ({"user_id": "u", "profile": [{"id": "1", "text": "t"}]}, "user 0 (user_id u): missing field 'query'"),
        ({"user_id": "u", "profile": "t", "query": []}, "user 0 (user_id u): field 'profile' must be list, got str"),
        (
            {"user_id": "u", "profile": [{"id": "1", "text": "t"}], "query": [{"id": "q", "input": "i"}]},
            "user 0 (user_id u): query[0]: missing field 'gold'",
        ),
        (
            {"user_id": "u", "profile": [{"id": "1", "text": "t"}], "query": [{"id": "q", "input": 3, "gold": "g"}]},
            "user 0 (user_id u): query[0]: field 'input' must be str, got int",
        ),
        (
            {"user_id": "u", "profile": [{"id": "1", "text": {"a": 1}}], "query": []},
            "user 0 (user_id u): profile[0]: field 'text' must be str or int or float, got dict",
        ),
        (
            {"user_id": "u", "task": "LaMP-4", "profile": [{"id": "1", "text": "t"}], "query": []},
            "user 0 (user_id u): field 'task' is 'LaMP-4', expected 'LaMP-7'",
        ),
        ({"user_id": "u", "profile": [], "query": []}, "user 'u' has an empty history (profile)"),
    ],
)
def test_load_oppu_malformed(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        load_oppu(path, "LaMP-7")


def test_load_oppu_not_a_list_invalid_json_missing_file_unknown_task(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("3")
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a list of users, got int")):
        load_oppu(path, "LaMP-7")
    path.write_text("{not json")
    with pytest.raises(DataError, match=re.escape(f"{path}: not valid JSON (")):
        load_oppu(path, "LaMP-7")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'missing.json'}: file not found")):
        load_oppu(tmp_path / "missing.json", "LaMP-7")
    with pytest.raises(ValueError, match=r"unknown task 'LaMP-6'"):
        load_oppu(path, "LaMP-6")


@pytest.mark.parametrize("task_name", sorted(LAMP_CASES))
def test_round_trip_lamp_to_oppu(tmp_path, task_name):
    file_task, query_input, profile, gold = LAMP_CASES[task_name]
    second = gold + "!" if get_task(task_name).metric == "generation" else gold  # label tasks answer with labels
    q, o = write_lamp(
        tmp_path,
        [
            {"id": "1", "user_id": "u", "input": query_input, "profile": profile},
            {"id": "2", "user_id": "u", "input": query_input + " again", "profile": profile[:1]},
        ],
        {"task": file_task, "golds": [{"id": "1", "output": gold}, {"id": "2", "output": second}]},
    )
    users = load_lamp(q, o, task_name)
    path = tmp_path / "oppu.json"
    path.write_text(json.dumps([u.to_json() for u in users]))
    assert load_oppu(path, task_name) == users
    assert users[0].to_json()["task"] == task_name


def test_round_trip_without_dates_and_synthetic(tmp_path):
    users = synthetic_users(3, history_len=5, num_queries=2, seed=3) + []
    users.append(User("nodate", "LaMP-2M", [HistoryItem("z", {"description": "d", "tag": "comedy"}), HistoryItem("y", {"description": "e", "tag": "action"})],
                      [Query("nodate-q", "description: f", "comedy")]))
    path = tmp_path / "oppu.json"
    path.write_text(json.dumps([u.to_json() for u in users]))
    assert load_oppu(path, "LaMP-2M") == users
    assert "date" not in users[-1].to_json()["profile"][0]


# --- MovieLens-100K (recbole's copy) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens_raw() -> dict[tuple[str, str], tuple[float, str]]:
    """(user, item) -> (timestamp, rating), read straight from recbole's ml-100k.inter."""
    raw = {}
    with open(movielens_dir() / "ml-100k.inter", encoding="latin-1") as f:
        next(f)
        for line in f:
            user, item, rating, ts = line.split("\t")
            raw[user, item] = (float(ts), rating.strip())
    return raw


@pytest.fixture(scope="module")
def movielens_users() -> list[User]:
    return load_movielens()


def test_movielens_shape(movielens_users, movielens_raw):
    users = movielens_users
    assert len(users) == 943
    assert len({u.user_id for u in users}) == 943
    assert sum(len(u.history) + len(u.queries) for u in users) == 100_000 == len(movielens_raw)
    per_user = Counter(user for user, _ in movielens_raw)
    task = get_task("MovieLens")
    for u in users:
        assert u.task == "MovieLens"
        assert len(u.queries) == 5
        assert len(u.history) == per_user[u.user_id] - 5 >= 15
        for h in u.history:
            assert set(h.fields) == {"movie", "score"}
            assert h.fields["score"] == movielens_raw[u.user_id, h.id][1]
        history_ts = [movielens_raw[u.user_id, h.id][0] for h in u.history]
        assert history_ts == sorted(history_ts)
        assert [datetime.fromisoformat(h.date) for h in u.history] == [datetime.fromtimestamp(t) for t in history_ts]
        for query in u.queries:
            user_id, item_id = query.id.split("-")
            assert user_id == u.user_id
            ts, rating = movielens_raw[u.user_id, item_id]
            assert query.gold == rating and query.gold in RATINGS
            assert ts >= history_ts[-1]  # the latest ratings are the queries
            assert query.input.startswith(task.question_template.split("{movie}")[0])


def test_movielens_movie_text(movielens_users):
    toy_story = "Toy Story (1995); genres: Animation, Children's, Comedy"
    seen = [h for u in movielens_users for h in u.history if h.id == "1"]
    assert seen and all(h.fields["movie"] == toy_story for h in seen)
    goldeneye = [q for u in movielens_users for q in u.queries if q.id.endswith("-2")]
    assert all(q.input.endswith("movie: GoldenEye (1995); genres: Action, Adventure, Thriller") for q in goldeneye)
    # user 1's query inputs are the MovieLens question about its five latest movies
    user1 = next(u for u in movielens_users if u.user_id == "1")
    assert all(re.search(r"movie: .+ \(\d{4}\); genres: \S", q.input) for q in user1.queries)


def test_movielens_num_queries(movielens_raw):
    per_user = Counter(user for user, _ in movielens_raw)
    one = {u.user_id: u for u in load_movielens(num_queries=1)}
    assert all(len(u.queries) == 1 and len(u.history) == per_user[u.user_id] - 1 for u in one.values())
    with pytest.raises(DataError, match=r"ml-100k\.inter: user '\d+' has an empty history"):
        load_movielens(num_queries=20)  # the smallest users have exactly 20 ratings
    with pytest.raises(ValueError, match="num_queries must be >= 1, got 0"):
        load_movielens(num_queries=0)  # no user would have a question to answer


def _movielens_files(tmp_path: Path, ratings: list[str]) -> Path:
    """A two-movie ml-100k in recbole's layout with the given rating lines (user, item, rating, time)."""
    (tmp_path / "ml-100k.item").write_text("item_id\tmovie_title\trelease_year\tclass\n1\tToy Story\t1995\tComedy\n"
                                           "2\tGoldenEye\t1995\tAction\n", encoding="latin-1")
    (tmp_path / "ml-100k.inter").write_text("user_id\titem_id\trating\ttimestamp\n" + "".join(ratings), encoding="latin-1")
    return tmp_path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("7\t2\tfive\t900\n", "line 3: rating 'five' or time '900' is no number"),
        ("7\t2\t4\n", "line 3: 3 tab-separated fields ('7\\t2\\t4\\n'); expected 4 (user, item, rating, time)"),
        ("7\t3\t4\t900\n", "line 3: item '3' is not in"),
        ("7\t2\t6\t900\n", "user '7': query '7-2': field 'gold' is '6'; expected a rating from 1 to 5"),
        ("7\t2\tnan\t900\n", "user '7': query '7-2': field 'gold' is 'nan'; expected a rating from 1 to 5"),
        ("7\t1\t5\t850\n7\t2\t3\t900\n", "user '7': history item '1': id appears twice"),  # one movie rated twice
    ],
)
def test_movielens_bad_lines(tmp_path, line, message):
    root = _movielens_files(tmp_path, ["7\t1\t4\t800\n", line])
    with pytest.raises(DataError, match=re.escape(f"{root / 'ml-100k.inter'}: {message}")):
        load_movielens(num_queries=1, root=root)


def test_limits_apply_only_when_given(tmp_path):
    """A run checks its limits at load time; a node re-reading its own store (no limits) is not refused again."""
    root = _movielens_files(tmp_path, ["7\t1\t4\t800\n", "7\t2\t3\t900\n"])
    (user,) = load_movielens(num_queries=1, root=root)
    with pytest.raises(DataError, match=re.escape("user '7' has 1 history items, more than --max-user-history 0")):
        load_movielens(num_queries=1, root=root, limits=DataLimits(max_text_chars=100, max_user_history=0))
    with pytest.raises(DataError, match=r"field 'movie' has 32 characters, more than --max-text-chars 10 \('Toy"):
        load_movielens(num_queries=1, root=root, limits=DataLimits(max_text_chars=10, max_user_history=5))
    assert user.history[0].fields["movie"] == "Toy Story (1995); genres: Comedy"


# --- synthetic users -----------------------------------------------------------------------------------


def test_synthetic_users_deterministic():
    a = synthetic_users(4, history_len=10, num_queries=3, seed=5)
    assert a == synthetic_users(4, history_len=10, num_queries=3, seed=5)
    assert a != synthetic_users(4, history_len=10, num_queries=3, seed=6)
    assert [u.user_id for u in a] == ["synthetic-0", "synthetic-1", "synthetic-2", "synthetic-3"]
    task = get_task("LaMP-2M")
    for n, u in enumerate(a):
        assert u.task == "LaMP-2M"
        assert [h.id for h in u.history] == [f"u{n}-h{i}" for i in range(10)]
        assert [h.date for h in u.history] == [f"2020-01-{d:02d}" for d in range(1, 11)]
        assert [q.id for q in u.queries] == [f"u{n}-q{i}" for i in range(3)]
        for h in u.history:
            assert set(h.fields) == {"description", "tag"} and h.fields["tag"] in MOVIE_TAGS[:4]
            assert len(h.fields["description"].split()) == 6
        for q in u.queries:
            description = q.input.split("description: ", 1)[1]
            assert task.item_example({"description": description, "tag": q.gold}) == (q.input, q.gold)


def test_synthetic_users_planted_preference():
    users = synthetic_users(8, history_len=50, num_queries=4, preference_share=0.9, seed=0)
    for n, u in enumerate(users):
        favourite = MOVIE_TAGS[:4][n % 4]
        tags = Counter(h.fields["tag"] for h in u.history)
        assert tags.most_common(1)[0][0] == favourite
        assert tags[favourite] >= 0.8 * 50
    # no preference: tags spread over the labels
    flat = synthetic_users(8, history_len=50, preference_share=0.0, seed=0)
    shares = [Counter(h.fields["tag"] for h in u.history).most_common(1)[0][1] / 50 for u in flat]
    assert max(shares) < 0.6
    only = synthetic_users(1, history_len=30, preference_share=1.0, labels=MOVIE_TAGS[4:6])[0]
    assert only.history[-1].fields["tag"] == MOVIE_TAGS[4]
