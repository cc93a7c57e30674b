"""Fixtures that start real Flower processes and stop them by process id."""

from __future__ import annotations

import os

# One thread per process, set before anything imports torch (the Flower processes the tests start
# inherit it): 4 workers and their SuperLinks, SuperNodes and ClientApps share 2 cores, and with
# PyTorch's default of a thread per core OpenMP's spinning threads starve each other: one in-process
# test took 16 s alone and 265 s in the suite.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit
import functools
import importlib.util
import ipaddress
import json
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.superlink import free_port, stage_app, superlink_command, wait_for_port
from bench.superlink import stop_group as stop_process_group

from .federation import as_server_app

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """A file of the repository that is not in a package (``scripts/x.py``, ``deploy/y.py``) as a module,
    by its path from the root; run a fresh copy each call."""
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SuperLink:
    """A real SuperLink process on loopback with a private FLWR_HOME whose connection "test" points at it.

    ``authenticated``: TLS and SuperNode authentication, as in a production deployment;
    each partition's SuperNode has its own registered key, so it keeps its node id when
    it restarts (without, a restarted SuperNode registers afresh under a new id).
    """

    def __init__(self, workdir: Path, simulation: bool, authenticated: bool = False) -> None:
        self.workdir = workdir
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        args, http_port, self.fleet_port = superlink_command(self.home, workdir / "state.db", "test", simulation)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.processes: list[subprocess.Popen] = []
        self.ca: Path | None = None
        if authenticated:
            self.ca, cert, key = write_tls_files(workdir / "tls")
            args = [a for a in args if a != "--insecure"]
            args += ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
            args += ["--enable-supernode-auth"]
            config = self.home / "config.toml"
            config.write_text(config.read_text().replace("insecure = true", f'root-certificates = "{self.ca}"'))
        self.start("superlink", args, http_port)

    def start(self, name: str, args: list[str], port: int) -> subprocess.Popen:
        """Start a Flower process in its own process group and wait until it listens on ``port``.

        Its output is appended to ``WORKDIR/NAME.log`` (a restarted SuperNode adds to its log)."""
        with open(self.workdir / f"{name}.log", "a") as log:
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
            *self._supernode_security(partition_id),
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

    def _supernode_security(self, partition_id: int) -> list[str]:
        if self.ca is None:
            return ["--insecure"]
        return ["--root-certificates", str(self.ca), "--auth-supernode-private-key", str(self._supernode_key(partition_id))]

    def _supernode_key(self, partition_id: int) -> Path:
        """The partition's SuperNode key, registered with the SuperLink (`flwr supernode register`) once."""
        key = self.workdir / "tls" / f"supernode-{partition_id}.key"
        if not key.exists():
            write_supernode_key(key)
            register = ["flwr", "supernode", "register", str(key.with_suffix(".pub")), "test"]
            result = subprocess.run(register, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
        return key

    def node_id(self, partition_id: int, timeout: float = 60) -> int:
        """The node id the SuperLink gave the partition's SuperNode when it (last) connected, from its log."""
        log = self.workdir / f"supernode-{partition_id}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = re.findall(r"SuperNode ID: (\d+)", log.read_text())
            if ids:
                return int(ids[-1])
            time.sleep(0.5)
        raise TimeoutError(f"supernode {partition_id} logged no node id within {timeout:.0f}s")

    def connections(self, partition_id: int) -> int:
        """How many times the partition's SuperNode has connected (once per start)."""
        return len(re.findall(r"SuperNode ID: \d+", (self.workdir / f"supernode-{partition_id}.log").read_text()))

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process_group(process)


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate for 127.0.0.1 it signed with its key: (CA, certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmud test CA")])
    ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
    host = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = _certificate(host, ca_name, key.public_key(), ca_key, is_ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key, is_ca: bool) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
    )
    if is_ca:
        usage = dict(digital_signature=False, key_cert_sign=True, crl_sign=True)
    else:
        usage = dict(digital_signature=True, key_cert_sign=False, crl_sign=False)
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    flags = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False)
    builder = builder.add_extension(
        x509.KeyUsage(**usage, **flags, encipher_only=False, decipher_only=False), critical=True
    )
    return builder.sign(signing_key, hashes.SHA256())


