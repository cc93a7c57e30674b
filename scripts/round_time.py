"""Where a finished run's rounds spent their time, against what the clients' training needs.

    python scripts/round_time.py runs/20261125-225714 --workers 2
    python scripts/round_time.py runs/20261125-225714 --workers 2 --json

Reads the run's ``results.json`` (each round's row holds the ServerApp's timings, see
:class:`fedmud.results.RoundResult`: plan, clients, aggregate, evaluate, checkpoint, and the
seconds the replies report) and prints per round: its wall time, the clients' summed training time, the
floor ``training / workers + evaluation`` (``workers``: ClientApps that train at once, e.g.
2 in a simulation on 2 cores with ``client-resources-num-cpus=1``) and the overhead ratio
``(round - evaluation) / (training / workers)``, 1.0 when the round is nothing but training.
The first round also pays the workers' start-up (processes, imports, data); the summary line
gives the median over the later rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fedmud.results import RoundResult, read_results
from server.strategy import server_seconds


def rows(run_dir: Path) -> list[RoundResult]:
    """The run's timed rounds whose replies reported training seconds."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise SystemExit(f"round_time: {path} not found; give a run directory (runs/<timestamp>)")
    try:
        results = read_results(path)
    except ValueError as err:
        raise SystemExit(f"round_time: {path}: {err}") from None
    return [r for r in results if r.round_s is not None and r.client_train_s]


def table(timed: list[RoundResult], workers: float) -> list[dict]:
    out = []
    for r in timed:
        training = r.client_train_s / workers
        out.append(
            {
                "round": r.round,
                "round_s": r.round_s,
                "clients_s": r.clients_s,
                "client_train_summed_s": r.client_train_s,
                "evaluate_s": r.evaluate_s,
                "server_s": server_seconds(r),
                "floor_s": training + r.evaluate_s,
                "overhead_ratio": (r.round_s - r.evaluate_s) / training,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (it holds results.json)")
    parser.add_argument("--workers", type=float, required=True, help="ClientApps training at once")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.workers <= 0:
        parser.error("--workers must be > 0")
    out = table(rows(args.run_dir), args.workers)
    if not out:
        raise SystemExit("round_time: no timed round with client timings in results.json")
    later = [r["overhead_ratio"] for r in out[1:]] or [out[0]["overhead_ratio"]]
    summary = {"workers": args.workers, "rounds": out, "median_overhead_ratio_after_round_1": statistics.median(later)}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print("| round | wall s | clients s | training s (summed) | evaluation s | server s | floor s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['round']} | {r['round_s']:.2f} | {r['clients_s']:.2f} | {r['client_train_summed_s']:.2f} | "
            f"{r['evaluate_s']:.2f} | {r['server_s']:.2f} | {r['floor_s']:.2f} | {r['overhead_ratio']:.2f} |"
        )
    print(f"median ratio after round 1: {summary['median_overhead_ratio_after_round_1']:.2f} (workers {args.workers:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
