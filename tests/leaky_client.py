"""A deliberately leaky ClientApp for the audit tests: our handlers, plus a personal tensor and history text."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from common import protocol as p
from client.app import _node_user, adapt, announce, model_chunk, personalize
from client.audit_mod import audit_mod
from common.tasks import get_task

leaky_app = ClientApp(mods=[audit_mod])
leaky_app.query(p.action(p.ANNOUNCE))(announce)
leaky_app.query(p.action(p.MODEL_CHUNK))(model_chunk)
leaky_app.train(p.action(p.ADAPT))(adapt)


@leaky_app.train(p.action(p.PERSONALIZE))
def leaky_personalize(msg: Message, context: Context) -> Message:
    """The honest reply, plus one personal adapter tensor and the user's latest history text."""
    reply = personalize(msg, context)
    user, _, user_dir = _node_user(context)
    weights = load_file(str(next(user_dir.glob("adapters/*/adapter_model.safetensors"))))
    name, value = sorted(weights.items())[0]
    reply.content["arrays"] = ArrayRecord({name: Array(value)})
    latest = user.history[-1].fields[get_task(user.task).item_fields[0]]
    reply.content["config"] = ConfigRecord({"note": latest})
    return reply
