"""--item-dp-epsilon: the item table as a user-level DP release. One user's part is bounded (clipped), the nodes'
noise shares add up to the accounted noise, the server keeps only buckets above the noise, a noisy table is read
with more shrinkage and within the rating scale, the accounting matches the epsilon asked for, bad flags are
refused, and a real run sums noised tables under SecAgg+ and reports what it spent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from client.data import load_oppu
from client.item_statistics import contribution, others_table, sent_vector
from common import protocol as p
from common.exit_status import BAD_INPUT
from common.config import RunConfig
from common.item_table import CENTRE, KEEP_ABOVE, NOISE_SHRINK, SHRINK, ItemTable, bucket
from common.privacy import release_epsilon, release_noise_multiplier
from common.tasks import get_task
from server.item_statistics import privacy_record
from simulation.cli import main as cli_main
from simulation.privacy_audit import main as audit_main
from tests.test_item_statistics import rated

MOVIELENS = get_task("MovieLens")


def private_norm(table: ItemTable) -> float:
    """The L2 norm of a table's vector as --item-dp-epsilon sends it (ratings centred)."""
    return math.sqrt(sum(float(np.square(a).sum()) for a in (table.ratings - CENTRE * table.counts, table.offsets,
                                                              table.counts)))


def test_a_users_table_is_scaled_to_the_clip_and_keeps_its_means() -> None:
    heavy = rated("heavy", [(f"m{i}", 1 + i % 5) for i in range(40)])
    mine = contribution(heavy, MOVIELENS)
    assert private_norm(mine) > 3
    clipped = contribution(heavy, MOVIELENS, clip=3.0)
    assert private_norm(clipped) == pytest.approx(3.0)
    scale = clipped.counts[bucket("m0")]
    assert 0 < scale < 1  # every item of the user weighs the same, less than 1
    assert np.allclose(clipped.ratings, scale * mine.ratings) and np.allclose(clipped.offsets, scale * mine.offsets)
    light = contribution(rated("light", [("hit", 4)]), MOVIELENS)
    assert private_norm(light) < 3 and np.array_equal(light.clipped(3.0).ratings, light.ratings)  # within: as is


def test_the_noise_multiplier_spends_the_epsilon_asked_for() -> None:
    for epsilon in (1.0, 5.0, 20.0):
        z = release_noise_multiplier(epsilon, 1e-5)
        assert release_epsilon(z, 1e-5) == pytest.approx(epsilon, rel=1e-3)
        assert release_epsilon(z * 0.9, 1e-5) > epsilon  # less noise spends more
    multipliers = [release_noise_multiplier(epsilon, 1e-5) for epsilon in (1.0, 5.0, 20.0)]
    assert multipliers[0] > multipliers[1] > multipliers[2]
    cfg = RunConfig(item_dp_epsilon=5.0, item_dp_clip=2.0)
    assert cfg.item_noise_std() == pytest.approx(2.0 * release_noise_multiplier(5.0, 1e-5))
    assert RunConfig().item_noise_std() == 0.0
    # nodes that drop out take their noise shares with them: the release then spent more
    assert privacy_record(cfg, cfg.item_noise_std() * math.sqrt(0.5))["epsilon"] > 5.0 * 1.3
    assert privacy_record(cfg, cfg.item_noise_std())["epsilon"] == pytest.approx(5.0, rel=1e-3)


def test_the_nodes_noise_shares_add_up_to_the_accounted_noise() -> None:
    cfg = RunConfig(item_dp_epsilon=5.0)
    nodes = 16
    vectors = [sent_vector(rated(f"u{i}", []), cfg, nodes) for i in range(nodes)]  # empty tables: noise alone
    total = np.concatenate([np.sum(parts, axis=0) for parts in zip(*vectors)])
    assert np.std(total) == pytest.approx(cfg.item_noise_std(), rel=0.02)
    assert abs(np.mean(total)) < 0.05 * cfg.item_noise_std()
    exact = sent_vector(rated("u", [("hit", 5), ("flop", 1)]), RunConfig(), nodes)  # without DP: no noise
    assert np.count_nonzero(np.concatenate(exact)) == 6  # 2 ratings, 2 offsets, 2 counts


