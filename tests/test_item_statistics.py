"""--item-statistics on a device: a training user's contribution, the table's wire form, and prompts annotated from
the training users' table without the user's own ratings (hand-computed values); a real run in which only
training users' nodes send a table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.data import HistoryItem, Query, User, load_oppu
from client.item_statistics import annotate, contribution, others_line, others_table
from common import protocol as p
from common.config import RunConfig
from common.item_table import BUCKETS, SHRINK, ItemReading, ItemTable, bucket
from common.tasks import get_task
from common.store import atomic_write_json
from server.item_statistics import item_table_path, sum_item_tables, table_key
from simulation.engine import SimulationOptions, simulate
from simulation.errors import SetupError
from simulation.flags import build_parser, check_run_flags, run_config_of, user_counts
from simulation.privacy_audit import main as audit_main

MOVIELENS = get_task("MovieLens")


def rated(user_id: str, ratings: list[tuple[str, int]], asked: list[tuple[str, int]] = ()) -> User:
    history = [HistoryItem(id=m, fields={"movie": m, "score": str(s)}) for m, s in ratings]
    queries = [Query(id=f"{user_id}-{m}", input=MOVIELENS.question_template.format(movie=m), gold=str(s))
               for m, s in asked]
    return User(user_id, "MovieLens", history, queries)


def summed(users: list[User]) -> ItemTable:
    """The table SecAgg+ gives the server: the sum of every node's vector."""
    return ItemTable.from_vector([np.sum(parts, axis=0) for parts in zip(*(contribution(u, MOVIELENS).vector()
                                                                             for u in users))])


def test_a_contribution_holds_each_rating_and_its_offset_from_the_users_mean() -> None:
    table = contribution(rated("a", [("hit", 5), ("flop", 1), ("meh", 3)]), MOVIELENS)
    b = bucket("hit")
    assert (table.ratings[b], table.offsets[b], table.counts[b]) == (5.0, 2.0, 1.0)
    assert table.offsets[bucket("flop")] == -2.0 and table.items() == 3 and table.counts.shape == (BUCKETS,)
    assert contribution(rated("empty", []), MOVIELENS).items() == 0


def test_readings_are_shrunk_toward_the_population() -> None:
    table = summed([rated("a", [("hit", 5), ("flop", 1)]), rated("b", [("hit", 4), ("x", 2)])])
    # population mean (5 + 1 + 4 + 2) / 4 = 3; hit: ratings 9, offsets 2 + 1, 2 raters
    assert table.read(["hit"])[0] == ItemReading(mean=pytest.approx((9 + SHRINK * 3) / (2 + SHRINK)),
                                            offset=pytest.approx(3 / (2 + SHRINK)), raters=2)
    assert table.read(["never rated"])[0] == ItemReading(mean=3.0, offset=0.0, raters=0)  # the population, nobody


def test_the_wire_form_keeps_rated_buckets_and_averages_turn_back_into_sums() -> None:
    table = summed([rated("a", [("hit", 5), ("flop", 1)]), rated("b", [("hit", 4), ("x", 2)])])
    config = table.to_config()
    assert len(config[p.ITEM_BUCKETS]) == 3
    again = ItemTable.from_config(config)
    assert again is not None and again.read(["hit"])[0] == table.read(["hit"])[0]
    assert ItemTable.from_config({}) is None
    average = [a / 2 + 1e-6 for a in table.vector()]  # SecAgg+'s average of 2 nodes, with quantization noise
    back = ItemTable.from_vector(average, scale=2)
    assert back.counts[bucket("hit")] == 2.0 and back.ratings[bucket("hit")] == pytest.approx(9.0, abs=1e-5)


def test_prompts_read_the_others_ratings_without_the_users_own() -> None:
    others = [rated(f"r{i}", [("hit", 5), ("flop", 1)]) for i in range(6)]  # each: hit +2, flop -2
    me = rated("me", [("hit", 1), ("old", 3)], asked=[("flop", 2), ("unseen", 3)])  # my level 2: hit -1
    without_me = summed(others)
    # a training user's ratings are in the sum and come out; a test user's never went in
    assert np.array_equal(others_table(me, "train", MOVIELENS, summed([*others, me])).ratings, without_me.ratings)
    assert others_table(me, "test", MOVIELENS, without_me) is without_me
    view = annotate(me, MOVIELENS, others_table(me, "train", MOVIELENS, summed([*others, me])))
    question, answer = MOVIELENS.item_example(view.history[0].fields)
    assert question == MOVIELENS.question_template.format(movie=f"hit; {others_line(without_me.read(['hit'])[0])}")
    assert answer == "1" and MOVIELENS.item_text(view.history[0].fields) == "hit; rated 1 of 5"  # retrieved: as it was
    assert others_line(ItemReading(4.12, 1.09, 6)) == ("other users rate it 4.1 on average, +1.1 against their "
                                                      "usual rating (6 rated it)")
    assert MOVIELENS.item_example(view.history[1].fields)[0] == MOVIELENS.question_template.format(movie="old")
    assert view.queries[0].input == MOVIELENS.question_template.format(
        movie=f"flop; {others_line(without_me.read(['flop'])[0])}")
    assert view.queries[1].input == me.queries[1].input
    assert view.history[0].fields["score"] == "1" and view.queries[0].gold == "2"


