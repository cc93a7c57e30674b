"""Secure aggregation with int8/int4 codes on the round's shared grid, against float32 values and plain uploads.

    python scripts/secure_codes.py --rounds 30 --seeds 0,1,2 --docs docs

The README's secure-aggregation example (10 clients, the paper CNN, ``max-examples`` at the
partition size) in 100 partitions of 40 examples, 1 local epoch, with an ``update-norm-bound``,
which sets the grid the clients round onto (``SETTINGS``): 1, which the updates are above (they
start near 3.6 and end near 1), so the bound holds them at it, and 10, which no update reaches, so
the grid is coarser than the updates need. Each arm runs its ServerApp and the real ClientApp over
an in-process Grid that serialises every message (``tests/federation.py:LoopbackGrid``, as
``tests/test_secure_field.py``), so uploads are the bytes Flower moves, SecAgg+'s own messages
included. Prints a markdown table; with ``--docs`` writes ``<docs>/secure-codes/{summary.json,tables.md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.app import run_server  # noqa: E402
from tests.federation import LoopbackGrid, as_server_app, readme_secure_example  # noqa: E402

COMMON = {"num-partitions": 100, "local-epochs": 1, "max-examples": 40}
SETTINGS = {"bound-1": {**COMMON, "update-norm-bound": 1.0}, "bound-10": {**COMMON, "update-norm-bound": 10.0}}
ARMS = {  # name -> (secure-aggregation, uplink, what the table calls it)
    "plain-int4": (False, "int4", "plain, int4 uploads (the default)"),
    "plain-float32": (False, "float32", "plain, float32 uploads"),
    "secure-float32": (True, "float32", "SecAgg+, float32 values"),
    "secure-int8": (True, "int8", "SecAgg+, int8 codes (`uplink=auto` with a bound)"),
    "secure-int4": (True, "int4", "SecAgg+, int4 codes"),
}


def one_run(setting: str, arm: str, seed: int, rounds: int) -> dict:
    federation, example = readme_secure_example()
    secure, uplink, _ = ARMS[arm]
    with tempfile.TemporaryDirectory() as tmp:
        config = {**example, **SETTINGS[setting], "secure-aggregation": secure, "uplink": uplink, "seed": seed,
                  "num-server-rounds": rounds, "run-dir": tmp}
        started = time.perf_counter()
        with as_server_app():
            summary = run_server(LoopbackGrid(federation["num-supernodes"], config), config)
        results = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    return {
        "setting": setting, "arm": arm, "seed": seed, "config": {k: v for k, v in config.items() if k != "run-dir"},
        "accuracy": [row["accuracy"] for row in results], "up_bytes": summary["up_bytes"],
        "seconds": time.perf_counter() - started,
    }


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def table(runs: list[dict], rounds: int, clients: int) -> str:
    base = statistics.mean(r["up_bytes"] for r in runs if r["arm"] == next(iter(ARMS)))
    lines = [
        "| arm | final accuracy | best accuracy | MB uploaded | kB a client a round | upload vs the default |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        up = statistics.mean(r["up_bytes"] for r in mine)
        lines.append(
            f"| {ARMS[arm][2]} | {_mean_std([r['accuracy'][-1] for r in mine])} | {_mean_std([max(r['accuracy']) for r in mine])} "
            f"| {up / 1e6:.2f} | {up / rounds / clients / 1e3:.1f} | {up / base:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--docs", type=Path, help="write <docs>/secure-codes/{summary.json,tables.md}")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    settings = [a.strip() for a in args.settings.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS] + [s for s in settings if s not in SETTINGS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown {unknown}; arms: {list(ARMS)}, settings: {list(SETTINGS)}" if unknown else "--rounds must be >= 1")
    torch.set_num_threads(1)
    runs = []
    for setting in settings:
        for seed in seeds:
            for arm in arms:
                runs.append(one_run(setting, arm, seed, args.rounds))
                r = runs[-1]
                print(f"{setting}, {arm}, seed {seed}: final {r['accuracy'][-1]:.4f}, {r['up_bytes']:,} B up, {r['seconds']:.0f} s", flush=True)
    clients = readme_secure_example()[0]["num-supernodes"]
    text = "\n\n".join(
        f"## {setting}: {json.dumps(SETTINGS[setting])}\n\n" + table([r for r in runs if r["setting"] == setting], args.rounds, clients)
        for setting in settings
    ) if set(arms) == set(ARMS) else ""
    print(text)
    if args.docs:
        out = args.docs / "secure-codes"
        out.mkdir(parents=True, exist_ok=True)
        command = f"python scripts/secure_codes.py --rounds {args.rounds} --seeds {args.seeds} --settings {args.settings} --docs {args.docs}"
        (out / "summary.json").write_text(json.dumps({"command": command, "seeds": seeds, "rounds": args.rounds,
                                                      "settings": {s: SETTINGS[s] for s in settings}, "runs": runs}, indent=1) + "\n")
        (out / "tables.md").write_text(
            f"# Secure aggregation with codes on a shared grid\n\nMade by `{command}`; seeds {args.seeds}, {args.rounds} rounds, "
            "one torch thread. The README's secure-aggregation example (10 clients, every one every round), with each "
            f"setting's keys over it. Uploads: every byte Flower moves up, SecAgg+'s key exchange included.\n\n{text}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