def test_the_server_keeps_the_buckets_above_the_noise_and_reads_them_harder() -> None:
    noise = 2.0
    centred = [np.zeros(1 << 16) for _ in range(3)]
    hit, rare = bucket("hit"), bucket("rare")
    centred[0][hit], centred[1][hit], centred[2][hit] = 10.0, 6.0, 10.0  # ratings 4 centred: 10 x (4 - 3)
    centred[0][rare], centred[1][rare], centred[2][rare] = 2.0, 1.0, KEEP_ABOVE * noise - 0.5  # under the bar
    table = ItemTable.from_vector(centred, noise_std=noise)
    assert table.items() == 1 and table.counts[rare] == 0 and table.ratings[rare] == 0
    assert table.ratings[hit] == pytest.approx(10 + CENTRE * 10)  # un-centred: a sum of ratings again
    reading = table.read(["hit"])[0]
    shrink = SHRINK + NOISE_SHRINK * noise
    assert reading.mean == pytest.approx(4.0)  # the population is this one item: shrinking keeps it
    assert reading.offset == pytest.approx(6.0 / (10 + shrink)) and reading.raters == 10
    again = ItemTable.from_config(table.to_config())
    assert again is not None and again.noise_std == noise and again.read(["hit"])[0] == reading
    assert p.ITEM_NOISE not in ItemTable.from_vector(centred).to_config()  # exact sums carry no noise key
    wild = ItemTable.from_vector([np.full(1 << 16, 400.0), np.full(1 << 16, -300.0), np.full(1 << 16, 20.0)],
                                 noise_std=noise)
    assert wild.read(["hit"])[0].mean == 5.0 and wild.read(["hit"])[0].offset == -4.0  # within the scale


def test_a_training_user_takes_out_its_clipped_part_and_dropped_buckets_stay_empty() -> None:
    me = rated("me", [("hit", 5), ("gone", 1)] + [(f"m{i}", 3) for i in range(30)])
    mine = contribution(me, MOVIELENS, clip=3.0)
    others = contribution(rated("other", [("hit", 4)]), MOVIELENS, clip=3.0)
    noisy = mine.plus(others)
    noisy.counts[bucket("gone")] = 0.0  # the server dropped it: below the noise
    noisy.ratings[bucket("gone")] = noisy.offsets[bucket("gone")] = 0.0
    noisy.noise_std = 1.0
    rest = others_table(me, "train", MOVIELENS, noisy, clip=3.0)
    assert rest.ratings[bucket("hit")] == pytest.approx(others.ratings[bucket("hit")])
    assert rest.counts[bucket("gone")] == 0 and rest.ratings[bucket("gone")] == 0  # not minus my rating
    assert rest.noise_std == 1.0


@pytest.mark.parametrize("flags, expected", [
    (["--item-dp-epsilon", "-1"], "item-dp-epsilon must be >= 0"),
    (["--item-dp-epsilon", "2", "--no-item-statistics"], "item-dp-epsilon makes the item table"),
    (["--item-dp-clip", "0"], "item-dp-clip must be > 0"),
])
def test_bad_item_dp_flags_exit_2_with_one_line(flags: list[str], expected: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli_main([*flags, "--run-dir", str(tmp_path / "run")])
    except SystemExit as stop:  # argparse's own exit, as for every refused flag (tests/test_exit_status.py)
        status = stop.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == BAD_INPUT and (len(lines) == 1 or lines[0].startswith("usage:"))
    assert lines[-1].startswith("flower-simulation") and expected in lines[-1]
    assert not (tmp_path / "run").exists()


def test_a_run_sums_noised_tables_and_reports_the_epsilon(tmp_path: Path) -> None:
    """A real run (tiny model, 2 test and 4 training users, epsilon 5): the saved table carries the noise the
    report accounts for, its sums are not the exact ones, report.md states the release, and the audit passes."""
    run_dir = tmp_path / "run"
    assert cli_main(["--model", "tiny-random", "--num-clients", "2", "--train-clients", "4", "--rounds", "1",
                     "--methods", "base", "--item-dp-epsilon", "5", "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    dp = report["item_statistics"]["dp"]
    cfg = RunConfig(item_dp_epsilon=5.0)
    assert dp["epsilon"] == pytest.approx(5.0, rel=1e-3) and dp["noise_std"] == pytest.approx(cfg.item_noise_std())
    assert report["item_statistics"]["nodes"] == 4 and dp["clip"] == 3.0
    table = ItemTable.from_config(json.loads((run_dir / "server" / "item_table.json").read_text()))
    assert table is not None and table.noise_std == pytest.approx(dp["noise_std"])
    exact = ItemTable.empty()
    for data in sorted(run_dir.glob("clients/*/data.json")):
        record = json.loads(data.read_text())
        if record["role"] == "train":
            exact = exact.plus(contribution(load_oppu(data, "MovieLens")[0], MOVIELENS, clip=3.0))
    assert not np.allclose(table.counts, exact.counts)  # noised
    assert (table.counts[table.counts > 0] > KEEP_ABOVE * dp["noise_std"]).all()
    assert "Item table with user-level DP" in (run_dir / "report.md").read_text()
    assert audit_main([str(run_dir)]) == 0
