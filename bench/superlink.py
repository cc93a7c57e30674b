"""A private simulation SuperLink for the bench, started and stopped by process id.

Same approach as ``tests/conftest.py``: a ``flower-superlink --simulation`` on loopback,
free ports, a private ``FLWR_HOME`` whose default connection points at it, and
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` set when it starts. Every process
the bench starts carries ``FEDMUD_BENCH_TOKEN`` in its environment, so whatever they
start in turn (simulation, Ray workers) can be found and stopped by process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

TOKEN_VAR = "FEDMUD_BENCH_TOKEN"
CONNECTION = "fedmud-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and its process group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # children (simulation, Ray) may outlive the leader
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def processes_with_token(token: str) -> list[int]:
    """Process ids (not this one) whose environment carries ``TOKEN_VAR=token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or sig == signal.SIGKILL:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.2)
        pids = [p for p in alive if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stage_app(root: Path, into: Path) -> Path:
    """Copy the app at ``root`` as `flwr run` packages it into ``into``: the files git tracks or would
    track (``git ls-files --cached --others --exclude-standard``). Returns ``into``, or ``root`` itself
    where git cannot list it.

    `flwr run DIR` (Flower 1.39) resolves every file under DIR before it applies .gitignore: from a
    checkout holding its virtual environment that is ~50,000 files (`flwr build` there: 5 CPU-s); from
    the staged copy, a few hundred. Over a whole run the saving is within this machine's noise
    (``scripts/run_cost.py``: 40.4 / 43.4 CPU-s staged against 41.8 / 41.2 from the checkout).
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return root
    for name in filter(None, listed.decode().split("\0")):
        source = root / name
        if source.is_file() and not source.is_symlink():  # listed but deleted, or a link Flower skips
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def superlink_command(home: Path, database: Path, connection: str, simulation: bool) -> tuple[list[str], int, int]:
    """A loopback SuperLink on free ports, and ``home``'s default connection ``connection`` to it.

    Writes ``home/config.toml``; returns (command line, its HTTP port, its Fleet API port).
    """
    http_port, control_port, fleet_port, health_port = (free_port() for _ in range(4))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n\n'
        f'[superlink.{connection}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    args = [
        "flower-superlink",
        "--insecure",
        *(["--simulation"] if simulation else []),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--control-api-address",
        f"127.0.0.1:{control_port}",
        "--fleet-api-address",
        f"127.0.0.1:{fleet_port}",
        "--health-server-address",
        f"127.0.0.1:{health_port}",
        "--database",
        str(database),
    ]
    return args, http_port, fleet_port


class PrivateSuperLink:
    """One simulation SuperLink; ``env`` is the environment under which ``flwr run . --stream`` reaches it."""

    def __init__(self, app_dir: Path, log_path: Path) -> None:
        self.app_dir = app_dir
        self.log_path = log_path
        self.token = uuid.uuid4().hex
        self.workdir = Path(tempfile.mkdtemp(prefix="fedmud-bench-"))
        self.home = self.workdir / "flwr-home"
        self.home.mkdir()
        self.process: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            TOKEN_VAR: self.token,
        }

    def start(self) -> None:
        args, http_port, _ = superlink_command(self.home, self.workdir / "state.db", CONNECTION, simulation=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                args, cwd=self.app_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(http_port, self.process)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        """Stop the SuperLink, its process group and anything else carrying this bench's token."""
        if self.process is not None:
            stop_group(self.process)
        stop_pids(processes_with_token(self.token))

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
