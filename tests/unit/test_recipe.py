"""The reproduction's recipe: filtered to the keys RunConfig knows, carried into run configs;
and its targets: a row that did not run is never 'met'."""

from __future__ import annotations

from pathlib import Path

from common.config import RunConfig
from simulation import cli as sim_cli
from simulation import federated_cli, recipe
from simulation.plan import SimPlan
from simulation.recipe import Recipe, RecipePlan, known_keys, supports, with_recipe
from simulation.reproduce import QUICK, fed_configs
from simulation.reproduce_schedule import FULL
from simulation.reproduce_targets import CHOSEN, targets
from simulation.scoring import AT_CHOSEN


def test_unknown_keys_and_bad_values_are_kept_aside_never_sent():
    rec = Recipe.of(
        {"learning-rate": 1e-4, "no-such-lever": 3, "norm": "sparkly"},
        {"learning-rate": 3e-4, "max-update-norm": 5.0},
    )
    assert rec.applied == {"learning-rate": 3e-4, "max-update-norm": 5.0}
    assert rec.skipped == {"no-such-lever": 3, "norm": "sparkly"}
    assert rec.facts()["not_accepted_here"] == rec.skipped
    assert rec.baseline() == {"lr": 3e-4}
    assert "learning-rate" in known_keys() and not supports("no-such-lever")


def test_recipe_plan_carries_overrides_into_every_run_config(tmp_path: Path):
    plan = SimPlan(data=tmp_path, sites=3, rounds=2, lr=1e-4, batch_size=64)
    rec = Recipe.of({"learning-rate": 3e-4, "batch-size": 32, "max-update-norm": 5.0})
    rplan = with_recipe(plan, rec)
    assert isinstance(rplan, RecipePlan) and rplan.lr == 3e-4 and rplan.batch_size == 32
    run = rplan.run_config(tmp_path / "r", tmp_path / "c", tmp_path / "s")
    assert isinstance(run, RunConfig)
    assert run.max_update_norm == 5.0 and run.learning_rate == 3e-4 and run.batch_size == 32
    assert run.num_server_rounds == 2 and run.min_sites == 3


def test_baselines_train_with_the_federated_runs_recipe(tmp_path: Path):
    plan = SimPlan(data=tmp_path, sites=3, rounds=2, local_epochs=3, lr=1e-4)
    levers = {"augment": "dihedral", "weight-decay": 0.01, "lr-schedule": "cosine", "ema": 0.9}
    rplan = with_recipe(plan, Recipe.of({"learning-rate": 3e-4, **levers, "model": "gap"}))
    run = rplan.run_config(tmp_path / "r", tmp_path / "c", tmp_path / "s")
    base = rplan.baseline()
    assert (base.augment, base.weight_decay, base.lr_schedule, base.ema, base.model) == (
        run.augment,
        run.weight_decay,
        run.lr_schedule,
        run.ema,
        run.model,
    )
    assert base.lr == run.learning_rate == 3e-4 and base.epochs == 6


def test_targets_of_rows_that_did_not_run_are_not_run():
    rows = {"paper": {"error": "boom"}, "central": {"skipped": "--max-minutes 1 reached"}}
    verdicts = {t["verdict"] for t in targets({"rows": rows})}
    assert verdicts == {"not run"}


def test_the_dp_step_time_is_a_target_per_model_met_at_most_twice_plain():
    def model(ratio: float) -> dict:
        return {"summary": [], "step_time": {"batch": 64, "ratio": ratio}}

    rows = {"dp": {"sites": 5, "models": {"paper": model(2.4), "gap": model(1.4)}}}
    got = {t["what"]: t for t in targets({"rows": rows}) if "step time" in t["what"]}
    paper = got["DP-SGD paper step time / plain step at batch 64"]
    gap = got["DP-SGD gap step time / plain step at batch 64"]
    assert (paper["measured"], paper["verdict"], paper["target"]) == (2.4, "NOT met", "<= 2")
    assert (gap["measured"], gap["verdict"]) == (1.4, "met")


