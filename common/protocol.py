"""Everything that may cross between server and devices, declared once (the audit checks against this).

Phases and their messages (server -> node, node -> server):
- announce    query.announce     config: base model name + sha256      reply config: role, has-model
- transfer    query.model_chunk  config: file, offset, bytes, hashes   reply config: stored
- adapt       train.adapt        arrays: task LoRA, config: run config  reply arrays: task LoRA, metrics (loss,
                                                                        the user's answer-label shares)
- personalize train.personalize  arrays: task LoRA, config: run config  reply metrics: statistics only
                                 + the best constant answer
- item-table  train             with --item-statistics, before adapt: one SecAgg+ round of the training nodes (the stages
                                 below) whose masked vector is the node's item table (common/item_table.py); every
                                 later config carries the summed table
- secure-adapt train             with --secure-aggregation, the adapt phase under Flower's SecAgg+: four
                                 stages (setup, share keys, collect masked vectors, unmask) of Flower's messages
                                 (config "secaggplus_configs"; the collect stage also carries the task LoRA as
                                 legacy "fitins.*" records). Replies carry public keys, encrypted key shares, the
                                 masked vector (update, loss and answer shares of the user, see
                                 common/secure_update.py) and key shares: never a tensor in clear

Each message type is "<Flower category>.<action>": Flower's ClientApp routes `train.adapt` to the handler
registered with `@app.train("adapt")` (`action` below gives that name). Personalize is a `train` message
because the node trains its personal adapters there before it evaluates them.
"""

from __future__ import annotations

import re

from common.methods import NAME as METHOD_NAME

ANNOUNCE = "query.announce"
MODEL_CHUNK = "query.model_chunk"
ADAPT = "train.adapt"
PERSONALIZE = "train.personalize"
CALIBRATE = "evaluate.calibrate"  # a test user's node scores the shared model at each answer quantile
# Flower's SecAggPlusWorkflow sends plain `train` messages and secaggplus_mod acts on those only
SECURE_ADAPT = "train"

ARRAYS = "arrays"  # FedAvg's default ArrayRecord key
CONFIG = "config"  # FedAvg's default ConfigRecord key
METRICS = "metrics"

# config keys the server adds to the run config
MODEL_NAME = "model-name"
MODEL_SHA256 = "model-sha256"
SERVER_ROUND = "server-round"
TASK_ADAPTER_SHA256 = "task-adapter-sha256"
CONSTANT_ANSWER = "constant-answer"  # the best constant (reference row), from training users' answer shares
TASK_ADAPTER_NAMES = "task-adapter-names"  # secure-adapt: the tensor names (Flower's legacy records drop them)
ROUND_CLIENTS = "round-clients"  # secure-adapt: clients sampled this round (each adds 1/sqrt of the DP noise)
SECURE_PAYLOAD = "secure-payload"  # secure-adapt: what the masked vector holds (absent: a task-LoRA update)
ITEM_TABLE = "item-table"  # that payload: the node's item table (--item-statistics, common/item_table.py)
ANSWER_QUANTILE = "answer-quantile"  # the quantile the shared model's methods answer at (server/calibration.py)
# --item-statistics: the summed item table, sent with every later message (rated buckets only)
ITEM_BUCKETS, ITEM_RATINGS = "item-buckets", "item-ratings"
ITEM_OFFSETS, ITEM_COUNTS = "item-offsets", "item-counts"
ITEM_NOISE = "item-noise"  # --item-dp-epsilon: the std of the noise in each of the table's sums
ITEM_TABLE_KEYS = (ITEM_BUCKETS, ITEM_RATINGS, ITEM_OFFSETS, ITEM_COUNTS, ITEM_NOISE)

# reply keys
ROLE = "role"
HAS_MODEL = "has-model"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
ANSWER_FREQUENCIES = "answer-frequencies"  # share of each task label among a training user's answers
QUANTILE_ERRORS = "quantile-errors"  # a calibrate reply: mean absolute error at each of metrics.ANSWER_QUANTILES
CHUNK_STORED = "stored"

# chunk keys
CHUNK_FILE, CHUNK_OFFSET, CHUNK_DATA, CHUNK_FILE_SHA256, CHUNK_FILE_SIZE = "file", "offset", "data", "file-sha256", "file-size"
CHUNK_LAST = "last"

STATISTIC_NAMES = ("n", "correct", "tp", "fp", "fn", "abs_error", "sq_error", "rouge1", "rougeL")

# a personalize reply may carry "<method>/<statistic>" and "time/<phase>-seconds", nothing else
_METHOD = rf"({METHOD_NAME}|ref-[a-z]+(-[a-z]+)*)"
ALLOWED_PERSONALIZE_METRIC = re.compile(
    rf"^({NUM_EXAMPLES}|{_METHOD}/({'|'.join(STATISTIC_NAMES)})|time/[a-z0-9-]+-seconds)$"
)
ALLOWED_ADAPT_METRIC = re.compile(rf"^({NUM_EXAMPLES}|{TRAIN_LOSS}|{ANSWER_FREQUENCIES})$")
ALLOWED_CALIBRATE_METRIC = re.compile(rf"^({NUM_EXAMPLES}|{QUANTILE_ERRORS})$")

# secure-adapt records: Flower's legacy FitIns/FitRes keys
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"
FITRES_ARRAYS, FITRES_METRICS = "fitres.parameters", "fitres.metrics"
# what a secure-adapt reply's config records may hold: SecAgg+'s stage outputs, and FitRes's status
ALLOWED_SECURE_REPLY_CONFIG = {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares", "code", "message"}
ALLOWED_SECURE_METRIC = re.compile(r"^num_examples$")  # FitRes's weight: 1 under secure aggregation


def action(message_type: str) -> str:
    """The action a ClientApp handler is registered under: `action(ADAPT)` is "adapt" (`@app.train("adapt")`)."""
    return message_type.split(".", 1)[1]


def method_key(method: str, statistic: str) -> str:
    """The metric key of one statistic of one method."""
    return f"{method}/{statistic}"


def split_method_key(key: str) -> tuple[str, str] | None:
    """(method, statistic) of a statistics key, None for other keys."""
    if key.startswith("time/") or "/" not in key:
        return None
    method, statistic = key.rsplit("/", 1)
    return method, statistic
