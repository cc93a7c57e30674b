"""A bench suite with every method at its own tuned learning rate (issue 27), in process.

    python scripts/tuned_bench.py --suite p10 --methods fedmud,fedavg,ef-signsgd-int4 --lrs 0.03,0.1,0.3,1 \
        --docs docs/bench/p10-tuned     # the committed table (30 runs)
    python scripts/tuned_bench.py --suite p10 --methods fedavg,fedmud --lrs 0.05 --seeds 0 --rounds 10  # a slice

Each method of ``--methods`` (names from ``bench.suites.METHODS``) runs the suite's setting
(``bench.suites.SUITES[--suite]``: dataset, partition, clients, participation, epochs, batch)
for ``--rounds`` rounds. Learning rates are chosen fairly:

1. **tuning**: every rate of ``--lrs`` runs once with ``--tune-seed`` (not a reported seed);
2. **choice**: for each budget (``--rounds``, and ``--short`` rounds), the rate whose tuning run
   has the best mean accuracy over the budget's last ``SMOOTH`` rounds (one run's accuracy moves
   by about half a point from round to round at 10% participation). A run's first ``--short``
   rounds are those of a ``--short``-round run (no schedule depends on the budget), so the short
   budget is read off the same runs; ``--short-at-full-rate`` reads it off the full budget's;
3. **report**: ``--seeds`` at each chosen rate; the tables give mean ± sample std over them.

``seed`` varies (initialisation, seed-drawn factors, client sampling, batch order) while
``data-seed`` stays at the suite's, so every run sees the same split and partition, as in
``fedmud-bench``. Runs go through the apps' own round logic
(:func:`fedmud.rounds.simulate_in_process`: sampling, chain sync with digests, codecs,
screening, exact merges); only the transport is left out, which makes a 100-round run of
the paper CNN take ~4 min on one thread instead of ~20 through Flower's simulation.

Bytes are payloads, as :func:`fedmud.rounds.simulate_in_process` counts them: each upload's coded
arrays (``Codec.payload_nbytes``) and each downlink as the server plans it for the client (the chain
links since the round the client holds, or the full model when that is cheaper); Flower's framing
(a few hundred bytes a message) is not counted. *vs dense*: over a float32 model each way for the same messages.
Writes ``OUT/runs.json`` (every run, resumable) and with ``--docs``: ``summary.json`` and ``summary.md``.
Runs ``--workers`` at a time, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.metrics import mean_std, value_at_target  # noqa: E402
from bench.suites import METHODS, SUITES  # noqa: E402

DEFAULT_METHODS = ("fedmud", "fedavg", "ef-signsgd-int4")
DEFAULT_LRS = (0.03, 0.1, 0.3, 1.0)
TUNE_SEED = 100
SMOOTH = 5  # rounds of the tuning run a rate is judged by, ending at the budget's last


def run_one(job: dict) -> dict:
    """One run: the suite's config for ``job["method"]`` at ``job["lr"]`` and ``job["seed"]``."""
    import torch

    from fedmud.config import parse_run_config
    from fedmud.rounds import simulate_in_process

    torch.set_num_threads(1)
    suite = SUITES[job["suite"]]
    config = {**suite.run_config(job["method"], job["seed"]), "lr": job["lr"], "num-server-rounds": job["rounds"]}
    started = time.monotonic()
    server, history, uploaded, downloaded = simulate_in_process(parse_run_config(config))
    dense = server.model.dense_reference_numel * 4 * suite.clients_per_round  # a float32 model, each way, each round
    return {
        **{k: job[k] for k in ("suite", "method", "lr", "seed", "rounds", "phase")},
        "accuracy": history,  # after rounds 0..R
        "up_bytes": uploaded,  # rounds 1..R, all clients
        "down_bytes": downloaded,
        "dense_bytes_per_round": dense,
        "full_bytes": server.full_bytes,
        "link_bytes": server.link_bytes,
        "seconds": time.monotonic() - started,
    }


def key_of(job: dict) -> str:
    return f"{job['suite']}|{job['method']}|{job['lr']:g}|{job['seed']}|{job['rounds']}"


