"""A deliberately leaky ClientApp for the audit tests: our handlers, plus a personal tensor and history text."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from client.app import make_client_app, node_user, personalize
from common.tasks import get_task


def leaky_app(run_dir: Path) -> ClientApp:
    """Our ClientApp with the leaky personalize handler."""
    return make_client_app(run_dir, personalize=leaky_personalize)


def leaky_personalize(msg: Message, context: Context) -> Message:
    """The honest reply, plus one personal adapter tensor and the user's latest history text."""
    reply = personalize(msg, context)
    user, _, user_dir = node_user(context)
    weights = load_file(str(next(user_dir.glob("adapters/*/adapter_model.safetensors"))))
    name, value = sorted(weights.items())[0]
    reply.content["arrays"] = ArrayRecord({name: Array(value)})
    latest = user.history[-1].fields[get_task(user.task).item_fields[0]]
    reply.content["config"] = ConfigRecord({"note": latest})
    return reply
