"""Users, their history and queries; readers for LaMP JSON, OPPU JSON, MovieLens-100K and synthetic users.

Every reader returns `User`s in one shape, so the rest of the system never sees a file format, and ends with
the same check (`check_users`), so bad data stops the run at load time, before any process starts.
Bad input raises `DataError` naming the file, the record, the field, the value and what was expected.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from client.assets import installed_asset
from common.config import DataLimits
from common.store import JsonFileError, load_json_file
from common.tasks import LAMP_FILE_TASK_NAMES, MOVIE_TAGS, TaskSpec, get_task

MAX_USER_ID_BYTES = 200  # clients/<id>/adapters/user-<id>-k1-pag: a file name ends at 255 bytes


class DataError(ValueError):
    """A data file does not have the shape the task needs."""


@dataclass(frozen=True)
class HistoryItem:
    """One earlier item of a user: the task's fields (all text) and when it happened."""

    id: str
    fields: dict[str, str]
    date: str | None = None


@dataclass(frozen=True)
class Query:
    """A question to answer for the user, with its gold output."""

    id: str
    input: str
    gold: str


@dataclass
class User:
    """A user as a device holds it: history (oldest first) and queries."""

    user_id: str
    task: str
    history: list[HistoryItem]
    queries: list[Query] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """OPPU's per-user format ({user_id, profile, query}) plus the task name."""
        profile = [{"id": h.id, **({"date": h.date} if h.date else {}), **h.fields} for h in self.history]
        queries = [{"id": q.id, "input": q.input, "gold": q.gold} for q in self.queries]
        return {"task": self.task, "user_id": self.user_id, "profile": profile, "query": queries}


def _read_json(path: Path) -> Any:
    try:
        return load_json_file(path, finite=True)
    except JsonFileError as e:
        raise DataError(str(e)) from None