def run_all(jobs: list[dict], runs: dict, path: Path, workers: int) -> None:
    todo = [job for job in jobs if key_of(job) not in runs]
    print(f"{len(jobs)} runs, {len(todo)} to do, {workers} at a time", flush=True)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for row in pool.imap_unordered(run_one, todo):
            runs[key_of(row)] = row
            path.write_text(json.dumps(runs, indent=1))
            print(f"{row['method']} lr={row['lr']:g} seed={row['seed']}: final {row['accuracy'][-1]:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)


def cumulative(values: list[float]) -> list[float]:
    out, total = [0.0], 0.0
    for value in values:
        total += value
        out.append(total)
    return out  # aligned with accuracy (round 0 first)


def figures(row: dict, rounds: int, target: float) -> dict:
    """A run's figures over its first ``rounds`` rounds."""
    accuracy = row["accuracy"][: rounds + 1]
    up, down = cumulative(row["up_bytes"][:rounds]), cumulative(row["down_bytes"][:rounds])
    total = [u + d for u, d in zip(up, down)]
    dense = row["dense_bytes_per_round"] * rounds
    return {
        "final": accuracy[-1],
        "last": sum(accuracy[1:][-SMOOTH:]) / len(accuracy[1:][-SMOOTH:]),  # mean over the budget's last SMOOTH rounds
        "best": max(accuracy),
        "up": up[-1],
        "down": down[-1],
        "total": total[-1],
        "up_vs_dense": up[-1] / dense,
        "total_vs_dense": total[-1] / (2 * dense),
        "up_to_target": value_at_target(accuracy, up, target),
        "total_to_target": value_at_target(accuracy, total, target),
        "round_to_target": value_at_target(accuracy, list(range(len(accuracy))), target),
    }


def choose(runs: dict, suite: str, method: str, lrs: list[float], seed: int, rounds: int, at: int, target: float) -> dict:
    """For each rate, the tuning run's mean accuracy over the ``SMOOTH`` rounds ending at round ``at``
    (one run's accuracy moves by about half a point from round to round), and the best rate (ties: the smaller).

    Also each rate's uploaded bytes to ``target`` within ``at`` rounds and the rate that needs fewest
    (``fastest``; None when no rate reaches it): a rule for bytes to target, shown beside the one the
    reported seeds use."""
    scores, to_target = {}, {}
    for lr in lrs:
        row = runs[key_of({"suite": suite, "method": method, "lr": lr, "seed": seed, "rounds": rounds})]
        window = row["accuracy"][max(1, at - SMOOTH + 1): at + 1]
        scores[lr] = round(sum(window) / len(window), 6)
        to_target[lr] = figures(row, at, target)["up_to_target"]
    best = max(sorted(scores), key=lambda lr: scores[lr])
    reached = sorted(lr for lr in lrs if to_target[lr] is not None)
    return {"scores": {f"{lr:g}": scores[lr] for lr in sorted(scores)}, "lr": best,
            "edge": best in (min(lrs), max(lrs)) and len(lrs) > 1,
            "up_to_target": {f"{lr:g}": to_target[lr] for lr in sorted(to_target)},
            "fastest": min(reached, key=lambda lr: to_target[lr]) if reached else None}


def budget_table(runs: dict, args, picks: dict, rounds: int, which: str) -> dict:
    lines = {}
    for method in args.methods:
        lr = picks[method][which]["lr"]
        keys = {seed: key_of({"suite": args.suite, "method": method, "lr": lr, "seed": seed, "rounds": args.rounds})
                for seed in args.seeds}
        per_seed = {seed: figures(runs[key], rounds, args.target) for seed, key in keys.items() if key in runs}
        if not per_seed:
            continue
        line = {"lr": lr, "per_seed": per_seed}
        for field in ("final", "last", "best", "up", "down", "total", "up_vs_dense", "total_vs_dense"):
            line[field], line[f"{field}_std"] = mean_std([f[field] for f in per_seed.values()])
        reached = [f for f in per_seed.values() if f["up_to_target"] is not None]
        line["reached"] = len(reached)
        for field in ("up_to_target", "total_to_target", "round_to_target"):
            line[field], line[f"{field}_std"] = mean_std([f[field] for f in reached]) if reached else (None, None)
        lines[method] = line
    return lines


def _mb(value, std=None) -> str:
    if value is None:
        return "not reached"
    return f"{value / 1e6:.2f}" + ("" if std is None else f" ± {std / 1e6:.2f}")


def _times(value, reference) -> str:
    if value is None or reference is None:
        return "—"
    return f"1/{reference / value:.1f}" if value <= reference else f"{value / reference:.2f}×"


def markdown(summary: dict) -> str:
    from fedmud.config import RunConfig

    s, train = summary["setting"], RunConfig().train  # the suite's fields; None: the pyproject.toml default
    epochs = train.local_epochs if s["local_epochs"] is None else s["local_epochs"]
    batch = train.batch_size if s["batch_size"] is None else s["batch_size"]
    partition = f"{s['partition']} (α = {s['alpha']})" if s["partition"] == "dirichlet" else s["partition"]
    out = [f"# `{s['suite']}`, every method at its own tuned learning rate", "",
           f"Made by `{summary['command']}` on {summary['date']}; {summary['machine']}.", "",
           f"Setting: {s['dataset']}, {partition}, {s['supernodes']} clients, {s['clients_per_round']} "
           f"a round, {epochs} local epochs, batch {batch}, data-seed {s['data_seed']}; "
           f"every other key at its `pyproject.toml` default. In process (`fedmud.rounds.simulate_in_process`: the apps' "
           "round logic, chain sync, codecs, screening and merges, without the transport). Bytes are payloads, "
           "Flower's framing left out; MB = 10^6 bytes over all clients and rounds.", "",
           f"Learning rates: the grid {', '.join(f'{lr:g}' for lr in summary['lrs'])} runs once with the tuning seed "
           f"{summary['tune_seed']}; each method reports seeds {', '.join(map(str, summary['seeds']))} at the rate with the "
           f"tuning run's best mean accuracy over the budget's last {SMOOTH} rounds (SGD, the suite's optimiser; ties: the "
           "smaller rate)." + (" The short budget is read off the full budget's runs, at the full budget's rate; the "
                               "tuning table shows its own best." if summary.get("short_at_full_rate") else ""), ""]
    out += [f"## Tuning (seed {summary['tune_seed']}): mean accuracy over the last {SMOOTH} rounds of each budget", "",
            "| method | " + " | ".join(f"lr {lr:g} @ {r}" for r in summary["budgets"] for lr in summary["lrs"]) + " | chosen |",
            "|---|" + "---|" * (len(summary["lrs"]) * len(summary["budgets"]) + 1)]
    for method, pick in summary["picks"].items():
        cells = [f"{pick[str(r)]['scores'][f'{lr:g}']:.4f}" for r in summary["budgets"] for lr in summary["lrs"]]
        chosen = ", ".join(f"{pick[str(r)]['lr']:g} @ {r}" + (" (grid edge)" if pick[str(r)]["edge"] else "")
                           for r in summary["budgets"])
        out.append(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    target = summary["target"]
    out += ["", f"The same runs by MB uploaded to {target} (a rule for bytes to target; the tables below use the one above):",
            "", "| method | " + " | ".join(f"lr {lr:g} @ {r}" for r in summary["budgets"] for lr in summary["lrs"])
            + " | fewest |", "|---|" + "---|" * (len(summary["lrs"]) * len(summary["budgets"]) + 1)]
    for method, pick in summary["picks"].items():
        cells = [_mb(pick[str(r)]["up_to_target"][f"{lr:g}"]) for r in summary["budgets"] for lr in summary["lrs"]]
        fewest = ", ".join("—" if pick[str(r)]["fastest"] is None else f"{pick[str(r)]['fastest']:g} @ {r}"
                           for r in summary["budgets"])
        out.append(f"| {method} | " + " | ".join(cells) + f" | {fewest} |")
    for rounds in summary["budgets"]:
        table = summary["tables"][str(rounds)]
        ref = table.get("fedavg")
        out += ["", f"## {rounds} rounds, seeds {', '.join(map(str, summary['seeds']))} (mean ± std)", "",
                f"| method | lr | final acc | last {SMOOTH} rounds | best acc | MB up | MB down | total vs dense | reached {summary['target']} | "
                f"round to {summary['target']} | MB up to {summary['target']} | MB total to {summary['target']} | "
                "up to target vs FedAvg | total to target vs FedAvg |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, line in table.items():
            rtt = "—" if line["round_to_target"] is None else f"{line['round_to_target']:.1f}"
            out.append(
                f"| {method} | {line['lr']:g} | {line['final']:.4f} ± {line['final_std']:.4f} | "
                f"{line['last']:.4f} ± {line['last_std']:.4f} | "
                f"{line['best']:.4f} ± {line['best_std']:.4f} | {_mb(line['up'])} | {_mb(line['down'])} | "
                f"{_times(line['total_vs_dense'], 1.0)} | {line['reached']}/{len(line['per_seed'])} | {rtt} | "
                f"{_mb(line['up_to_target'], line['up_to_target_std'])} | "
                f"{_mb(line['total_to_target'], line['total_to_target_std'])} | "
                f"{_times(line['up_to_target'], ref and ref['up_to_target'])} | "
                f"{_times(line['total_to_target'], ref and ref['total_to_target'])} |")
    out += ["", "To target: cumulative bytes (and round) when accuracy first reached it, interpolated linearly between "
            "the rounds that bracket it; mean ± std over the seeds that reached it. *vs FedAvg*: over `fedavg`'s mean "
            "in the same table.", "", "## Per seed", "", "| budget | method | seed | final acc | MB up | MB down | MB up to target |",
            "|---|---|---|---|---|---|---|"]
    for rounds in summary["budgets"]:
        for method, line in summary["tables"][str(rounds)].items():
            for seed, f in line["per_seed"].items():
                out.append(f"| {rounds} | {method} | {seed} | {f['final']:.4f} | {_mb(f['up'])} | {_mb(f['down'])} | "
                           f"{_mb(f['up_to_target'])} |")
    out += ["", "Methods (`bench/suites.py`): " + "; ".join(f"`{m}`: `{json.dumps(METHODS[m])}`" for m in summary["picks"]), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="p10", choices=sorted(SUITES))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS))
    parser.add_argument("--tune-seed", type=int, default=TUNE_SEED)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=100, help="the full budget (the FedMUD paper's for this setting)")
    parser.add_argument("--short", type=int, default=40, help="the short budget, read off the same runs")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "tuned")
    parser.add_argument("--docs", type=Path, help="write summary.json and summary.md here")
    parser.add_argument("--short-at-full-rate", dest="short_own_rate", action="store_false",
                        help="report the short budget from the full budget's runs (its own best rate is still shown)")
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: write --docs from the runs OUT/runs.json holds (the seeds that finished)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    lrs = sorted(float(x) for x in args.lrs.split(","))
    args.seeds = [int(x) for x in args.seeds.split(",")]
    if args.tune_seed in args.seeds:
        parser.error(f"--tune-seed {args.tune_seed} is one of the reported --seeds: tuning must not see them")
    budgets = sorted({args.short, args.rounds}) if 0 < args.short < args.rounds else [args.rounds]
    out = args.out / args.suite
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    base = {"suite": args.suite, "rounds": args.rounds}

    def tuning(method: str) -> list[dict]:
        return [{**base, "method": method, "lr": lr, "seed": args.tune_seed, "phase": "tune"} for lr in lrs]

    def pick(method: str) -> dict:
        return {str(r): choose(runs, args.suite, method, lrs, args.tune_seed, args.rounds, r, args.target) for r in budgets}

    def report(method: str) -> list[dict]:
        chosen = sorted({p["lr"] for r, p in pick(method).items() if args.short_own_rate or r == str(args.rounds)})
        return [{**base, "method": method, "lr": lr, "seed": seed, "phase": "report"} for seed in args.seeds for lr in chosen]

    # one method at a time, so that an interrupted bench has whole methods: its report runs go beside
    # the next method's tuning runs, which keeps every worker busy
    if not args.no_run:
        for i, method in enumerate([*args.methods, None]):
            jobs = [] if i == 0 else report(args.methods[i - 1])
            run_all(jobs + ([] if method is None else tuning(method)), runs, runs_path, args.workers)
    picks = {m: pick(m) for m in args.methods}
    if args.docs is None:
        return
    suite = SUITES[args.suite]
    summary = {
        # the command that makes these runs (--no-run only rewrote the docs from them)
        "command": "python scripts/tuned_bench.py " + " ".join(a for a in sys.argv[1:] if a != "--no-run"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{multiprocessing.cpu_count()} CPU cores, Python {platform.python_version()}, one torch thread a run",
        "setting": {**suite.to_dict(), "suite": args.suite, "rounds": args.rounds, "clients_per_round": suite.clients_per_round},
        "lrs": lrs, "tune_seed": args.tune_seed, "seeds": args.seeds, "budgets": budgets, "target": args.target,
        "picks": picks,
        "short_at_full_rate": not args.short_own_rate,
        "tables": {str(r): budget_table(runs, args, {m: {"x": p[str(r if args.short_own_rate else args.rounds)]}
                                                     for m, p in picks.items()}, r, "x") for r in budgets},
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.docs / "summary.md").write_text(markdown(summary))
    print(f"wrote {args.docs / 'summary.md'}")


if __name__ == "__main__":
    main()
