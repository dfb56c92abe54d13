"""One run at the coordinator: resume state, audit log, strategy, and the final results."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common import keys
from common.accounting import epsilon
from common.audit import AuditLog
from common.config import RunConfig
from common.digests import digest_update
from common.model import build_model
from common.paths import CoordPaths
from common.plots import plot_round_curves
from common.provenance import run_metadata, save_model
from common.registry import declared_patches, site_public_keys
from common.rundir import RunDir
from common.threshold import Choice, choose
from server.aggregators import flower_strategy
from server.refine import refine
from server.runrecord import read_record, set_state
from server.strategy import CoordinatorStrategy

log = logging.getLogger(__name__)
AUDIT_LOCK_WAIT = 120.0  # seconds the ServerApp waits for `idc-server run` to close the log
STOPPED = (
    "stopped from outside the ServerApp by a signal: `flwr stop` on the SuperLink, or the "
    "SuperLink shutting down; Flower does not record who asked"
)


def initial_arrays(run: RunConfig) -> dict[str, np.ndarray]:
    """The seeded initial model, as the arrays that travel."""
    model = build_model(run.norm, seed=run.seed, kind=run.model)
    return {
        k: v.detach().cpu().numpy()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def central_dp(run: RunConfig, strategy: Strategy, sites: int) -> Strategy:
    """Wrap the strategy in Flower's central-DP wrapper when the run asks for client-level DP.

    The noise is calibrated to ``sites`` sampled per round (all registered sites); the
    guarantee is client-level (one whole hospital's update), accounted in the summary.
    """
    if run.central_dp_mode == "none":
        return strategy
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if run.central_dp_mode == "client-fixed"
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(strategy, run.central_dp_noise, run.central_dp_clip, max(sites, 1))


def decision_threshold(rows: list[dict[str, Any]], last: int) -> Choice:
    """The final model's threshold, chosen on round ``last``'s summed validation histograms."""
    row = next((r for r in rows if int(r.get("round", -1)) == last), None)
    v = (row or {}).get("validation") or {}
    return choose(v.get("positives"), v.get("negatives"), len(v.get("sites", [])), last)


class Coordinator:
    """Everything the ServerApp does around Flower's FedAvg loop."""

    def __init__(self, run: RunConfig, run_dir: Path, run_id: str) -> None:
        self.cfg, self.run_id = run, run_id
        self.dir = RunDir(run_dir).create()
        self.audit: AuditLog | None = None
        site_keys: dict[str, keys.PublicKey] = {}
        declared: dict[str, int] = {}
        if run.coord_dir:
            paths = CoordPaths(Path(run.coord_dir)).require()
            # Required: a coordinator without a writable audit log does not run (fail closed).
            # Shared: add-site, remove-site and stop append to the same chain while it runs;
            # `idc-server run` holds the log until it has recorded the submission: wait for it.
            key = keys.load_private_key(paths.key)
            self.audit = AuditLog(
                paths.audit, key, "coordinator", shared=True, lock_wait=AUDIT_LOCK_WAIT
            )
            site_keys, declared = site_public_keys(paths), declared_patches(paths)
        state = self.dir.read_state()
        self.completed = int(state.get("completed_round", 0))
        if self.completed and not run.resume:
            raise ValueError(
                f"{run_dir} already holds {self.completed} completed round(s); "
                "use --resume to continue it or choose a new --out"
            )
        self.hash = run.digest()
        recorded = state.get("config_hash")
        if self.completed and recorded is not None and not run.matches(recorded):
            raise ValueError(
                f"cannot resume {run_dir}: its settings differ from those its rounds were "
                "trained with (config_hash in state.json); resume it unchanged or start a new run"
            )
        inner = central_dp(run, flower_strategy(run), len(site_keys))
        self.strategy = CoordinatorStrategy(
            inner, run, self.dir, run_id, self.completed, site_keys, self.audit, declared
        )
        self.strategy.state_extra = {"run_id": run_id, "config_hash": self.hash}
        self._audit(
            "run.resumed" if self.completed else "run.started",
            "ok",
            {
                "config_hash": self.hash,
                "completed_round": self.completed,
                "rounds": run.num_server_rounds,
                "registered_sites": len(site_keys),
            },
        )

    def _audit(self, action: str, outcome: str, details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(
                action, f"run {self.run_id}", outcome, {"run_id": self.run_id, **details}
            )

    def run_loop(self, grid: Grid) -> None:
        """Run the remaining rounds with FedAvg's own loop."""
        if self.completed:
            arrays = self.dir.read_checkpoint(self.completed)
        else:
            arrays = initial_arrays(self.cfg)
            self.dir.write_checkpoint(0, arrays)
        remaining = self.cfg.num_server_rounds - self.completed
        set_state(
            self.dir.root,
            "running",
            run_id=self.run_id,
            config=self.cfg.to_run_config(),
            config_hash=self.hash,
            resumed_from=self.completed,
            rounds=self.cfg.num_server_rounds,
        )
        if remaining > 0:
            record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
            t0 = time.time()
            self.strategy.start(
                grid=grid,
                initial_arrays=record,
                num_rounds=remaining,
                timeout=self.cfg.round_timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
            )
            log.info("strategy finished in %.1f s", time.time() - t0)

    def run(self, grid: Grid) -> None:  # noqa: D102
        self.run_loop(grid)
        last = int(self.dir.read_state().get("completed_round", 0))
        row = next((r for r in self.dir.read_rounds() if int(r.get("round", -1)) == last), None)
        self.finish(refine(self.strategy, grid, last, row, self.cfg.round_timeout))

    def finish(self, refined: Choice | None = None) -> None:
        """Final model, summary and curves from what the rounds committed.

        ``refined``: the threshold chosen finer after the last round (:mod:`server.refine`),
        else the last round's coarse choice stands.
        """
        last = int(self.dir.read_state().get("completed_round", 0))
        arrays = self.dir.read_checkpoint(last)
        rows = self.dir.read_rounds()
        summary = {
            "run_id": self.run_id,
            "status": "finished",
            "rounds": last,
            "config_hash": self.hash,
            "final_digest": digest_update(arrays),
            "last_round": rows[-1] if rows else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        summary["central_dp"] = self.client_level_privacy(last)
        threshold = decision_threshold(rows, last)
        if refined is not None and (refined.balanced_accuracy or 0) >= (
            threshold.balanced_accuracy or 0
        ):  # the finer edges won on validation (they need not include every coarse edge)
            threshold = refined
        summary["threshold"] = threshold.record()
        self.dir.write_json("summary.json", summary)
        if rows:
            plot_round_curves(rows, self.dir.root / "curves.png", f"run {self.run_id}")
        self._audit("run.finished", "ok", {"rounds": last, "final_digest": digest_update(arrays)})
        # Written after run.finished so the record can name that entry as the run's end.
        head = self.audit.head if self.audit is not None else None
        self.dir.final_model.parent.mkdir(exist_ok=True)
        save_model(
            self.dir.final_model,
            arrays,
            run_metadata(
                self.run_id,
                last,
                rows,
                head,
                config_hash=self.hash,
                central_dp=summary["central_dp"],
                **threshold.record(),
                model=self.cfg.model,  # which network: predict rebuilds this one
                norm=self.cfg.norm,
            ),
        )
        set_state(self.dir.root, "finished", run_id=self.run_id, rounds=last)

    def client_level_privacy(self, rounds: int) -> dict[str, Any] | None:
        """Epsilon of the central-DP Gaussian mechanism over ``rounds`` releases, honestly.

        Every site takes part in every round (no sampling amplification claimed), so this is
        RDP composition of ``rounds`` Gaussian mechanisms with the configured noise.
        """
        run = self.cfg
        if run.central_dp_mode == "none":
            return None
        eps = epsilon([(run.central_dp_noise, 1.0, rounds)], run.dp_delta)
        return {
            "mode": run.central_dp_mode,
            "noise_multiplier": run.central_dp_noise,
            "clipping_norm": run.central_dp_clip,
            "rounds": rounds,
            "delta": run.dp_delta,
            "epsilon": eps,
            "unit": "client-level: one site's whole update per round; "
            "sample rate 1 (every site every round), no amplification claimed",
        }

    def fail(self, exc: BaseException) -> None:
        """Leave a clear record of why the run ended early.

        Stopped by ``idc-server stop`` (the run record says so first): ``run.ended`` stopped.
        Flower stops a ServerApp with SIGTERM, which its handler turns into ``SystemExit``
        (code 0 for a graceful stop): that is a stop from outside, recorded as
        ``run.stopped``, never as a failure. Anything else is a failure.
        """
        msg = f"{type(exc).__name__}: {exc}"
        details: dict[str, Any]
        if read_record(self.dir.root).get("status") == "stopped":  # `idc-server stop` did it
            done = int(self.dir.read_state().get("completed_round", 0))
            log.info("run %s stopped by the coordinator after round %d", self.run_id, done)
            action, outcome, details = "run.ended", "stopped", {"completed_round": done}
        elif isinstance(exc, SystemExit | KeyboardInterrupt):
            self._stopped(type(exc).__name__)
            return
        else:
            log.error("run %s failed: %s", self.run_id, msg)
            set_state(
                self.dir.root,
                "failed",
                run_id=self.run_id,
                error=msg,
                traceback=traceback.format_exc(),
            )
            action, outcome, details = "run.failed", "failed", {"error": msg[:500]}
        try:
            self._audit(action, outcome, details)
        except Exception:  # the audit log itself may be what failed
            log.exception("could not record the end of the run in the audit log")

    def _stopped(self, how: str) -> None:
        last = int(self.dir.read_state().get("completed_round", 0))
        log.warning("run %s %s (after round %d)", self.run_id, STOPPED, last)
        set_state(self.dir.root, "stopped", run_id=self.run_id, error=f"run {STOPPED}")
        try:
            details = {"by": "unknown", "how": how, "completed_round": last, "reason": STOPPED}
            self._audit("run.stopped", "stopped", details)
        except Exception:  # the audit log itself may be what failed
            log.exception("could not record the stop in the audit log")

    def close(self) -> None:  # noqa: D102
        if self.audit is not None:
            self.audit.close()
