"""Initialisation study (issue 4): a learning-rate sweep of zero, nonzero, nonzero-compensated and hrp.

    python scripts/init_sweep.py [--rounds 5] [--lrs 0.005,0.01,0.02,0.05,0.15]
                                 [--partitions iid,dirichlet] [--out results/init-sweep]
                                 [--docs docs]

Every run is the same federated loop the Flower apps drive — ``fedmud.rounds.ServerModel``
and ``ClientModel``: chain sync, seed-drawn factors, encoding, exact aggregation, merge —
called in one process, without the transport (bytes do not depend on the init, and the
Flower start-up would triple the sweep's time). Same data, partitions, client order and
seeds for every run; only ``init`` and ``lr`` change. Writes ``OUT/results.json``,
``OUT/NAME.md`` (tables) and ``DOCS/img/NAME.png`` (accuracy vs lr). The tables and plot
in ``docs/init-study.md`` come from::

    python scripts/init_sweep.py --rounds 5 --docs docs
    python scripts/init_sweep.py --rounds 5 --partitions iid --set "kind='mat' pattern='ab'" \
        --name init-sweep-mat-ab --docs docs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.suites import FLOAT32_UP
from fedmud.config import parse_run_config
from fedmud.rounds import simulate_in_process

ROOT = Path(__file__).resolve().parents[1]
INITS = ("zero", "nonzero", "nonzero-compensated", "hrp")


def run_one(overrides: dict, rounds: int) -> dict:
    run = parse_run_config({**FLOAT32_UP, "num-server-rounds": rounds, **overrides})
    started = time.monotonic()
    server, history, _, _ = simulate_in_process(run)
    basis = sum(t.numel() for t in server.model.hrp_state().values()) * 4
    return {
        "accuracy": history,
        "final": history[-1],
        "best": max(history),
        "seconds": time.monotonic() - started,
        "upload_bytes_per_client_round": server.codec.payload_nbytes,
        "hrp_basis_bytes": basis,
    }


def table(rows: list[dict], partition: str, lrs: list[float], key: str) -> list[str]:
    lines = ["| init | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | mean |", "|---" * (len(lrs) + 2) + "|"]
    for init in INITS:
        vals = [next((r[key] for r in rows if r["init"] == init and r["lr"] == lr and r["partition"] == partition), None) for lr in lrs]
        got = [v for v in vals if v is not None]
        if not got:
            continue
        cells = " | ".join("–" if v is None else f"{v:.4f}" for v in vals)
        lines.append(f"| {init} | {cells} | {sum(got) / len(got):.4f} |")
    return lines


def plot(rows: list[dict], partitions: list[str], lrs: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(partitions), figsize=(5.5 * len(partitions), 4), squeeze=False)
    for ax, partition in zip(axes[0], partitions):
        for init, marker in zip(INITS, "osD^"):
            pts = sorted((r["lr"], r["final"]) for r in rows if r["init"] == init and r["partition"] == partition)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=init)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"MNIST-5k, {partition}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lrs", default="0.005,0.01,0.02,0.05,0.15")
    parser.add_argument("--inits", default=",".join(INITS))
    parser.add_argument("--partitions", default="iid,dirichlet")
    parser.add_argument("--set", default="", help="extra run-config overrides, e.g. \"kind='mat' pattern='ab'\"")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "init-sweep")
    parser.add_argument("--docs", type=Path, default=None, help="write the plot to DOCS/img/NAME.png")
    parser.add_argument("--name", default="init-sweep", help="plot and tables name (default init-sweep)")
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    partitions = args.partitions.split(",")
    extra = {}
    for item in args.set.split():
        key, _, value = item.partition("=")
        extra[key] = json.loads(value.replace("'", '"')) if value[:1] in "'\"[{tf0123456789." else value
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    common = {"local-epochs": 1, "num-partitions": 10, "hrp-rounds": 1, **extra}
    started = time.monotonic()
    for partition in partitions:
        for init in args.inits.split(","):
            for lr in lrs:
                if any(r["partition"] == partition and r["init"] == init and r["lr"] == lr and r["set"] == args.set for r in rows):
                    continue  # resume: done already
                result = run_one({**common, "partition": partition, "init": init, "lr": lr}, args.rounds)
                rows.append({"partition": partition, "init": init, "lr": lr, "set": args.set, **result})
                results_path.write_text(json.dumps(rows, indent=1))
                print(
                    f"{partition:9s} {init:20s} lr {lr:<6g} final {result['final']:.4f} best {result['best']:.4f} "
                    f"({result['seconds']:.0f} s; sweep {time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    if args.docs:
        mine = [r for r in rows if r["set"] == args.set]
        lines = []
        for partition in partitions:
            lines += [f"### {partition}: final accuracy after {args.rounds} rounds", ""]
            lines += table(mine, partition, lrs, "final") + [""]
        (args.out / f"{args.name}.md").write_text("\n".join(lines))
        plot(mine, partitions, lrs, args.docs / "img" / f"{args.name}.png")
        print("\n".join(lines))
    print(f"cores: {os.cpu_count()}; config: {json.dumps({**common, 'rounds': args.rounds})}")


if __name__ == "__main__":
    main()
