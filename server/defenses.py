"""The server side of task adaptation's defenses, chosen in one place: what runs the rounds and what privacy they
spent. The device side is client/defenses.py; what the report says of them, server/report.py's privacy line.

    none                     FedAvg in clear (server/strategy.py)
    --dp-noise               Flower's server-side fixed-clipping DP wrapper around it, RDP accounting
    --local-dp-epsilon       FedAvg in clear of updates each device noised itself (Flower's LocalDpMod)
    --secure-aggregation     SecAgg+ rounds (server/secure_aggregation.py); with --dp-noise each device adds its
                             share of the noise (distributed DP), accounted over the survivors of each round
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Result, Strategy
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from common.config import RunConfig
from common.privacy import rdp_accountant
from server.audited_grid import AuditedGrid
from server.secure_aggregation import SecureAdaptation
from server.strategy import TaskAdapterFedAvg, task_fedavg
from server.view import ServerView


@dataclass
class TaskAdaptationDefense:
    """The rounds of task adaptation under the configured defense: `fedavg` samples and keeps each round's record,
    `runner` runs the rounds (the FedAvg itself, Flower's DP wrapper around it, or SecAgg+)."""

    cfg: RunConfig
    fedavg: TaskAdapterFedAvg
    runner: Strategy | SecureAdaptation

    def start(self, grid: AuditedGrid, initial: ArrayRecord, timeout: float, train_config: ConfigRecord) -> Result:
        return self.runner.start(grid=grid, initial_arrays=initial, num_rounds=self.cfg.rounds, timeout=timeout,
                                 train_config=train_config)

    def privacy_report(self) -> dict[str, Any] | None:
        """Epsilon/delta of the releases (None without DP), and where the noise was added: by the server (Flower's
        server-side DP wrapper), on the devices with one share of it each under secure aggregation (distributed),
        or on every device for its own update (client-side, Flower's LocalDpMod)."""
        cfg = self.cfg
        base = {"clipping_norm": cfg.dp_clip, "delta": cfg.dp_delta}
        if cfg.local_dp_epsilon > 0:
            # each update is one (epsilon, delta) Gaussian release; a user's rounds compose sequentially
            rounds = len(self.fedavg.sampled)
            return {**base, "mode": "client-side", "noise_multiplier": None,
                    "epsilon_per_update": cfg.local_dp_epsilon, "epsilon": rounds * cfg.local_dp_epsilon,
                    "delta": rounds * cfg.dp_delta, "releases": rounds,
                    "accounting": "basic composition of LocalDpMod's Gaussian mechanism over a user's updates"}
        if cfg.dp_noise <= 0:
            return None
        if isinstance(self.runner, SecureAdaptation):
            spent, mode = self._distributed_privacy_spent(self.runner), "distributed"
        else:
            spent, mode = self.runner.privacy_spent(), "server-side"
        return {**base, "mode": mode, "noise_multiplier": cfg.dp_noise, "epsilon": spent.epsilon,
                "delta": spent.delta, "releases": spent.num_releases, "accounting": spent.accounting_method}

    def _distributed_privacy_spent(self, secure: SecureAdaptation) -> Any:
        """(epsilon, delta) of the secure rounds' releases (the survivors' noise shares), by Flower's RDP accountant
        as for server-side DP."""
        population = len(self.fedavg.train_nodes)
        accountant = rdp_accountant(self.cfg.dp_delta, population)
        for noise, clients in secure.releases:
            accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=clients,
                                                    population_size=population))
        return accountant.get_privacy_spent()


def task_adaptation_defense(
    cfg: RunConfig, train_nodes: list[int], view: ServerView | None = None
) -> TaskAdaptationDefense:
    """The configured defense around the run's FedAvg (secure aggregation runs the FedAvg's sampling itself)."""
    fedavg = task_fedavg(cfg, train_nodes, view)
    if cfg.secure_aggregation:
        return TaskAdaptationDefense(cfg, fedavg, SecureAdaptation(fedavg, cfg))
    if cfg.dp_noise > 0:
        wrapped = DifferentialPrivacyServerSideFixedClipping(
            fedavg, noise_multiplier=cfg.dp_noise, clipping_norm=cfg.dp_clip,
            num_sampled_clients=fedavg.sample_size, accountant=rdp_accountant(cfg.dp_delta, len(train_nodes)),
        )
        return TaskAdaptationDefense(cfg, fedavg, wrapped)
    return TaskAdaptationDefense(cfg, fedavg, fedavg)