def write_supernode_key(path: Path) -> None:
    """A SuperNode's EC key pair in OpenSSH format, as `flower-supernode` and `flwr supernode register` read it."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )


@pytest.fixture(scope="module")
def simulation_superlink(tmp_path_factory):
    """A SuperLink in simulation mode; yields the environment under which `flwr run . test` reaches it."""
    superlink = SuperLink(tmp_path_factory.mktemp("simulation"), simulation=True)
    try:
        yield superlink.env
    finally:
        superlink.stop()


@functools.cache
def app_dir() -> Path:
    """The app as `flwr run .` packages it, staged once per test process (:func:`bench.superlink.stage_app`:
    Flower would otherwise resolve the virtual environment's ~50,000 files on every run; see there for
    what that costs)."""
    staged = Path(tempfile.mkdtemp(prefix="fedmud-app-"))
    atexit.register(shutil.rmtree, staged, ignore_errors=True)
    return stage_app(ROOT, staged)


def app_path(app: str) -> str:
    """``app`` (relative to the repository) as `flwr run` is given it: the repository is :func:`app_dir`."""
    return str(app_dir()) if Path(app) == Path(".") else app


def flwr_run(env: dict, *args: str, timeout: float = 600, app: str = ".") -> subprocess.CompletedProcess:
    """`flwr run APP test --stream ARGS` against the fixture's SuperLink (APP relative to the repository)."""
    return subprocess.run(
        ["flwr", "run", app_path(app), "test", "--stream", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def app_config(app: Path) -> dict:
    """The run config an app's ``pyproject.toml`` declares (``[tool.flwr.app.config]``)."""
    import tomllib

    return tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def assert_uploads_within_ratio(app: Path, ledger: dict, uploads: int) -> None:
    """The run's ``uploads`` uploads (ledger records) are each at most 1.05 x the dense upload x the app's ``ratio``."""
    num, _, den = str(app_config(app)["ratio"]).partition("/")
    ratio = float(num) / float(den or 1)
    sizes = [r["bytes"] for r in ledger["records"] if r["direction"] == "up"]
    assert len(sizes) == uploads
    assert max(sizes) <= 1.05 * ledger["dense_up_bytes"] * ratio


def finished_run(env: dict, run_dir: Path, run_config: str, supernodes: int = 3, app: str = ".") -> dict:
    """Run `flwr run` to its end with ``-c run_config run-dir=RUN_DIR``; asserts it succeeded and
    returns its output and what it wrote: summary, results, ledger, and its directory."""
    result = flwr_run(
        env,
        "--federation-config",
        f"num-supernodes={supernodes} client-resources-num-cpus=2",
        "-c",
        f'{run_config} run-dir="{run_dir}"',
        app=app,
    )
    output = result.stdout + result.stderr
    summaries = list(run_dir.glob("*/summary.json"))
    assert result.returncode == 0 and summaries, output[-4000:]
    run = summaries[0].parent
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "completed", summary
    return {
        "output": output,
        "summary": summary,
        "results": json.loads((run / "results.json").read_text()),
        "ledger": json.loads((run / "ledger.json").read_text()),
        "dir": run,
    }


@pytest.fixture
def task_identity():
    """Messages are made inside a run; give this process the identity a ServerApp would have."""
    with as_server_app():
        yield


# The files whose tests take longest (minutes: several `flwr run`s, SuperNode heartbeats), longest
# first. pytest-xdist (pyproject: 4 workers) hands its first tests out round-robin, so the long ones
# start early on different workers and the short tests fill the time they spend waiting, instead of
# the long ones starting last and running on alone (measured: 8 min 53 s against 10 min 39 s).
# Sending one test at a time (--maxschedchunk 1) with the slowest four first was slower (four
# simulations at once on 2 cores: over 11 min).
SLOW_FIRST = (
    "test_resume.py",
    "test_round_core.py",
    "test_deployment.py",
    "test_bench.py",
    "test_simulation.py",
    "test_privacy.py",
    "test_finetune.py",
    "test_full_downlink.py",
    "test_examples.py",
    "test_example_hf_text.py",
    "test_model_zoo.py",
    "test_stateless.py",
    "test_hf_models.py",
    "test_seeds.py",
    "test_round_exchange.py",
    "test_sampling.py",
    "test_secure_faults.py",
    "test_gpu_check.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: a file keeps its order
