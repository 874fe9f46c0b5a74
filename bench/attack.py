"""What a curious server learns from task adaptation, and what each defense costs, side by side in one run.

    python -m bench.attack --num-clients 10 --train-clients 10 -- --model tiny-random --rounds 1
    python -m bench.attack --configs none,secure-aggregation -- --task LaMP-2M --data synthetic --model tiny-random

Flags after `--` go to every flower-simulation run (each also gets --canaries, --record-server-view and its
configuration's flags). For each configuration it runs a real federated run, then attacks what the server holds of
every round, as the run recorded it (server/view.py): per
training node, the task LoRA it can attribute to that node (the node's own update in clear; under secure
aggregation only the round's average, the same for every node of the round):
- membership inference: the score of (update U, user v) is the loss drop that U alone gives on v's history items
  (the items task adaptation trains on): loss under the round's global task LoRA minus loss under U, less the
  median drop U gives the outsiders (an update that lowers every user's loss says nothing about who trained it).
  Members are (the node's update, its own user); non-members (that update, a test user: never in any round).
  ROC AUC with a bootstrap 95% interval and the TPR at 1% FPR over these pairs; 0.5 and 0.01 are chance; the
  AUC of the uncalibrated drop is kept beside it;
- canary exposure (Carlini et al. 2019): the planted string's rank, by likelihood after the text it follows in the
  user's latest history item, among CANDIDATES random strings of its shape under U; exposure
  log2(CANDIDATES + 1) - log2(rank) (0 = no better than chance, log2(CANDIDATES + 1) = ranked first), mean over
  members;
- the price: primary metric of base (the task-adapted base) and oppu, epsilon, task-adaptation seconds and
  bytes per round (both directions, from the audit).
The node -> user ground truth is the experimenter's: each training node notes its node id in its own store.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from bench.common import finish
from common.store import atomic_write_json
from server.view import read_server_view

CONFIGS: dict[str, list[str]] = {
    "none": [],
    "server-dp": ["--dp-noise", "{noise}"],
    "client-dp": ["--local-dp-epsilon", "{epsilon}"],
    "secure-aggregation": ["--secure-aggregation"],
    "secure-aggregation+dp": ["--secure-aggregation", "--dp-noise", "{noise}"],
}
CANDIDATES = 63  # random canaries each planted one is ranked against
NODE_ID = "node-id"  # file in a training node's store: the experimenter's ground truth


def _noting(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """The handler, after which the node notes its node id in its store (the server is never told)."""

    def noted(msg: Message, context: Context) -> Message:
        from client.app import node_user

        reply = handler(msg, context)
        (node_user(context)[2] / NODE_ID).write_text(str(context.node_id))
        return reply

    return noted


def noting_app(run_dir: Path) -> ClientApp:
    from client.app import adapt, adapt_secure, make_client_app

    return make_client_app(run_dir, adapt=_noting(adapt), adapt_secure=_noting(adapt_secure))


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """P(a member's score > a non-member's), ties half (Mann-Whitney U)."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def calibrate(drops: list[tuple[float, list[float]]]) -> tuple[list[float], list[float]]:
    """Each update's scores minus the median outsider drop under that update (per-update difficulty calibration):
    an update that lowers everyone's loss says nothing about who trained it; only a drop beyond the outsiders'
    does. (member scores, non-member scores)."""
    members, non_members = [], []
    for member, outsiders in drops:
        middle = float(np.median(outsiders))
        members.append(member - middle)
        non_members += [x - middle for x in outsiders]
    return members, non_members


