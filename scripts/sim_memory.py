"""Memory of a Flower simulation against the number of clients, with and without client state.

    python scripts/sim_memory.py                                   # 100 and 1,000 clients x keep/none (~5 min)
    python scripts/sim_memory.py --clients 1000 --states none --rounds 10 --out /tmp/mem.json

Each case is one ``flwr run . --stream`` on a private simulation SuperLink (``bench.superlink``):
N simulated clients (``num-supernodes`` = ``num-partitions`` = N, IID MNIST-5k), 10 of them a round
(``fraction-train`` = 10/N), ``--rounds`` rounds of one local epoch, ``client-resources-num-cpus=1``,
and ``client-state`` ``keep`` (a client holds the global model between rounds, in Flower's node
state) or ``none`` (it holds nothing; every download starts from round 0). Every 0.5 s the resident
memory (RSS) of every process of the run is read: the SuperLink, the simulation process
(``flwr-simulation``, which holds every node's state), Ray's processes and ClientApp actors, found
by an environment token. Reported per case: the peak of the sum over all of them; the simulation
process's RSS after round 1 and at the end (what node state adds over the run); the clients that
trained at least once; the downloaded bytes. Written as JSON (default
``docs/perf/sim_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.superlink import CONNECTION, PrivateSuperLink, processes_with_token  # noqa: E402
from fedmud.results import read_results  # noqa: E402

DEFAULT_OUT = Path("docs/perf/sim_memory.json")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pids: list[int]) -> tuple[int, int]:
    """(RSS of all ``pids``, RSS of the simulation process among them: the one holding node states)."""
    total = simulation = 0
    for pid in pids:
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        total += rss
        if b"flwr-simulation" in name:
            simulation += rss
    return total, simulation


def one_case(clients: int, state: str, rounds: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedmud-mem-"))
    superlink = PrivateSuperLink(ROOT, work / "superlink.log")
    samples: list[tuple[float, tuple[int, int]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), rss_bytes(processes_with_token(superlink.token))))
            stop.wait(0.5)

    config = (
        f"num-server-rounds={rounds} num-partitions={clients} fraction-train={10 / clients} min-train-nodes=10 "
        f'local-epochs=1 client-state="{state}" run-dir="{work / "runs"}"'
    )
    command = ["flwr", "run", ".", CONNECTION, "--stream", "--federation-config",
               f"num-supernodes={clients} client-resources-num-cpus=1", "-c", config]
    try:
        superlink.start()
        thread = threading.Thread(target=sample, daemon=True)
        started = time.monotonic()
        thread.start()
        result = subprocess.run(command, cwd=ROOT, env=superlink.env, capture_output=True, text=True, timeout=1800)
        stop.set()
        thread.join()
    finally:
        superlink.close()
    summaries = list((work / "runs").glob("*/summary.json"))
    completed = [path for path in summaries if json.loads(path.read_text()).get("status", "completed") == "completed"]
    if result.returncode != 0 or not completed:
        raise SystemExit(f"sim_memory: the run failed:\n{(result.stdout + result.stderr)[-3000:]}")
    run_dir = summaries[0].parent
    rows = read_results(run_dir / "results.json")
    ledger = json.loads((run_dir / "ledger.json").read_text())["records"]
    summary = json.loads(summaries[0].read_text())
    after_first = started + rows[1].wall_s  # wall_s counts from the strategy's start: a little after ours
    first = [b for t, b in samples if t >= after_first and b[1]] or [samples[-1][1]]
    running = [b for _, b in samples if b[1]]  # while the simulation process is alive
    trained = {r["client"] for r in ledger if r["direction"] == "up"}
    return {
        "clients": clients,
        "client_state": state,
        "rounds": rounds,
        "peak_rss_bytes": max(b[0] for b in running),
        "simulation_process_peak_rss_bytes": max(b[1] for b in running),
        "simulation_process_rss_after_round_1_bytes": first[0][1],
        "simulation_process_rss_at_end_bytes": running[-1][1],
        "clients_that_trained": len(trained),
        "down_bytes": summary["down_bytes"],
        "final_accuracy": summary["final_accuracy"],
        "wall_s": summary["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="100,1000", help="comma-separated client counts (default 100,1000)")
    parser.add_argument("--states", default="keep,none", help="client-state values (default keep,none)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default {DEFAULT_OUT} in the repository)")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    states = [s.strip() for s in args.states.split(",") if s.strip()]
    if not clients or min(clients) < 10 or not set(states) <= {"keep", "none"} or args.rounds < 2:
        parser.error("--clients >= 10 each, --states from keep,none, --rounds >= 2")
    cases = []
    for n in clients:
        for state in states:
            case = one_case(n, state, args.rounds)
            cases.append(case)
            print(
                f"{n:5d} clients, client-state={state:4s}: all processes peak {case['peak_rss_bytes'] / 1e6:6.0f} MB; "
                f"simulation process after round 1 {case['simulation_process_rss_after_round_1_bytes'] / 1e6:5.0f} MB, "
                f"at the end {case['simulation_process_rss_at_end_bytes'] / 1e6:5.0f} MB; "
                f"{case['clients_that_trained']} clients trained, {case['down_bytes'] / 1e6:.2f} MB down, "
                f"accuracy {case['final_accuracy']:.3f}",
                flush=True,
            )
    out = args.out or ROOT / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/sim_memory.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    out.write_text(json.dumps({"command": command, "cases": cases}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
