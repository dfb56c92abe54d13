"""The run's ``strategy`` key: Flower's own class runs inside the coordinator's checks.

Driven through :class:`CoordinatorStrategy` with real Messages, keys and signatures (the
harness of ``test_validation``), against numeric oracles of each paper's update rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from common import protocol
from common.config import RunConfig
from server.aggregators import flower_strategy
from server.runner import parse_overrides
from tests.unit.test_validation import REF, Federation, flower_task  # noqa: F401

MEAN_A = 2.0  # the honest replies of the harness: a = 1 and a = 3, equal weights; b unchanged


def _federation(tmp_path, **options) -> Federation:
    run = RunConfig(min_sites=2, **options)
    fed = Federation(tmp_path, run)
    fed.strategy.inner = flower_strategy(run)
    return fed


def _round(fed: Federation) -> dict[str, np.ndarray]:
    fed.configure_train()
    agg, _ = fed.strategy.aggregate_train(1, fed.honest())
    assert agg is not None
    return {k: v.numpy() for k, v in agg.items()}


@pytest.mark.parametrize(
    "name, cls",
    [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedavgm", FedAvgM)],
)
def test_the_strategy_key_picks_flowers_class(name, cls):
    strategy = flower_strategy(RunConfig(strategy=name, min_sites=3))
    assert type(strategy) is cls
    assert strategy.min_train_nodes == 3 and strategy.weighted_by_key == protocol.NUM_EXAMPLES


def test_server_learning_rate_zero_means_flowers_default_and_a_value_wins():
    assert flower_strategy(RunConfig(strategy="fedadam")).eta == 0.1
    assert flower_strategy(RunConfig(strategy="fedavgm")).server_learning_rate == 1.0
    adam = flower_strategy(RunConfig(strategy="fedadam", server_learning_rate=0.01))
    assert adam.eta == 0.01
    avgm = flower_strategy(RunConfig(strategy="fedavgm", server_momentum=0.5))
    assert avgm.server_momentum == 0.5 and avgm.server_opt


def test_fedavg_is_the_weighted_mean(tmp_path):
    fed = _federation(tmp_path)
    out = _round(fed)
    assert np.allclose(out["a"], MEAN_A) and np.allclose(out["b"], REF["b"])
    fed.audit.close()


def test_fedprox_sends_its_mu_to_every_site(tmp_path):
    fed = _federation(tmp_path, strategy="fedprox", proximal_mu=0.25)
    sent = fed.configure_train()
    assert len(sent) == 3
    for msg in sent.values():
        assert msg.content.config_records[protocol.CONFIG][protocol.PROXIMAL_MU] == 0.25
    out = _round(fed)  # FedProx aggregates as FedAvg
    assert np.allclose(out["a"], MEAN_A)
    fed.audit.close()


def test_fedadam_takes_an_adam_step_and_keeps_the_models_dtypes(tmp_path):
    fed = _federation(tmp_path, strategy="fedadam", server_learning_rate=0.05)
    out = _round(fed)
    # Reddi et al. 2020, Algorithm 2, first step from zero moments (Flower: beta 0.9 / 0.99)
    delta = MEAN_A - REF["a"]
    m, v = 0.1 * delta, 0.01 * delta**2
    eta = 0.05 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert np.allclose(out["a"], REF["a"] + eta * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    assert not np.allclose(out["a"], MEAN_A)  # not FedAvg's answer
    assert np.allclose(out["b"], REF["b"])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in REF.items()}
    assert fed.strategy.inner.m_t is not None and fed.strategy.inner.v_t is not None
    fed.audit.close()


def test_fedavgm_steps_by_its_server_learning_rate(tmp_path):
    fed = _federation(tmp_path, strategy="fedavgm", server_learning_rate=0.5)
    out = _round(fed)
    pseudo_gradient = REF["a"] - MEAN_A  # momentum starts as the first pseudo-gradient
    assert np.allclose(out["a"], REF["a"] - 0.5 * pseudo_gradient)
    assert fed.strategy.inner.momentum_vector is not None
    fed.audit.close()


@pytest.mark.parametrize(
    "options, key",
    [
        ({"strategy": "scaffold"}, "strategy"),
        ({"proximal_mu": -0.1}, "proximal-mu"),
        ({"proximal_mu": float("nan")}, "proximal-mu"),
        ({"server_learning_rate": -1.0}, "server-learning-rate"),
        ({"server_momentum": 1.0}, "server-momentum"),
    ],
)
def test_bad_strategy_settings_name_the_key(options, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        RunConfig(**options).check()


def test_fedprox_under_dp_sgd_is_refused_before_submission():
    cfg = {"strategy": "fedprox", "dp.enabled": True, "norm": "group"}
    with pytest.raises(ValueError, match="proximal term would be dropped"):
        RunConfig.from_run_config({**cfg, "dp.noise-multiplier": 1.0})


@pytest.mark.parametrize(
    "items, named",
    [
        (["strategy=fedyogi"], "'strategy'"),
        (["proximal-mu=-1"], "'proximal-mu'"),
        (["server-momentum=0.99", "server-learning-rate=-0.1"], "'server-learning-rate'"),
        (
            ["strategy=fedprox", "dp.enabled=true", 'norm="group"', "dp.noise-multiplier=1.0"],
            "'strategy'",
        ),
    ],
)
def test_idc_server_run_checks_the_strategy_keys_before_submission(items, named):
    with pytest.raises(ValueError, match=named):
        parse_overrides(items)


def test_idc_server_run_takes_a_strategy_and_its_settings():
    out = parse_overrides(["strategy=fedadam", "server-learning-rate=0.01"])
    run = RunConfig.from_run_config(out)
    assert run.strategy == "fedadam" and flower_strategy(run).eta == 0.01