def auc_interval(positives: list[float], negatives: list[float], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of roc_auc, members and non-members resampled apart: how far from 0.5 is noise."""
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(positives), np.asarray(negatives)
    aucs = [roc_auc(rng.choice(pos, pos.size).tolist(), rng.choice(neg, neg.size).tolist()) for _ in range(resamples)]
    return float(np.quantile(aucs, (1 - level) / 2)), float(np.quantile(aucs, (1 + level) / 2))


def tpr_at_fpr(positives: list[float], negatives: list[float], fpr: float = 0.01) -> float:
    """Share of members scored above the threshold that at most `fpr` of the non-members exceed."""
    threshold = float(np.quantile(negatives, 1 - fpr, method="higher"))
    return float(np.mean(np.asarray(positives) > threshold))


class Scorer:
    """Losses and canary likelihoods under task-LoRA states, on the base model the server announced."""

    def __init__(self, cfg, users: dict[str, Any]):
        from transformers import AutoTokenizer

        from client.adapters import attach_fresh
        from client.model_build import resolve_model
        from client.model_loading import load_fresh
        from client.task_adapter import task_lora
        from client.training import history_examples
        from common.tasks import get_task

        model_dir = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = attach_fresh(load_fresh(model_dir, "cpu", "float32"), task_lora(cfg), "attack", 0)
        self.model.eval()
        task = get_task(cfg.task)
        self.field = task.item_fields[0]
        self.examples = {uid: history_examples(u, task, self.tokenizer, cfg.prompt_settings(0),
                                               max_items=cfg.task_history or None) for uid, u in users.items()}
        self.users = users
        self._state: int | None = None

    def _load(self, arrays: dict[str, np.ndarray]) -> None:
        from client.adapters import load_adapter_state

        if self._state != id(arrays):
            load_adapter_state(self.model, "attack", {name: torch.from_numpy(v) for name, v in arrays.items()})
            self._state = id(arrays)

    @torch.no_grad()
    def _nll(self, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
        from client.forward import answer_logprobs

        logprobs, mask = answer_logprobs(self.model, prompts, answers, self.tokenizer.pad_token_id)
        return (-(logprobs * mask).sum(1) / mask.sum(1)).tolist()

    def loss(self, arrays: dict[str, np.ndarray], user: str) -> float:
        """Mean answer-token loss of the user's history examples under `arrays`."""
        self._load(arrays)
        examples = self.examples[user]
        return float(np.mean([x for i in range(0, len(examples), 8) for x in self._nll(
            [e.prompt for e in examples[i:i + 8]], [e.answer for e in examples[i:i + 8]])]))

    def exposure(self, arrays: dict[str, np.ndarray], user: str, canary: str, seed: int) -> float:
        """Exposure of the user's canary under `arrays` among CANDIDATES random strings of its shape."""
        self._load(arrays)
        text = self.users[user].history[-1].fields[self.field]
        prefix = self.tokenizer(text[: text.index(canary)], add_special_tokens=False)["input_ids"] or [
            self.tokenizer.eos_token_id]
        rng = random.Random(seed)
        strings = [canary] + ["canary" + "".join(rng.choice("0123456789abcdef") for _ in range(16))
                              for _ in range(CANDIDATES)]
        answers = [self.tokenizer(s, add_special_tokens=False)["input_ids"] for s in strings]
        nll = self._nll([prefix] * len(strings), answers)
        rank = 1 + sum(x < nll[0] for x in nll[1:])
        return math.log2(len(strings)) - math.log2(rank)


def attack(run_dir: Path, cfg) -> dict[str, Any]:
    """Membership AUC, TPR at 1% FPR and mean canary exposure against what the server of `run_dir` holds."""
    from client.data import load_oppu

    nodes = json.loads((run_dir / "nodes.json").read_text())
    users, roles, node_user = {}, {}, {}
    for entry in nodes:
        store = run_dir / "clients" / entry["user"]
        record = json.loads((store / "data.json").read_text())
        users[entry["user"]] = load_oppu(store / "data.json", record["task"])[0]
        roles[entry["user"]] = record["role"]
        if (store / NODE_ID).exists():
            node_user[int((store / NODE_ID).read_text())] = entry["user"]
    canaries = json.loads((run_dir / "audit" / "canaries.json").read_text())
    outsiders = [u for u, role in roles.items() if role == "test"]
    scorer = Scorer(cfg, users)
    view = read_server_view(run_dir)  # the run's --record-server-view
    drops: list[tuple[float, list[float]]] = []  # per update: (its member's loss drop, the outsiders' drops)
    exposures = []
    for server_round, held in view.items():
        print(f"bench.attack: scoring round {server_round}: {len(held.updates)} update(s) x {len(outsiders) + 1} "
              "user(s) and a canary ranking each", flush=True)
        before = {u: scorer.loss(held.sent, u) for u in users}
        for node, (_, arrays) in held.updates.items():
            user = node_user[node]
            outsider_drops = [before[v] - scorer.loss(arrays, v) for v in outsiders]
            drops.append((before[user] - scorer.loss(arrays, user), outsider_drops))
            exposures.append(scorer.exposure(arrays, user, canaries[user], seed=server_round * 1000 + node % 1000))
    members, non_members = [m for m, _ in drops], [x for _, others in drops for x in others]
    calibrated_members, calibrated_non_members = calibrate(drops)
    return {"membership_auc": roc_auc(calibrated_members, calibrated_non_members),
            "auc_95": auc_interval(calibrated_members, calibrated_non_members),
            "tpr_at_1pct_fpr": tpr_at_fpr(calibrated_members, calibrated_non_members),
            "membership_auc_uncalibrated": roc_auc(members, non_members),
            "canary_exposure": float(np.mean(exposures)), "canary_exposure_max": math.log2(CANDIDATES + 1),
            "pairs": {"members": len(members), "non_members": len(non_members)},
            "scores": {"members": members, "non_members": non_members}}


def price(run_dir: Path, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Utility, privacy accounting, time and bytes of one run (bytes per round from the audit's phases)."""
    from common.metrics import primary_metric
    from common.tasks import get_task
    from simulation.privacy_audit import audit

    metric, _ = primary_metric(get_task(report["config"]["task"]))
    summary = audit(run_dir)
    adaptation = {k: v for phase, v in summary["phases"].items() if phase in ("adapt", "secure-adapt")
                  for k in [phase]}
    rounds = max(1, report["config"]["rounds"])
    traffic = next(iter(adaptation.values()), {})
    dp = report["task_adaptation"]["differential_privacy"]
    return {
        "metric": metric,
        **{method: report["methods"][method]["metrics"][metric] for method in report["methods"]},
        "epsilon": dp["epsilon"] if dp else None,
        "audit_passed": summary["passed"],
        "task_adaptation_seconds": report["timings"]["task-adaptation-seconds"],
        "run_seconds": seconds,
        "bytes_per_round": (traffic.get("bytes_up", 0) + traffic.get("bytes_down", 0)) / rounds,
        "messages_per_round": (traffic.get("messages_up", 0) + traffic.get("messages_down", 0)) / rounds,
    }


def run_config(name: str, flags: list[str], base_dir: Path) -> dict[str, Any]:
    """One flower-simulation run of a configuration, attacked and priced."""
    from common.config import RunConfig
    from simulation.engine import SimulationOptions, simulate
    from simulation.flags import build_parser, check_run_flags, user_counts

    parser = build_parser()
    args = parser.parse_args([*flags, "--canaries", "--record-server-view", "--run-dir", str(base_dir / name)])
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    check_run_flags(args, cfg)
    start = time.perf_counter()
    run_dir, report = simulate(cfg, user_counts(args), SimulationOptions.from_args(args), noting_app)
    seconds = time.perf_counter() - start
    if report is None:
        raise RuntimeError(f"bench.attack: the run of {name} did not finish ({run_dir})")
    return {"flags": flags, **attack(run_dir, cfg), **price(run_dir, report, seconds)}


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(results.values()))
    methods = [k for k in first if k in ("base", "oppu", "rag-k1", "pag", "oppu+rag-k1")]
    head = ["configuration", "membership AUC (95% CI)", "uncalibrated AUC", "TPR@1%FPR", "canary exposure",
            *[f"{m} {first['metric']}" for m in methods], "epsilon", "task-adaptation s", "KB/round", "audit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        low, high = r["auc_95"]
        lines.append(f"| {name} | {r['membership_auc']:.3f} [{low:.2f}, {high:.2f}] | "
                     f"{r['membership_auc_uncalibrated']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | "
                     f"{r['canary_exposure']:.2f} / {r['canary_exposure_max']:.2f} | "
                     + " | ".join(f"{r[m]:.4f}" for m in methods)
                     + f" | {eps} | {r['task_adaptation_seconds']:.1f} | {r['bytes_per_round'] / 1e3:,.0f} | "
                     f"{'pass' if r['audit_passed'] else 'FAIL'} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import cloudpickle

    import bench.attack

    parser = argparse.ArgumentParser(prog="bench.attack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10, help="test users: the non-members")
    parser.add_argument("--train-clients", type=int, default=10, help="training users: the members")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--noise", type=float, default=1.0, help="--dp-noise of the server-dp and distributed runs")
    parser.add_argument("--epsilon", type=float, default=8.0, help="--local-dp-epsilon of the client-dp run")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the runs go (default runs/bench-attack-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("simulation", nargs=argparse.REMAINDER, help="-- then flower-simulation flags for every run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown or 'none given'}; expected names from {', '.join(CONFIGS)}")
    extra = args.simulation[1:] if args.simulation[:1] == ["--"] else args.simulation
    base_dir = args.run_dir or Path("runs") / f"bench-attack-{datetime.now():%Y%m%d-%H%M%S}"
    cloudpickle.register_pickle_by_value(bench.attack)  # Ray workers run noting_app's handlers
    results = {}
    for name in names:
        flags = [f.format(noise=args.noise, epsilon=args.epsilon) for f in CONFIGS[name]]
        common = ["--num-clients", str(args.num_clients), "--train-clients", str(args.train_clients), *extra]
        results[name] = run_config(name, [*common, *flags], base_dir)
        print(f"bench.attack: {name} done ({len(results)} of {len(names)})", flush=True)
        if args.out:  # a configuration's figures survive a later one's crash
            atomic_write_json(args.out, {"command": argv, "configs": results, "finished": False})
    return finish(args, {"command": argv, "configs": results}, table(results))


if __name__ == "__main__":
    main()
