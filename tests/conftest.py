"""Fixtures that start real Flower processes and stop them by process id."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.superlink import free_port, superlink_command, wait_for_port
from bench.superlink import stop_group as stop_process_group

ROOT = Path(__file__).resolve().parents[1]


class SuperLink:
    """A real SuperLink process on loopback with a private FLWR_HOME whose connection "test" points at it."""

    def __init__(self, workdir: Path, simulation: bool) -> None:
        self.workdir = workdir
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        args, http_port, self.fleet_port = superlink_command(self.home, workdir / "state.db", "test", simulation)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.processes: list[subprocess.Popen] = []
        self.start("superlink", args, http_port)

    def start(self, name: str, args: list[str], port: int) -> subprocess.Popen:
        """Start a Flower process in its own process group and wait until it listens on ``port``."""
        with open(self.workdir / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        wait_for_port(port, process)
        return process

    def start_supernode(self, partition_id: int, num_partitions: int) -> subprocess.Popen:
        port = free_port()
        args = [
            "flower-supernode",
            "--insecure",
            "--grpc-rere",
            "--superlink",
            f"127.0.0.1:{self.fleet_port}",
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions}",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        return self.start(f"supernode-{partition_id}", args, port)

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process_group(process)


@pytest.fixture(scope="module")
def simulation_superlink(tmp_path_factory):
    """A SuperLink in simulation mode; yields the environment under which `flwr run . test` reaches it."""
    superlink = SuperLink(tmp_path_factory.mktemp("simulation"), simulation=True)
    try:
        yield superlink.env
    finally:
        superlink.stop()


def flwr_run(env: dict, *args: str, timeout: float = 600, app: str = ".") -> subprocess.CompletedProcess:
    """`flwr run APP test --stream ARGS` against the fixture's SuperLink (APP relative to the repository)."""
    return subprocess.run(
        ["flwr", "run", app, "test", "--stream", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def finished_run(env: dict, run_dir: Path, run_config: str, supernodes: int = 3, app: str = ".") -> dict:
    """Run `flwr run` to its end with ``-c run_config run-dir=RUN_DIR``; asserts it succeeded and
    returns its output and what it wrote: summary, results, ledger, and its directory."""
    result = flwr_run(
        env,
        "--federation-config",
        f"num-supernodes={supernodes} client-resources-num-cpus=1",
        "-c",
        f'{run_config} run-dir="{run_dir}"',
        app=app,
    )
    output = result.stdout + result.stderr
    summaries = list(run_dir.glob("*/summary.json"))
    assert result.returncode == 0 and summaries, output[-4000:]
    run = summaries[0].parent
    return {
        "output": output,
        "summary": json.loads(summaries[0].read_text()),
        "results": json.loads((run / "results.json").read_text()),
        "ledger": json.loads((run / "ledger.json").read_text()),
        "dir": run,
    }
