"""Differential-privacy accounting both sides read: Flower's RDP accountant of user-level DP (add or remove one
user, no sampling amplification), for task adaptation's rounds (server/defenses.py) and the item table's one release
(--item-dp-epsilon, common/item_table.py), and the noise multiplier one Gaussian release needs for an epsilon."""

from __future__ import annotations

import functools
import math

from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant


def rdp_accountant(delta: float, population: int) -> RdpAccountant:
    """Flower's RDP accountant of user-level DP over `population` users (no sampling amplification)."""
    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


@functools.lru_cache(maxsize=64)
def release_epsilon(noise_multiplier: float, delta: float) -> float:
    """Epsilon at `delta` of one Gaussian release of a sum to which each user adds at most the clip in L2, with
    noise of std `noise_multiplier` times the clip."""
    accountant = rdp_accountant(delta, 1)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=1, population_size=1))
    return accountant.get_epsilon(delta)


@functools.lru_cache(maxsize=64)
def release_noise_multiplier(epsilon: float, delta: float) -> float:
    """The least noise multiplier whose one release spends at most `epsilon` at `delta` (bisection on
    `release_epsilon`, which falls as the noise grows)."""
    low, high = 1e-3, 1e3
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if release_epsilon(middle, delta) > epsilon else (low, middle)
    return high
