"""The run's one typed configuration: defaults here, overridden by the command line or Flower's run config.

Keys are Flower-style kebab-case ("personal-lr"); the same keys appear in pyproject's
[tool.flwr.app.config] (a test keeps the two in step). The config travels to clients inside each
message's ConfigRecord, since `context.run_config` is empty under the simulation engine.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.methods import method_name, parse_method
from common.metrics import DECISION_RULES, decision_rule
from common.tasks import HISTORY_FORMATS, TASKS, HistoryFormat, get_task

PeftKind = Literal["lora", "ia3", "prompt"]


PEFT_KINDS: tuple[PeftKind, ...] = ("lora", "ia3", "prompt")


@dataclass(frozen=True)
class PeftSettings:
    """What kind of PEFT module and its size (the paper: LoRA r=8 on q,v)."""

    kind: PeftKind = "lora"
    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    virtual_tokens: int = 8

    def __post_init__(self) -> None:
        if self.kind not in PEFT_KINDS:
            raise ValueError(f"peft kind {self.kind!r} is not one of {', '.join(PEFT_KINDS)}")
        if self.r < 1 or self.virtual_tokens < 1:
            raise ValueError(f"LoRA rank and prompt length must be >= 1, got r={self.r}, tokens={self.virtual_tokens}")


@dataclass(frozen=True)
class DataLimits:
    """Sizes a user may bring (RunConfig's --max-text-chars, --max-user-history): a bigger record is more likely a
    broken file than data, and would otherwise surface hours later as a device out of memory."""

    max_text_chars: int
    max_user_history: int


HISTORY_SELECTIONS = ("recent", "least-relevant")


SPLITS = ("test", "validation")
TASK_LR_SCHEDULES = ("constant", "linear")


DTYPES = ("float32", "bfloat16")


QUANTIZATIONS = ("none", "nf4")


def check_dtype_name(dtype: str) -> None:
    """'auto', 'float32' or 'bfloat16'; anything else is an error (checked without measuring anything)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {' or '.join(DTYPES)}; got {dtype!r}")


def check_device_name(device: str) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; anything else is an error (checked without touching a device)."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are built: retrieved items (RAG k), user profile (PAG), token budget, what history items teach."""

    k: int = 0
    use_profile: bool = False
    max_prompt_tokens: int = 384
    max_answer_tokens: int = 64
    history_format: HistoryFormat = "both"  # see TaskSpec.item_target


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation of one adapter (personal or the task adapter's local steps)."""

    epochs: float = 1.0
    lr: float = 5e-4
    max_batch_tokens: int = 2048
    max_steps: int | None = None


DEFAULT_METHODS = ("base", "rag", "pag", "oppu", "oppu+rag")
# the least value of each integer setting, and the float settings that must be positive
AT_LEAST = {
    "rounds": 0, "train_per_round": 1, "max_history": 0, "task_history": 0, "seed": 0, "k": 1, "lora_alpha": 1,
    "max_prompt_tokens": 1, "batch_tokens": 1, "task_batch_tokens": 0, "profile_items": 1, "profile_max_tokens": 1,
    "num_queries": 1, "validation_items": 1, "selection_items": 1, "max_text_chars": 1, "max_user_history": 1,
}
POSITIVE = ("local_epochs", "task_lr", "personal_epochs", "personal_lr", "item_dp_clip")
# settings that only test users' personalization and evaluation read: a task adapter made under other values of
# these serves as well (`--task-adapter-from`); of `methods` and `k` task adaptation reads only the retrieval depths
PERSONALIZATION_ONLY = (
    "methods", "k", "decision", "peft", "personal_epochs", "personal_lr", "max_history", "history_selection",
    "selection_items", "history_format", "profile_items", "profile_max_tokens", "split", "validation_items",
    "answer_calibration",
)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _key(name: str) -> str:
    """A field's config key and flag name (max_history -> max-history)."""
    return name.replace("_", "-")


PERSONALIZATION_ONLY_KEYS = frozenset(_key(name) for name in PERSONALIZATION_ONLY)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved into the report so a run can be repeated."""

    task: str = _opt("MovieLens", f"task: one of {', '.join(TASKS)}")
    data: str = _opt(
        "default",
        "'default' (MovieLens-100K from recbole), 'synthetic' (planted-preference users), "
        "QUESTIONS.json:OUTPUTS.json (LaMP) or USERS.json (OPPU per-user format)",
    )
    max_text_chars: int = _opt(20_000, "longest text field (query input, gold, history item field) a user may bring")
    max_user_history: int = _opt(10_000, "most history items a user may bring")
    model: str = _opt("smollm2", "base model: 'smollm2' (bundled), 'tiny-random' (tests), a local path or hub id")
    methods: str = _opt(
        ",".join(DEFAULT_METHODS),
        "comma-separated methods: base, rag, pag, oppu and '+' combinations (oppu+rag, oppu+pag, rag+pag); "
        "'rag' uses --k, or name the depth: rag-k2",
    )
    k: int = _opt(1, "retrieved history items for 'rag' methods")
    decision: str = _opt(
        "auto",
        f"how a label task's answer is read from the model's label probabilities: {', '.join(DECISION_RULES)}. "
        "auto: the median for rating tasks (it minimises MAE), the most likely label (argmax, as the paper) "
        "otherwise; 'mean' (RMSE's minimiser) and 'median' need ratings",
    )
    peft: str = _opt("lora", f"personal PEFT module: {', '.join(PEFT_KINDS)}")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha")
    lora_targets: str = _opt("q_proj,v_proj", "comma-separated module names that get LoRA")
    rounds: int = _opt(40, "task-adaptation FedAvg rounds (0 skips task adaptation)")
    train_per_round: int = _opt(4, "training-user nodes sampled per task-adaptation round (every one when fewer)")
    server_lr: float = _opt(
        1.0,
        "task adaptation: the server's learning rate on the round's averaged update (Flower's FedAvgM; 1 with "
        "server-momentum 0 is plain FedAvg). Many users' averaged small steps are one large low-noise step, which "
        "a rate above 1 takes further (docs/quality.md)",
    )
    server_momentum: float = _opt(0.0, "task adaptation: the server's momentum on the averaged updates (FedAvgM)")
    local_epochs: float = _opt(1.0, "local epochs over a training user's examples per round")
    task_lr: float = _opt(2e-3, "learning rate of the shared task LoRA")
    task_lr_schedule: str = _opt(
        "linear",
        "task adaptation's learning rate over the rounds: 'constant' (--task-lr in every round) or 'linear' (round "
        "r of R at --task-lr x (R - r + 1) / R): the last rounds' few users then move the shared LoRA least, so it "
        "does not end at their rating level (docs/quality.md)",
    )
    answer_calibration: bool = _opt(
        True,
        "rating tasks read by the median rule (others ignore it): before personalization every test user's node "
        "scores the shared model on its validation items (the latest before its questions, never a question) at "
        "each answer quantile 0.25-0.75 and sends those errors; the methods without a personal adapter (base, rag, "
        "pag) then answer at the quantile with the lowest pooled error instead of the median: one number for all "
        "users, which undoes the shared LoRA's drift in rating level (docs/quality.md, docs/privacy.md)",
    )
    personal_epochs: float = _opt(
        1.0,
        "epochs over the user's history for a personal adapter (1 matched 2 on validation for ratings and "
        "labels at half the CPU, docs/quality.md)",
    )
    personal_lr: float = _opt(1e-3, "learning rate of personal adapters")
    max_history: int = _opt(32, "most recent history items a personal adapter trains on (0: all, as the paper)")
    task_history: int = _opt(16, "most recent history items of a training user per task-adaptation round (0: all)")
    history_selection: str = _opt(
        "recent",
        "history a test user personalizes with: 'recent' (all of it; max-history takes the latest) or "
        "'least-relevant' (the selection-items items least similar to the user's queries: behaviour shift, "
        "paper Table 3)",
    )
    selection_items: int = _opt(100, "history items kept by history-selection least-relevant")
    history_format: str = _opt(
        "both",
        "what a history item teaches a personal adapter: 'both' (question -> answer), 'input' (its input text "
        "only) or 'output' (its answer only); paper Table 4. Retrieved items in prompts stay whole",
    )
    max_prompt_tokens: int = _opt(384, "prompt token budget; profile and history are cut, the question never")
    batch_tokens: int = _opt(
        256, "tokens per personal-training step (length-bucketed; smaller: more steps for the same examples, each "
        "slower per token on a CPU; 256 trains as well as 128 in 0.73x the time, docs/quality.md)",
    )
    task_batch_tokens: int = _opt(
        1024,
        "tokens per task-adaptation step (0: as batch-tokens). The shared LoRA learns the items only from large "
        "steps: 1024 with local-epochs 1 and a few clients a round over many rounds (docs/quality.md)",
    )
    profile_items: int = _opt(8, "history items sampled to write a user's profile (PAG)")
    profile_max_tokens: int = _opt(
        32,
        "most new tokens of a user's profile (PAG; one greedy token at a time). 8 items and 32 tokens matched 16 "
        "and 48 on validation in 60 percent of the time (docs/quality.md)",
    )
    num_queries: int = _opt(5, "MovieLens: most recent ratings per user held out as queries")
    split: str = _opt(
        "test",
        "what test users are evaluated on: 'test' (their queries) or 'validation' (their validation-items latest "
        "history items, just before the queries, which personal training then does not see): tune on validation",
    )
    validation_items: int = _opt(5, "history items per test user that split validation evaluates on")
    dp_noise: float = _opt(
        0.0,
        "task adaptation with client-level DP: Gaussian noise multiplier (0: off). The server adds the noise "
        "(Flower's server-side fixed clipping); with --secure-aggregation each client adds its 1/sqrt(n) share "
        "of it before masking (distributed DP)",
    )
    dp_clip: float = _opt(1.0, "DP clipping norm of each client's task-adapter update")
    dp_delta: float = _opt(1e-5, "DP delta at which epsilon is reported")
    local_dp_epsilon: float = _opt(
        0.0,
        "client-side DP of task adaptation (Flower's LocalDpMod): epsilon of each update a client sends, "
        "clipped to --dp-clip with Gaussian noise added on the device (0: off); the report composes it over rounds",
    )
    secure_aggregation: bool = _opt(
        False,
        "task adaptation with Flower's SecAgg+ (secaggplus_mod, SecAggPlusWorkflow): the server learns only the "
        "average of a round's updates, losses and answer shares (needs 2+ training users per round)",
    )
    item_statistics: bool = _opt(
        True,
        "rating tasks whose items users share (MovieLens; LaMP-3, whose items are each user's own reviews, and the "
        "label tasks ignore it): before task adaptation every training user's node adds its ratings "
        "and their offsets from its own mean into a hashed item table, summed under SecAgg+ (the server learns only "
        "the sum; test users send none); every question then says how other users rate its item "
        "(docs/privacy.md, docs/quality.md)",
    )
    item_dp_epsilon: float = _opt(
        0.0,
        "user-level differential privacy of the item table (--item-statistics): epsilon at --dp-delta of its one "
        "release (0: off). Each training user's table is scaled to L2 norm --item-dp-clip and its node adds its "
        "share of the Gaussian noise before SecAgg+ masks it (distributed DP); the server keeps the items whose "
        "noisy count clears twice the noise (docs/privacy.md has the price in MAE)",
    )
    item_dp_clip: float = _opt(3.0, "L2 norm each training user's item table is scaled down to under --item-dp-epsilon")
    seed: int = _opt(0, "seed of sampling, adapter initialisation and data order")
    device: str = _opt("auto", "where clients compute: auto (CUDA if present), cpu, cuda or cuda:N")
    dtype: str = _opt(
        "auto",
        "base model dtype on clients: auto (bf16 on CUDA, and on a CPU where a measured bf16 matmul is at least "
        "1.5x fp32), float32, bfloat16; adapters always train in fp32",
    )
    quantize: str = _opt(
        "none",
        f"frozen base weights on clients: {', '.join(QUANTIZATIONS)}. nf4: QLoRA, the base in 4-bit NF4 with bf16 "
        "compute (bitsandbytes: pip install -e '.[gpu]'); CUDA only",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(f.default, float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{_key(f.name)} must be a finite number, got {getattr(self, f.name)}")
        for name, least in AT_LEAST.items():
            if getattr(self, name) < least:
                raise ValueError(f"{_key(name)} must be >= {least}, got {getattr(self, name)}")
        for name in POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{_key(name)} must be > 0, got {getattr(self, name)}")
        decision_rule(get_task(self.task), self.decision)
        PeftSettings(kind=self.peft, r=self.lora_r)  # type: ignore[arg-type]
        if not self.peft_settings().target_modules:
            raise ValueError(f"lora-targets names no module, got {self.lora_targets!r}; e.g. q_proj,v_proj")
        for method in self.method_names():
            parse_method(method)
        if self.history_selection not in HISTORY_SELECTIONS:
            raise ValueError(
                f"history-selection must be one of {', '.join(HISTORY_SELECTIONS)}, got {self.history_selection!r}"
            )
        if self.task_lr_schedule not in TASK_LR_SCHEDULES:
            raise ValueError(f"task-lr-schedule must be one of {', '.join(TASK_LR_SCHEDULES)}, "
                             f"got {self.task_lr_schedule!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.history_format not in HISTORY_FORMATS:
            raise ValueError(f"history-format must be one of {', '.join(HISTORY_FORMATS)}, got {self.history_format!r}")
        if self.dp_noise < 0:
            raise ValueError(f"dp-noise must be >= 0 (0: no DP), got {self.dp_noise}")
        if self.dp_clip <= 0:
            raise ValueError(f"dp-clip must be > 0, got {self.dp_clip}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.local_dp_epsilon < 0:
            raise ValueError(f"local-dp-epsilon must be >= 0 (0: no client-side DP), got {self.local_dp_epsilon}")
        if self.local_dp_epsilon > 0 and (self.dp_noise > 0 or self.secure_aggregation):
            raise ValueError("local-dp-epsilon cannot be combined with dp-noise or secure-aggregation: for noise "
                             "under secure aggregation use --secure-aggregation --dp-noise (distributed DP)")
        if self.item_dp_epsilon < 0:
            raise ValueError(f"item-dp-epsilon must be >= 0 (0: no DP of the item table), got {self.item_dp_epsilon}")
        if self.item_dp_epsilon > 0 and not self.item_statistics:
            raise ValueError("item-dp-epsilon makes the item table of --item-statistics private; it is off "
                             "(--no-item-statistics): drop one of the two")
        check_dtype_name(self.dtype)
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.quantize != "none" and self.device == "cpu":
            raise ValueError(f"quantize {self.quantize} runs on CUDA only (bitsandbytes' 4-bit LoRA gradients are "
                             "not reliable on a CPU); drop --quantize or use --device auto/cuda on a GPU host")
        check_device_name(self.device)
        if self.server_lr <= 0 or not 0 <= self.server_momentum < 1:
            raise ValueError(f"server-lr must be > 0 and server-momentum in [0, 1), got {self.server_lr} and "
                             f"{self.server_momentum}")
        if self.takes_server_step() and (self.dp_noise > 0 or self.secure_aggregation):
            raise ValueError("server-lr and server-momentum cannot be combined with dp-noise or secure-aggregation: "
                             "there the server's update is the noised or secure average itself (its DP accounting "
                             "and masking assume so); client-side DP (--local-dp-epsilon) works with them")

    def nodes_per_round(self, training: int | None) -> int:
        """Training nodes a task-adaptation round samples among `training` of them (None: not known before the
        data is read, --train-clients all): --train-per-round, or all when fewer."""
        return self.train_per_round if training is None else min(training, self.train_per_round)

    def uses_item_table(self) -> bool:
        """Whether the run sums and reads the training users' item table: --item-statistics on a rating task whose
        items users share."""
        task = get_task(self.task)
        return self.item_statistics and task.metric == "regression" and task.shared_items

    def item_noise_std(self) -> float:
        """The std of the Gaussian noise in each sum of the item table under --item-dp-epsilon (0 without)."""
        if self.item_dp_epsilon <= 0:
            return 0.0
        from common.privacy import release_noise_multiplier  # flwr's accountant: only where the table is private

        return release_noise_multiplier(self.item_dp_epsilon, self.dp_delta) * self.item_dp_clip

    def calibrates_answers(self) -> bool:
        """Whether the test users' validation items pick the shared model's answer quantile: --answer-calibration
        on a rating task read by the median rule, with a method that answers from the shared model (no personal
        adapter: those answer at the median)."""
        task = get_task(self.task)
        shared = any(not parse_method(m).personal for m in self.method_names())
        return (self.answer_calibration and shared and task.metric == "regression"
                and decision_rule(task, self.decision) == "median")

    def takes_server_step(self) -> bool:
        """Whether task adaptation steps on the round's average (FedAvgM) instead of taking it (plain FedAvg)."""
        return self.server_lr != 1 or self.server_momentum != 0

    def method_names(self) -> list[str]:
        """Methods with 'rag' resolved to its depth (rag -> rag-k1)."""
        names = []
        for raw in self.methods.split(","):
            parts = [p.strip() for p in raw.split("+") if p.strip()]
            parts = [method_name(False, self.k) if p == "rag" else p for p in parts]
            if parts and "+".join(parts) not in names:
                names.append("+".join(parts))
        if not names:
            raise ValueError("methods: give at least one method, e.g. base,oppu")
        return names

    def data_limits(self) -> DataLimits:
        return DataLimits(max_text_chars=self.max_text_chars, max_user_history=self.max_user_history)

    def peft_settings(self) -> PeftSettings:
        return PeftSettings(
            kind=self.peft, r=self.lora_r, alpha=self.lora_alpha,  # type: ignore[arg-type]
            target_modules=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()),
        )

    def retrieval_depths(self) -> list[int]:
        """The retrieval depths the methods use (0: none); task adaptation trains on each of them."""
        return sorted({parse_method(m).k for m in self.method_names()})

    def task_adaptation_settings(self) -> dict[str, Any]:
        """What the shared task adapter depends on: the record without the personalization-only settings, and the
        task steps' token budget in place of the two flags that set it (batch-tokens counts only at task-batch-tokens
        0, so a task adapter serves runs that differ only in the personal step size)."""
        record = {key: value for key, value in self.to_record().items()
                  if key not in PERSONALIZATION_ONLY_KEYS | {"batch-tokens"}}
        record["task-batch-tokens"] = self.task_training().max_batch_tokens
        return {**record, "retrieval-depths": self.retrieval_depths()}

    def prompt_settings(self, k: int = 0, use_profile: bool = False, history_format: HistoryFormat = "both") -> PromptSettings:
        """`history_format` matters to personal training only (task adaptation keeps question -> answer)."""
        return PromptSettings(
            k=k, use_profile=use_profile, max_prompt_tokens=self.max_prompt_tokens, history_format=history_format
        )

    def task_training(self, server_round: int = 1) -> TrainingSettings:
        """A training user's local steps in task-adaptation round `server_round` (1..rounds)."""
        linear = self.task_lr_schedule == "linear" and 1 <= server_round <= self.rounds
        share = (self.rounds - server_round + 1) / self.rounds if linear else 1.0
        return TrainingSettings(epochs=self.local_epochs, lr=self.task_lr * share,
                                max_batch_tokens=self.task_batch_tokens or self.batch_tokens)

    def personal_training(self) -> TrainingSettings:
        return TrainingSettings(epochs=self.personal_epochs, lr=self.personal_lr, max_batch_tokens=self.batch_tokens)

    def to_record(self) -> dict[str, Any]:
        """Flat kebab-case mapping (what a Flower ConfigRecord and pyproject hold)."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunConfig:
        """A config from kebab-case keys; unknown keys are rejected, missing ones take defaults."""
        known = {_key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {', '.join(known)}")
        values = {}
        for key, value in record.items():
            kind = type(known[key].default)
            values[known[key].name] = kind(value) if kind is not bool else bool(value)
        return cls(**values)


PHASE_TIMEOUT = 6 * 3600.0  # seconds the server waits for a phase's replies unless told otherwise (--timeout)


@dataclass(frozen=True)
class UserCounts:
    """How many users become nodes: test users (--num-clients, the longest histories) and training users
    (--train-clients, sampled from the rest, or None: all of the rest; they get nodes only while there is task
    adaptation)."""

    test: int = 100
    train: int | None = None

    def __post_init__(self) -> None:
        if self.test < 1:
            raise ValueError(f"--num-clients {self.test}: expected at least 1 test user")
        if self.train is not None and self.train < 0:
            raise ValueError(f"--train-clients {self.train}: expected 0 or more training users")

    def training(self, cfg: RunConfig, available: int | None = None) -> int | None:
        """Training users that get a node: none when --rounds 0 skips task adaptation; at most the `available`
        users outside the test users (None: not known before the data is read)."""
        if not cfg.rounds:
            return 0
        if self.train is None:
            return available
        return self.train if available is None else min(self.train, available)

    def users_hint(self) -> int:
        """How many users a generated dataset (--data synthetic) makes: 'all' training users are as many as the
        test users there."""
        return self.test + (self.test if self.train is None else self.train)

    def nodes(self, cfg: RunConfig) -> int:
        """The node count a `flwr run` federation is started with (its counts are numbers: RUN_KEYS)."""
        training = self.training(cfg)
        if training is None:
            raise ValueError("train-clients all: a `flwr run` federation needs the number of training users "
                             "(its num-supernodes is num-clients + train-clients)")
        return self.test + training


# a `flwr run` config holds these run settings beside RunConfig's keys (defaults as pyproject's); its training users
# are a number, not 'all': the federation's node count is fixed before the data is read
RUN_KEYS = {"num-clients": 100, "train-clients": 20, "run-dir": "runs/flwr-run"}


def flwr_run_settings(record: Mapping[str, Any]) -> tuple[RunConfig, UserCounts, Path]:
    """A `flwr run` config -> (RunConfig, user counts, run directory)."""
    record = dict(record)
    num_test, num_train, run_dir = (record.pop(key, default) for key, default in RUN_KEYS.items())
    return RunConfig.from_record(record), UserCounts(int(num_test), int(num_train)), Path(str(run_dir)).resolve()


def run_settings(cfg: RunConfig, counts: UserCounts) -> dict:
    """What must match for a run directory's run to go on (flower-simulation --resume, `flwr run` into the same
    run-dir): saved as run.json once its node stores exist, or as `flwr run`'s ServerApp starts."""
    return {"config": cfg.to_record(), "num_clients": counts.test, "train_clients": counts.train}


def settings_differences(earlier: dict, settings: dict) -> str:
    """The run settings (run_settings) that differ, named as their flags: 'rounds 1 there, 2 here; ...' (empty:
    none)."""
    def flat(saved: dict) -> dict:
        return {**saved.get("config", {}), **{k.replace("_", "-"): v for k, v in saved.items() if k != "config"}}

    theirs, ours = flat(earlier), flat(settings)
    return "; ".join(f"{key} {theirs.get(key)!r} there, {ours.get(key)!r} here"
                     for key in [*ours, *(k for k in theirs if k not in ours)] if theirs.get(key) != ours.get(key))