def test_targets_compare_fedavg_with_its_own_pooled_baseline():
    def union(at_half: float, chosen: float) -> dict:  # targets use the chosen threshold's
        return {"balanced_accuracy": at_half, AT_CHOSEN: {"balanced_accuracy": chosen}}

    run = {
        "fedavg": {"fedavg": {"union": union(0.90, 0.80)}},
        "centralized": {"union": union(0.50, 0.85)},
    }
    rows = {"fedavg": {"runs": {"iid-5": run, "label-skew-5": run}}}
    got = {t["what"]: t for t in targets({"rows": rows}) if t["row"] == "3"}
    iid = got[f"FedAvg iid-5 minus pooled on the same patients, BAC {CHOSEN}"]
    skew = got[f"FedAvg label-skew-5 minus pooled on the same patients, BAC {CHOSEN}"]
    assert abs(iid["measured"] + 0.05) < 1e-12 and iid["verdict"] == "NOT met"
    assert skew["verdict"] == "NOT met"


def test_idc_sim_recipe_flag_reaches_the_fedavg_runs_and_both_baselines(tmp_path: Path):
    args = sim_cli.build_parser().parse_args(
        ["federated", "--data", str(tmp_path), "--sites", "3", "--rounds", "2", "--out", "o"]
        + ["--recipe", "model=gap", "ema=0.99", "lr-schedule=cosine", "optimizer=sgd"]
    )
    plan = federated_cli._plan(args)
    assert isinstance(plan, RecipePlan)
    run = plan.run_config(tmp_path / "r", tmp_path / "c", tmp_path / "s")
    assert (run.model, run.ema, run.lr_schedule, run.optimizer, run.num_server_rounds) == (
        "gap",
        0.99,
        "cosine",
        "sgd",
        2,
    )
    base = plan.baseline()
    assert (base.model, base.ema, base.lr_schedule, base.epochs) == ("gap", 0.99, "cosine", 2)
    assert base.recipe().optimizer == "sgd"
    sweep = sim_cli.build_parser().parse_args(args_without_recipe(tmp_path))
    plain = federated_cli._plan(sweep, seed=0)
    assert not isinstance(plain, RecipePlan)
    assert plain.run_config(tmp_path / "r", tmp_path / "c", tmp_path / "s").model == "paper"


def args_without_recipe(data: Path) -> list[str]:
    return ["privacy-sweep", "--data", str(data), "--sites", "3", "--rounds", "2", "--out", "o"] + [
        "--epsilons",
        "8",
    ]


def test_every_candidate_recipe_of_the_full_schedule_is_sent_whole():
    """A candidate's key or value this checkout would not accept is dropped silently from
    the runs (kept aside, not sent): then two candidates could run the same recipe."""
    layers = [*recipe.CENTRAL_CANDIDATES, *FULL.dp_candidates]
    for layer in layers:
        for model in recipe.DP_MODELS:
            rec = Recipe.of(recipe.BASE, layer, {"model": model})
            assert rec.skipped == {} and rec.applied["model"] == model, (layer, rec.skipped)
    sizes = [(c["batch-size"], c["learning-rate"]) for c in FULL.dp_candidates]
    assert len(set(sizes)) == len(sizes) > 1 and FULL.dp_candidates[0] == recipe.DP


def test_full_runs_fedavgm_beside_fedavg_at_every_iid_site_count_and_quick_does_not():
    full = {name: (sites, part, layer) for name, sites, part, layer in fed_configs(FULL)}
    for n in FULL.site_counts:
        assert full[f"iid-{n}"] == (n, "iid", {})
        assert full[f"iid-{n}-fedavgm"] == (n, "iid", recipe.strategy("fedavgm"))
    assert [name for name, *_ in fed_configs(QUICK)] == [
        "iid-5",
        "iid-10",
        "label-skew-5",
        "size-skew-5",
    ]
