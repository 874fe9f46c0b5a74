"""The device side of task adaptation's defenses: what a training user's reply may carry under each. The server side
(what runs the rounds, the accounting) is server/defenses.py.

    none                  the update, its example count (FedAvg's weight), the loss and the answer-label shares
    --dp-noise            the same with weight 1: Flower's server-side DP wrapper and accountant need equal weights
    --local-dp-epsilon    Flower's LocalDpMod clips the update and adds Gaussian noise on the device; the loss and
                          shares would leave without noise, so the update goes alone
    --secure-aggregation  one masked vector (common/secure_update.py); with --dp-noise the update is clipped and this
                          device adds its share of the noise, and the loss and shares stay on the device
"""

from __future__ import annotations

import math

import numpy as np
from flwr.clientapp.mod import LocalDpMod
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, clip_inputs_inplace

from common import protocol as p
from common.config import RunConfig
from common.secure_update import on_quantization_grid, pack_update


def local_dp_mod(cfg: RunConfig) -> LocalDpMod | None:
    """Flower's LocalDpMod for --local-dp-epsilon; sensitivity 2 * clip: the clipped updates of any two histories
    of this user lie at most that far apart."""
    if cfg.local_dp_epsilon <= 0:
        return None
    return LocalDpMod(cfg.dp_clip, 2 * cfg.dp_clip, cfg.local_dp_epsilon, cfg.dp_delta)


def clear_reply_metrics(
    cfg: RunConfig, num_examples: int, loss: float, shares: list[float]
) -> dict[str, float | list[float]]:
    """The metrics of a reply in clear under the configured defense."""
    if cfg.local_dp_epsilon > 0:
        return {p.NUM_EXAMPLES: 1}
    metrics: dict[str, float | list[float]] = {p.NUM_EXAMPLES: 1 if cfg.dp_noise > 0 else num_examples,
                                               p.TRAIN_LOSS: loss}
    if shares:  # FedAvg averages these shares weighted like the updates: the training users' answer mix
        metrics[p.ANSWER_FREQUENCIES] = shares
    return metrics


def secure_vector(cfg: RunConfig, update: list[np.ndarray], loss: float, shares: list[float],
                  round_clients: int) -> list[np.ndarray]:
    """The one vector secure aggregation sums, on SecAgg+'s quantization steps (repeatable sums); with --dp-noise
    the update clipped to --dp-clip plus this device's share of the Gaussian noise (std noise * clip / sqrt(clients
    of the round)), so the sum carries it whole (the noise is numpy's unseeded draw: never repeatable)."""
    if cfg.dp_noise <= 0:
        return on_quantization_grid(pack_update(update, loss, shares), round_clients)
    clip_inputs_inplace(update, cfg.dp_clip)
    add_gaussian_noise_inplace(update, cfg.dp_noise * cfg.dp_clip / math.sqrt(round_clients))
    return on_quantization_grid(pack_update(update, None, []), round_clients)
