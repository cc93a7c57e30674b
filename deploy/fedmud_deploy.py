"""Small deployment helpers used by deploy/entrypoint.sh and the smoke scripts.

    python deploy/fedmud_deploy.py partition-id NUM_PARTITIONS
        This SuperNode's partition: $PARTITION_ID, else the lowest partition not yet claimed
        in the directory $FEDMUD_PARTITION_CLAIMS, which the replicas of one Compose service
        share (a claim is a directory made atomically, owned by the container's hostname, so a
        restarted container keeps its partition).
    python deploy/fedmud_deploy.py run-config OUT.toml PRESET [KEY=VALUE ...]
        One run-config file for `flwr run -c OUT.toml`: the preset (a name in configs/ or a
        path; empty for none), then the key=value overrides, later ones winning. Flower 1.39
        takes either one TOML file or key=value pairs, not both, hence this merge.
    python deploy/fedmud_deploy.py traffic LS_JSON RUN_DIR
        Compare the ledger's byte totals (RUN_DIR/summary.json, written by the ServerApp) with
        the SuperLink's own Fleet traffic counters (`flwr ls --run-id ID --format json`);
        print the comparison and write it to RUN_DIR/traffic.json. Exit status 1 when a
        direction differs by more than --tolerance (default 0.10) of the ledger plus Flower's
        framing of each message (MESSAGE_OVERHEAD bytes a message, which the ledger leaves out).
    python deploy/fedmud_deploy.py connection NAME ADDRESS (--root-certificates CA | --insecure)
        Add (or replace) the flwr CLI connection NAME in $FLWR_HOME/config.toml (default
        ~/.flwr/config.toml), keeping every other connection; NAME becomes the default
        connection only where none is set.
    python deploy/fedmud_deploy.py rejoined RUN_DIR NODE_ID AFTER_ROUND
        For a SuperNode that was restarted after round AFTER_ROUND: the first later round in which
        the ServerApp sent NODE_ID a model (ledger.json), and whether its upload was merged in
        that round (results.json: "accepted" equals the number of nodes sent a model that round).
        Exit status 1 with the reason otherwise.
    python deploy/fedmud_deploy.py check RUN_DIR ROUNDS
        What the smoke scripts require of a finished run: rounds 1..ROUNDS in results.json,
        TensorBoard logs, and traffic.json within its tolerance. Prints the final accuracy and
        the bytes; exit status 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def partition_id(num_partitions: int) -> int:
    explicit = os.environ.get("PARTITION_ID", "").strip()
    if explicit:
        partition = int(explicit)
    else:
        partition = _claim_partition(num_partitions)
    if not 0 <= partition < num_partitions:
        raise SystemExit(f"partition-id {partition} is outside 0..{num_partitions - 1}")
    return partition


def _claim_partition(num_partitions: int) -> int:
    claims = os.environ.get("FEDMUD_PARTITION_CLAIMS", "").strip()
    if not claims:
        raise SystemExit("set PARTITION_ID (or FEDMUD_PARTITION_CLAIMS, a directory the SuperNodes share)")
    claims_dir, owner = Path(claims), socket.gethostname()
    claims_dir.mkdir(parents=True, exist_ok=True)
    for claim in claims_dir.iterdir():
        try:
            if (claim / "owner").read_text() == owner:
                return int(claim.name)
        except (FileNotFoundError, NotADirectoryError):  # being claimed right now, or not a claim
            continue
    for partition in range(num_partitions):
        try:
            (claims_dir / str(partition)).mkdir()
        except FileExistsError:
            continue
        (claims_dir / str(partition) / "owner").write_text(owner)
        return partition
    raise SystemExit(f"all {num_partitions} partitions are taken: scale with FEDMUD_CLIENTS, not --scale")


def run_config(out: Path, preset: str, overrides: list[str]) -> dict:
    from flwr.common.config import parse_config_args  # the same parser `flwr run -c` uses
    import tomli_w

    config: dict = {}
    if preset:
        path = Path(preset) if preset.endswith(".toml") else ROOT / "configs" / f"{preset}.toml"
        if not path.is_file():
            presets = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.toml")))
            raise SystemExit(f"preset {preset!r} not found; choose one of {presets} or give a .toml path")
        config.update(parse_config_args([str(path)]))
    for item in overrides:
        config.update(parse_config_args([item]))
    out.write_text(tomli_w.dumps(config))
    return config


def connection(name: str, address: str, root_certificates: str | None) -> Path:
    import tomllib

    import tomli_w

    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    entry: dict = {"address": address}
    if root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        entry["insecure"] = True
    superlink[name] = entry
    superlink.setdefault("default", name)
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


# What Flower counts per message beyond its content (the message's metadata and object tree in
# each Push/PullMessages call): measured 0.7-0.9 kB per upload and 0.9-1.1 kB per download
# (docs/deployment.md). The ledger counts contents only, so the check allows this much per message.
MESSAGE_OVERHEAD = 1500


def traffic(ls_json: Path, run_dir: Path, tolerance: float) -> bool:
    runs = json.loads(ls_json.read_text())["runs"]
    flower = runs[0]["network-traffic"]
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger_rows = json.loads((run_dir / "ledger.json").read_text())
    messages = {d: sum(r["direction"] == d for r in ledger_rows["records"] + ledger_rows.get("protocol", [])) for d in ("up", "down")}
    messages["total"] = messages["up"] + messages["down"]
    # The SuperLink's inbound traffic is what the SuperNodes uploaded, its outbound what they
    # downloaded; the ledger's "up" and "down" are the same two directions seen by the ServerApp.
    rows = {
        "up": (summary["up_bytes"], flower["inbound-bytes"]),
        "down": (summary["down_bytes"], flower["outbound-bytes"]),
        "total": (summary["up_bytes"] + summary["down_bytes"], flower["total-bytes"]),
    }
    report = {
        "run_id": runs[0]["run-id"],
        "status": runs[0]["status"],
        "tolerance": tolerance,
        "message_overhead": MESSAGE_OVERHEAD,
        **{
            direction: {
                "ledger_bytes": ledger,
                "flower_bytes": counted,
                "flower_over_ledger": counted / ledger if ledger else None,
                "messages": messages[direction],
                "flower_minus_ledger_per_message": (counted - ledger) / messages[direction] if messages[direction] else None,
            }
            for direction, (ledger, counted) in rows.items()
        },
    }
    # within the tolerance, plus Flower's framing of each message the ledger counted
    ok = all(
        ledger and -tolerance * ledger <= counted - ledger <= tolerance * ledger + messages[d] * MESSAGE_OVERHEAD
        for d, (ledger, counted) in rows.items()
    )
    report["within_tolerance"] = ok
    (run_dir / "traffic.json").write_text(json.dumps(report, indent=1))
    for direction, (ledger, counted) in rows.items():
        ratio = f"{counted / ledger:.4f}" if ledger else "n/a"
        print(f"bytes {direction:>5}: ledger {ledger:>12,d}  flower ls {counted:>12,d}  flower/ledger {ratio}")
    verdict = "within" if ok else "NOT within"
    print(
        f"bytes: Flower's counters are {verdict} {tolerance:.0%} of the ledger plus {MESSAGE_OVERHEAD} B of "
        f"framing per message (run {report['run_id']})"
    )
    return ok


def check(run_dir: Path, rounds: int) -> str | None:
    """None when the run in ``run_dir`` is complete and its bytes agree, else the reason."""
    summary = json.loads((run_dir / "summary.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    traffic = json.loads((run_dir / "traffic.json").read_text())
    completed = [row["round"] for row in results if row["round"] > 0]
    print(f"rounds completed: {len(completed)}; final accuracy {summary['final_accuracy']:.4f}")
    for direction in ("up", "down", "total"):
        row = traffic[direction]
        print(f"bytes {direction}: ledger {row['ledger_bytes']:,} flower ls {row['flower_bytes']:,}"
              f" (flower/ledger {row['flower_over_ledger']:.4f})")
    if completed != list(range(1, rounds + 1)):
        return f"rounds completed: {completed}, expected 1..{rounds}"
    if not (run_dir / "tensorboard").is_dir():
        return "no TensorBoard logs"
    if not traffic["within_tolerance"]:
        return (
            f"Flower's traffic counters differ from the ledger by more than {traffic['tolerance']:.0%} "
            f"plus {traffic.get('message_overhead', 0)} B per message"
        )
    return None


def rejoined(run_dir: Path, node: str, after_round: int) -> str | None:
    """None when ``node``'s upload was merged in the first round after ``after_round`` it was sent a model."""
    records = json.loads((run_dir / "ledger.json").read_text())["records"]
    rows = {row["round"]: row for row in json.loads((run_dir / "results.json").read_text())}
    rounds = sorted({r["round"] for r in records if r["client"] == node and r["direction"] == "down" and r["round"] > after_round})
    if not rounds:
        return f"node {node} was not sent a model after round {after_round}"
    first = rounds[0]
    sent = {r["client"] for r in records if r["round"] == first and r["direction"] == "down"}
    row = rows.get(first, {})
    accepted = row.get("accepted")
    counts = ", ".join(f"{k} {row[k]}" for k in ("failed", "resync", "rejected") if k in row)
    print(f"node {node} back in round {first}: {len(sent)} nodes sent a model, {accepted} uploads merged ({counts})")
    if accepted != len(sent):
        return f"round {first}: {accepted} of {len(sent)} uploads merged, so node {node} did not contribute in its first round back"
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("partition-id").add_argument("num_partitions", type=int)
    config = commands.add_parser("run-config")
    config.add_argument("out", type=Path)
    config.add_argument("preset")
    config.add_argument("overrides", nargs="*")
    compare = commands.add_parser("traffic")
    compare.add_argument("ls_json", type=Path)
    compare.add_argument("run_dir", type=Path)
    compare.add_argument("--tolerance", type=float, default=0.10)
    conn = commands.add_parser("connection")
    conn.add_argument("name")
    conn.add_argument("address")
    security = conn.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-certificates")
    security.add_argument("--insecure", action="store_true")
    back = commands.add_parser("rejoined")
    back.add_argument("run_dir", type=Path)
    back.add_argument("node")
    back.add_argument("after_round", type=int)
    finished = commands.add_parser("check")
    finished.add_argument("run_dir", type=Path)
    finished.add_argument("rounds", type=int)
    args = parser.parse_args(argv)

    if args.command == "partition-id":
        print(partition_id(args.num_partitions))
    elif args.command == "run-config":
        print(json.dumps(run_config(args.out, args.preset, args.overrides)))
    elif args.command == "connection":
        connection(args.name, args.address, args.root_certificates)
    elif args.command == "traffic":
        return 0 if traffic(args.ls_json, args.run_dir, args.tolerance) else 1
    elif args.command == "rejoined":
        if (failure := rejoined(args.run_dir, args.node, args.after_round)) is not None:
            print(f"FAIL: {failure}", file=sys.stderr)
            return 1
    elif (failure := check(args.run_dir, args.rounds)) is not None:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
