"""What the default median norm bound costs honest runs: how close an honest update comes to it.

    python scripts/norm_bound_cost.py [--rounds 20] [--only SUBSTRINGS] [--compare]
                                      [--out results/norm-bound-cost.json]

``median-norm-bound`` (default 10) bounds every reply's update norm by that multiple of the
lower median of the update norms of the last three rounds with valid replies (the round's
own in the first). For each setting this runs the apps' round logic in one process
(:func:`fedmud.rounds.simulate_in_process`) with only honest clients and prints, over all
rounds, the largest ratio of an update's norm to the median the bound was taken from: below
the multiple, no honest reply was ever clipped, and the run is bitwise the run without the
bound (the mean is order-independent, and nothing else changes). ``--compare`` also runs each
setting with the bound off and checks that the held-out accuracies are equal every round.
Seeds: ``seed=0``, ``data-seed=42`` (the defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.suites import FLOAT32_UP
from fedmud.bounds import lower_median
from fedmud.config import parse_run_config
from fedmud.rounds import NORM_WINDOW, simulate_in_process

PAPER_P10 = {  # the FedMUD paper's MNIST setting at 10% participation
    "num-partitions": 100, "fraction-train": 0.1, "min-train-nodes": 10, "partition": "dirichlet",
    "alpha": 0.3, "local-epochs": 3, "batch-size": 64,
}
SETTINGS = {
    "fedmud iid 10 clients": {},
    "fedmud dirichlet 0.3, 10 clients": {"partition": "dirichlet"},
    "fedmud label-count 0.3, 10 clients": {"partition": "label-count"},
    "fedmud int4+EF uplink, dirichlet": {"partition": "dirichlet", "uplink": "int4", "error-feedback": True},
    "fedavg dirichlet 0.3, 10 clients": {"method": "fedavg", "partition": "dirichlet"},
    "fedmud paper p10 (100 clients, 10%)": PAPER_P10,
    "fedavg paper p10 (100 clients, 10%)": {"method": "fedavg", **PAPER_P10},
}


def worst_ratio(norms_per_round: list[list[float]]) -> float:
    """The largest update norm over the median its round's bound was drawn from."""
    worst = 0.0
    for r, norms in enumerate(norms_per_round):
        pooled = [n for past in norms_per_round[max(0, r - NORM_WINDOW) : r] for n in past] or norms
        worst = max(worst, max(norms) / lower_median(pooled))
    return worst


def measure(overrides: dict, rounds: int, compare: bool) -> dict:
    per_round: list[list[float]] = []

    def on_round(r: int, server) -> None:
        per_round.append(list(server.recent_norms[-1]))

    run = parse_run_config({**FLOAT32_UP, "num-server-rounds": rounds, **overrides})
    started = time.monotonic()
    _, bounded, _, _ = simulate_in_process(run, on_round=on_round)
    out = {
        "worst_norm_over_median": worst_ratio(per_round),
        "multiple": run.bounds.median_norm_bound,
        "final_accuracy": bounded[-1],
        "seconds": time.monotonic() - started,
    }
    if compare:
        free = simulate_in_process(parse_run_config({**FLOAT32_UP, "num-server-rounds": rounds, "median-norm-bound": 0.0, **overrides}))[1]
        out["same_accuracy_every_round_without_the_bound"] = bounded == free
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated substrings of the settings to run")
    parser.add_argument("--compare", action="store_true", help="also run each setting without the bound")
    parser.add_argument("--out", default="results/norm-bound-cost.json")
    args = parser.parse_args()
    results = {}
    for name, overrides in SETTINGS.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        results[name] = measure(overrides, args.rounds, args.compare)
        r = results[name]
        same = r.get("same_accuracy_every_round_without_the_bound")
        print(
            f"{name}: worst honest update norm / median {r['worst_norm_over_median']:.2f} (bound x{r['multiple']:g}); "
            f"final accuracy {r['final_accuracy']:.4f}" + ("" if same is None else f"; same without the bound: {same}"),
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/norm_bound_cost.py", *sys.argv[1:]])
    out.write_text(json.dumps({"command": command, "rounds": args.rounds, "seed": 0, "data-seed": 42, "settings": results}, indent=1))


if __name__ == "__main__":
    main()
