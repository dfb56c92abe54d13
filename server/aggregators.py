"""Which of Flower's Message-API strategies aggregates a run, configured from its run config.

The run's ``strategy`` key picks one of Flower's own classes; the maths is Flower's, never
ours. Every choice gets the same sampling minimums and weighting, and
:class:`server.strategy.CoordinatorStrategy` wraps it with the coordinator's checks.

- ``fedavg``: weighted averaging.
- ``fedprox``: FedAvg on the server; its ``configure_train`` puts ``proximal-mu`` into each
  site's train config, and the site adds (mu/2)||w - w_global||^2 to its local loss.
- ``fedadam``: an Adam step on the server with the averaged update as pseudo-gradient
  (``server-learning-rate`` is its ``eta``; Flower's beta_1, beta_2 and tau).
- ``fedavgm``: server momentum on the averaged update (``server-learning-rate``,
  ``server-momentum``).

Limits: the server state of FedAdam (moments) and FedAvgM (momentum) lives in the
ServerApp's memory; a resumed run starts it afresh from the resumed model.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from common import protocol
from common.config import RunConfig

# Flower's own defaults for server-learning-rate = 0 (its documented constructor defaults).
FLOWER_SERVER_LR = {"fedadam": 0.1, "fedavgm": 1.0}


def base_kwargs(run: RunConfig) -> dict[str, Any]:
    """What every choice shares: the run's site minimums, keys and weighting.

    Weighted by ``num-examples``; under central DP by ``uniform-weight`` (1 per site), since
    the client-level guarantee of Flower's wrappers assumes every site weighs the same.
    """
    weight = protocol.NUM_EXAMPLES if run.central_dp_mode == "none" else protocol.UNIFORM_WEIGHT
    return {
        "weighted_by_key": weight,
        "arrayrecord_key": protocol.ARRAYS,
        "configrecord_key": protocol.CONFIG,
        "fraction_train": run.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": run.min_sites,
        "min_evaluate_nodes": run.min_sites,
        "min_available_nodes": run.min_sites,
    }


def server_learning_rate(run: RunConfig) -> float:
    """The run's server learning rate, or Flower's default for its strategy when 0."""
    return run.server_learning_rate or FLOWER_SERVER_LR.get(run.strategy, 1.0)


def flower_strategy(run: RunConfig) -> FedAvg:
    """Flower's strategy named by ``run.strategy``, configured from the run."""
    kwargs = base_kwargs(run)
    if run.strategy == "fedprox":
        return FedProx(**kwargs, proximal_mu=run.proximal_mu)
    if run.strategy == "fedadam":
        # eta_l is only reported by Flower's summary: the sites' own learning rate.
        return FedAdam(**kwargs, eta=server_learning_rate(run), eta_l=run.learning_rate)
    if run.strategy == "fedavgm":
        return FedAvgM(
            **kwargs,
            server_learning_rate=server_learning_rate(run),
            server_momentum=run.server_momentum,
        )
    if run.strategy == "fedavg":
        return FedAvg(**kwargs)
    raise ValueError(f"config key 'strategy' is {run.strategy!r}; RunConfig.check refuses it")