def _field(record: Any, name: str, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
    """record[name], checked for presence and type, with an error that says where."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _text(value: str | int | float) -> str:
    """Field values as text; numeric scores keep their integer form ("4", not "4.0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _history_item(record: Any, task: TaskSpec, where: str) -> HistoryItem:
    item_id = _text(_field(record, "id", where, (str, int)))
    fields = {name: _text(_field(record, name, where, (str, int, float))) for name in task.item_fields}
    date = record.get("date")
    if date is not None and not isinstance(date, str):
        raise DataError(f"{where}: field 'date' must be str, got {type(date).__name__}")
    return HistoryItem(id=item_id, fields=fields, date=date)


def _chronological(items: list[HistoryItem]) -> list[HistoryItem]:
    """Oldest first when every item has an ISO date; the file's order otherwise."""
    try:
        keys = [datetime.fromisoformat(h.date) for h in items]  # type: ignore[arg-type]
        return [h for _, h in sorted(zip(keys, items), key=lambda pair: pair[0])]
    except (TypeError, ValueError):  # no date, not ISO, or naive mixed with timezone-aware dates
        return items


def _shown(value: str, width: int = 60) -> str:
    """A value as an error message quotes it: repr (one line), cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _user_id_problem(user_id: str) -> str | None:
    """Why `user_id` cannot name the user's directory and adapters (None if it can)."""
    if not user_id:
        return "is empty"
    if user_id.startswith("."):  # '.', '..' and hidden names
        return "starts with '.'"
    for separator in ("/", "\\"):
        if separator in user_id:
            return f"contains {separator!r}"
    if not user_id.isprintable():
        return "contains NUL or another non-printable character"
    if len(user_id.encode()) > MAX_USER_ID_BYTES:
        return f"is longer than {MAX_USER_ID_BYTES} bytes"
    return None


def _check_answer(task: TaskSpec, value: str, where: str) -> None:
    """A rating task's answers are ratings in range, a classification task's are labels; generation takes any text."""
    expected = None
    if task.metric == "regression":
        try:
            rating = float(value)
        except ValueError:
            rating = math.nan
        if not float(task.labels[0]) <= rating <= float(task.labels[-1]):  # NaN and inf fail too
            expected = f"a rating from {task.labels[0]} to {task.labels[-1]}"
    elif task.metric == "classification" and value not in task.labels:
        expected = f"one of the {task.name} labels: {', '.join(task.labels)}"
    if expected:
        raise DataError(f"{where} is {_shown(value)}; expected {expected}")


def _check_text(value: str, where: str, limits: DataLimits | None) -> None:
    if limits and len(value) > limits.max_text_chars:
        raise DataError(
            f"{where} has {len(value):,} characters, more than --max-text-chars {limits.max_text_chars} "
            f"({_shown(value, 40)}); raise the limit with --max-text-chars N"
        )


def check_users(users: list[User], where: str, limits: DataLimits | None) -> list[User]:
    """The check every reader ends with: ids unique and usable as directory names, every answer in the task's
    label set or rating range, at least one history item and one query per user, and sizes within `limits`
    (None: none, for a node re-reading the store its run checked)."""
    seen_users: set[str] = set()
    query_owners: dict[str, str] = {}
    for user in users:
        task = get_task(user.task)
        at = f"{where}: user {_shown(user.user_id)}"
        problem = _user_id_problem(user.user_id)
        if problem:
            raise DataError(
                f"{at}: user id {problem}; expected a name usable as a directory (non-empty, no '/', '\\' or "
                f"non-printable characters, not starting with '.', at most {MAX_USER_ID_BYTES} bytes)"
            )
        if user.user_id in seen_users:
            raise DataError(f"{at}: user id appears twice; expected unique user ids")
        seen_users.add(user.user_id)
        if not user.history:
            raise DataError(f"{at} has an empty history (profile); OPPU needs at least one item")
        if limits and len(user.history) > limits.max_user_history:
            raise DataError(f"{at} has {len(user.history):,} history items, more than --max-user-history "
                            f"{limits.max_user_history}; raise the limit with --max-user-history N")
        if not user.queries:
            raise DataError(f"{at} has no queries; expected at least one (the questions the user is evaluated on)")
        item_ids: set[str] = set()
        for item in user.history:
            item_at = f"{at}: history item {_shown(item.id)}"
            if item.id in item_ids:
                raise DataError(f"{item_at}: id appears twice; expected unique history item ids within a user")
            item_ids.add(item.id)
            for name, value in item.fields.items():
                _check_text(value, f"{item_at}: field {name!r}", limits)
            if task.item_answers_are_labels:
                _check_answer(task, item.fields[task.answer_field], f"{item_at}: field {task.answer_field!r}")
        for query in user.queries:
            query_at = f"{at}: query {_shown(query.id)}"
            if query.id in query_owners:
                raise DataError(f"{query_at}: id appears twice (also user {_shown(query_owners[query.id])}); "
                                "expected unique query ids")
            query_owners[query.id] = user.user_id
            _check_text(query.input, f"{query_at}: field 'input'", limits)
            _check_text(query.gold, f"{query_at}: field 'gold'", limits)
            _check_answer(task, query.gold, f"{query_at}: field 'gold'")
    return users


def load_lamp(
    questions_path: str | Path, outputs_path: str | Path, task_name: str, limits: DataLimits | None = None
) -> list[User]:
    """Users of a published LaMP split: *_questions.json + *_outputs.json.

    Entries sharing a `user_id` (the time-based split) are one user, and an item listed by several of its entries
    is one item; otherwise each entry is a user.
    """
    task = get_task(task_name)
    if task_name not in LAMP_FILE_TASK_NAMES:
        raise ValueError(f"task {task_name!r} is not a LaMP task; expected one of {', '.join(LAMP_FILE_TASK_NAMES)}")
    questions_path, outputs_path = Path(questions_path), Path(outputs_path)
    outputs = _read_json(outputs_path)
    file_task = _field(outputs, "task", str(outputs_path))
    if file_task != LAMP_FILE_TASK_NAMES[task_name]:
        raise DataError(
            f"{outputs_path}: field 'task' is {file_task!r}, expected {LAMP_FILE_TASK_NAMES[task_name]!r} for {task_name}"
        )
    golds: dict[str, str] = {}
    gold_index: dict[str, int] = {}
    for i, gold in enumerate(_field(outputs, "golds", str(outputs_path), (list,))):
        where = f"{outputs_path}: golds[{i}]"
        gold_id = _text(_field(gold, "id", where, (str, int)))
        if gold_id in golds:
            raise DataError(f"{where}: id {_shown(gold_id)} appears twice (also golds[{gold_index[gold_id]}]); "
                            "expected one gold output per question")
        golds[gold_id], gold_index[gold_id] = _text(_field(gold, "output", where, (str, int, float))), i
        _check_answer(task, golds[gold_id], f"{where}: field 'output'")

    entries = _read_json(questions_path)
    if not isinstance(entries, list):
        raise DataError(f"{questions_path}: expected a list of questions, got {type(entries).__name__}")
    users: dict[str, User] = {}
    seen_items: dict[str, dict[str, HistoryItem]] = {}
    entry_index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"{questions_path}: entry {i}"
        query_id = _text(_field(entry, "id", where, (str, int)))
        if query_id in entry_index:
            raise DataError(f"{where}: id {_shown(query_id)} appears twice (also entry {entry_index[query_id]}); "
                            "expected unique question ids")
        entry_index[query_id] = i
        where = f"{questions_path}: entry {i} (id {query_id})"
        query_input = _field(entry, "input", where)
        if query_id not in golds:
            raise DataError(f"{outputs_path}: no gold output for question id {query_id!r} ({where})")
        user_id = _text(_field(entry, "user_id", where, (str, int))) if "user_id" in entry else query_id
        user = users.setdefault(user_id, User(user_id=user_id, task=task_name, history=[]))
        known = seen_items.setdefault(user_id, {})
        for j, record in enumerate(_field(entry, "profile", where, (list,))):
            item = _history_item(record, task, f"{where}: profile[{j}]")
            if item.id not in known:
                known[item.id] = item
                user.history.append(item)
            elif known[item.id] != item:
                raise DataError(f"{where}: profile[{j}]: id {_shown(item.id)} names another item of user "
                                f"{_shown(user_id)} with other fields; expected one item per id")
        user.queries.append(Query(id=query_id, input=query_input, gold=golds[query_id]))
    for user in users.values():
        user.history = _chronological(user.history)
    return check_users(list(users.values()), str(questions_path), limits)


def load_oppu(path: str | Path, task_name: str, limits: DataLimits | None = None) -> list[User]:
    """Users in OPPU's processed format: a list of {user_id, profile: [...], query: [{id, input, gold}]}."""
    task = get_task(task_name)
    path = Path(path)
    records = _read_json(path)
    if isinstance(records, dict):  # a single user's file, as written to a node's store
        records = [records]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of users, got {type(records).__name__}")
    users = []
    for i, record in enumerate(records):
        where = f"{path}: user {i}"
        user_id = _text(_field(record, "user_id", where, (str, int)))
        where = f"{path}: user {i} (user_id {user_id})"
        if record.get("task", task_name) != task_name:
            raise DataError(f"{where}: field 'task' is {record['task']!r}, expected {task_name!r}")
        history = [
            _history_item(item, task, f"{where}: profile[{j}]")
            for j, item in enumerate(_field(record, "profile", where, (list,)))
        ]
        queries = []
        for j, q in enumerate(_field(record, "query", where, (list,))):
            q_where = f"{where}: query[{j}]"
            queries.append(
                Query(
                    id=_text(_field(q, "id", q_where, (str, int))),
                    input=_field(q, "input", q_where),
                    gold=_text(_field(q, "gold", q_where, (str, int, float))),
                )
            )
        users.append(User(user_id, task_name, _chronological(history), queries))
    return check_users(users, str(path), limits)


def movielens_dir() -> Path:
    """MovieLens-100K as shipped by the installed recbole package (never copied into this repo)."""
    return installed_asset("recbole", "dataset_example/ml-100k", "MovieLens-100K", DataError)


def _movielens_rating(line: str, where: str) -> tuple[str, str, float, str]:
    """(user, item, timestamp, rating as text) of one line of ml-100k.inter."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 4:
        raise DataError(
            f"{where}: {len(parts)} tab-separated fields ({_shown(line)}); expected 4 (user, item, rating, time)"
        )
    user_id, item_id, rating, timestamp = parts
    try:
        return user_id, item_id, float(timestamp), _text(float(rating))
    except ValueError:
        raise DataError(f"{where}: rating {_shown(rating)} or time {_shown(timestamp)} is no number") from None


def load_movielens(num_queries: int = 5, root: Path | None = None, limits: DataLimits | None = None) -> list[User]:
    """MovieLens-100K as a LaMP-3-style rating task: each user's latest ratings are its queries."""
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    root = root or movielens_dir()
    task = get_task("MovieLens")
    movies: dict[str, str] = {}
    with open(root / "ml-100k.item", encoding="latin-1") as f:
        next(f)
        for line in f:
            item_id, title, year, genres = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
            when = f" ({year})" if year else ""
            movies[item_id] = f"{title}{when}; genres: {', '.join(genres.split())}"
    ratings: dict[str, list[tuple[float, str, str]]] = {}
    inter = root / "ml-100k.inter"
    with open(inter, encoding="latin-1") as f:
        next(f)
        for n, line in enumerate(f, 2):
            user_id, item_id, timestamp, rating = _movielens_rating(line, f"{inter}: line {n}")
            if item_id not in movies:
                raise DataError(f"{inter}: line {n}: item {_shown(item_id)} is not in {root / 'ml-100k.item'}")
            ratings.setdefault(user_id, []).append((timestamp, item_id, rating))
    users = []
    for user_id, rows in ratings.items():
        rows.sort()
        items = [
            HistoryItem(
                id=item_id,
                fields={"movie": movies[item_id], "score": score},
                date=datetime.fromtimestamp(ts).isoformat(),
            )
            for ts, item_id, score in rows
        ]
        cut = max(0, len(items) - num_queries)  # a user with fewer ratings keeps none as history (and is refused)
        history, latest = items[:cut], items[cut:]
        queries = [
            Query(id=f"{user_id}-{h.id}", input=task.item_example(h.fields)[0], gold=h.fields["score"])
            for h in latest
        ]
        users.append(User(user_id=user_id, task="MovieLens", history=history, queries=queries))
    return check_users(users, str(inter), limits)


_WORDS = (
    "river night city robot family war love ship space detective island winter school music king "
    "dragon train secret storm garden mountain letter doctor village mirror clock forest bridge"
).split()


def synthetic_users(
    num_users: int,
    history_len: int = 24,
    num_queries: int = 4,
    preference_share: float = 0.9,
    seed: int = 0,
    labels: tuple[str, ...] = MOVIE_TAGS[:4],
    limits: DataLimits | None = None,
) -> list[User]:
    """Movie-tagging users with a planted preference: each mostly tags with one favourite tag.

    Descriptions are random words, so the favourite tag is learnable only from the user's own history.
    """
    task = get_task("LaMP-2M")
    rng = random.Random(seed)
    start = datetime(2020, 1, 1)
    users = []
    for u in range(num_users):
        favourite = labels[u % len(labels)]

        def item_fields() -> dict[str, str]:
            tag = favourite if rng.random() < preference_share else rng.choice(labels)
            return {"description": " ".join(rng.choices(_WORDS, k=6)), "tag": tag}

        history = [
            HistoryItem(id=f"u{u}-h{i}", fields=item_fields(), date=(start + timedelta(days=i)).date().isoformat())
            for i in range(history_len)
        ]
        queries = []
        for i in range(num_queries):
            question, gold = task.item_example(item_fields())
            queries.append(Query(id=f"u{u}-q{i}", input=question, gold=gold))
        users.append(User(user_id=f"synthetic-{u}", task="LaMP-2M", history=history, queries=queries))
    return check_users(users, "synthetic users", limits)
