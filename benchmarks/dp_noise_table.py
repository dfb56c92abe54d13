"""How loud DP-SGD's noise is at each batch size, before any training: the accountant's table.

Run: ``.venv/bin/python benchmarks/dp_noise_table.py --patches 2000 --epochs 20``

For one site of ``--patches`` training patches and a whole run of ``--epochs`` local epochs
(rounds x local epochs), at each epsilon (delta 1e-5) and batch: the noise multiplier the
product would set for the whole run (:func:`simulation.plan.site_noise`, what
:func:`~simulation.plan.noise_for_plan` asks of each site: Opacus's sampling rate 1 / batches
per epoch and its RDP accountant), the steps it allows, and the norm
of the noise on one step's averaged clipped gradient, ``sqrt(parameters) x sigma / batch`` in
clip norms, for each network. A clipped per-patch gradient is at most one clip norm long, so
where that noise norm is well above 1 a step is mostly noise. No data is read and nothing is
trained: this sizes the DP recipes row 4 chooses among (``simulation/recipe.py``), it does not
rank them.
"""

from __future__ import annotations

import argparse
import math
import warnings

from common.model import build_model, count_parameters
from simulation.plan import DPSpec, site_noise


def main() -> int:
    """Print one line per (epsilon, batch)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=2000, help="training patches of one site")
    p.add_argument("--epochs", type=int, default=20, help="local epochs of the whole run")
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--batches", default="64,256,512,1024")
    p.add_argument("--delta", type=float, default=1e-5)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    params = {k: count_parameters(build_model("group", kind=k))[0] for k in ("paper", "gap")}
    print(
        f"site of {args.patches} training patches, {args.epochs} local epochs, delta "
        f"{args.delta:g}; parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items())
    )
    for eps in (float(e) for e in args.epsilons.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            spec = DPSpec(epsilon=eps, delta=args.delta, accountant="rdp")
            sigma, rate, steps = site_noise(args.patches, batch, args.epochs, spec)
            noise = ", ".join(f"{k} {math.sqrt(n) * sigma / batch:.2f}" for k, n in params.items())
            print(
                f"epsilon {eps:g} batch {batch}: rate {rate:.3f}, {steps} steps, noise "
                f"multiplier {sigma:.2f}; noise per step (clip norms): {noise}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