def test_a_resumed_run_reuses_the_saved_table_and_sends_no_message(tmp_path: Path) -> None:
    cfg = RunConfig(item_statistics=True)
    table = summed([rated("a", [("hit", 5), ("flop", 1)]), rated("b", [("hit", 4)])])
    record = {"nodes": 2, "items": 2, "ratings": 3}
    atomic_write_json(item_table_path(tmp_path), {"key": table_key(cfg), "record": record, **table.to_config()})
    reused, kept = sum_item_tables(None, cfg, ConfigRecord(), [1, 2], tmp_path, 1.0)  # type: ignore[arg-type]
    assert kept == record and reused.read(["hit"])[0] == table.read(["hit"])[0] and reused.items() == 2
    assert table_key(RunConfig(item_statistics=True, split="validation")) != table_key(cfg)


def test_item_statistics_is_on_for_rating_tasks_only() -> None:
    assert RunConfig().uses_item_table() and not RunConfig(item_statistics=False).uses_item_table()
    assert not RunConfig(task="LaMP-2M").uses_item_table()  # a label task has no ratings to sum
    assert build_parser().parse_args(["--no-item-statistics"]).item_statistics is False
    # only training users' tables are summed: the split (which test items are questions) leaves the task adapter alone
    assert "split" not in RunConfig(item_statistics=True).task_adaptation_settings()


def test_the_table_needs_two_training_users(tmp_path: Path) -> None:
    parser = build_parser()
    for flags in (["--train-clients", "1"], ["--rounds", "0"]):
        args = parser.parse_args(["--item-statistics", "--run-dir", str(tmp_path / "run"), *flags])
        with pytest.raises(SetupError, match="item table is summed over 2 or more training users"):
            check_run_flags(args, run_config_of(args, parser))


def test_a_run_sums_the_training_users_tables_under_secagg_and_reports_the_item_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real run (tiny model, MovieLens, 3 test and 2 training users): the server's table is the exact sum of the
    two training nodes' tables as each store holds its user, no test user's node sent one, the reference rows built
    on it are reported, the console's bar counted every node's reply in SecAgg+'s four stages, and the audit passes
    (the tables travelled masked; test nodes replied only to announce, transfer and personalize)."""
    run_dir = tmp_path / "run"
    argv = ["--model", "tiny-random", "--num-clients", "3", "--train-clients", "2", "--rounds", "1", "--methods",
            "base", "--split", "validation", "--item-statistics", "--task-history", "4", "--max-history", "4",
            "--run-dir", str(run_dir), "--canaries"]
    parser = build_parser()
    args = parser.parse_args(argv)
    _, report = simulate(run_config_of(args, parser), user_counts(args), SimulationOptions.from_args(args))
    assert report is not None and report["item_statistics"]["nodes"] == 2
    bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if line.startswith("item statistics (SecAgg+ over 2 nodes)")]
    assert bar and bar[-1].split("|")[-1].split()[0] == "8/8"  # its last redraw: replies counted / expected
    expected = ItemTable.empty()
    for data in sorted(run_dir.glob("clients/*/data.json")):
        if json.loads(data.read_text())["role"] == "test":
            continue
        mine = contribution(load_oppu(data, "MovieLens")[0], MOVIELENS)
        expected = expected.plus(mine)
    table = ItemTable.from_config(json.loads((run_dir / "server" / "item_table.json").read_text()))
    assert table is not None and table.items() == expected.items() > 40
    assert np.array_equal(table.counts, expected.counts)
    assert np.allclose(table.ratings, expected.ratings, atol=1e-3)
    assert np.allclose(table.offsets, expected.offsets, atol=1e-3)
    assert {"ref-population", "ref-level-item"} <= set(report["references"])
    assert audit_main([str(run_dir)]) == 0


def test_the_item_table_is_summed_only_where_users_share_items() -> None:
    """LaMP-3's items are each user's own reviews: hashed, millions of them would fill every bucket with unrelated
    reviews, and every question would read "other users rate it ..." of nothing; its SecAgg+ round is skipped."""
    assert RunConfig(task="MovieLens").uses_item_table()
    assert not RunConfig(task="MovieLens", item_statistics=False).uses_item_table()
    assert not RunConfig(task="LaMP-3").uses_item_table()
    assert not RunConfig(task="LaMP-2M").uses_item_table()
