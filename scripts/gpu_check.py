"""The checks behind ``scripts/gpu-check.sh``: do FedMUD's GPU clients work on this machine?

    scripts/gpu-check.sh                                   # what to run (it finds or builds the environment)
    python scripts/gpu_check.py --out DIR [--parts steps,deployment,simulation] [--force-cpu]

Three parts, each a few PASS/FAIL lines:

- ``steps``: one SGD step of the dense and of the decomposed model (``fedmud.decompose`` with the
  defaults), timed in alternation on the GPU (each step ends with ``torch.cuda.synchronize``),
  for the paper's CNN, ResNet-18, a ViT (``scripts/step_time.py``'s models) and the built-in
  text Transformer, at batch 32 and 128: the ratio decomposed / dense of the median steps. Also
  that the factors a model on the GPU draws from a seed are bitwise the CPU's (what every
  client's digest rests on). A ratio above ``--max-ratio`` is a FAIL: more than launch overhead.
- ``deployment``: a real SuperLink and two SuperNodes on loopback, one on the GPU and one with
  ``CUDA_VISIBLE_DEVICES=""`` (so on the CPU); 3 rounds. Every round both replies are accepted
  with ``resync`` 0 in ``results.json``: both nodes reached the server's digest from the chain
  they were sent (a node that misses it asks for the full model, counted as a resync). Each
  node's log names the device it trained on.
- ``simulation``: ``flwr run`` in simulation, 2 clients sharing the GPU
  (``client-resources-num-gpus=0.5``), the smoke preset; every round both replies accepted,
  resync 0, and the ClientApps' log lines name the GPU.

Without CUDA it prints ``SKIP: <why>`` and exits 0, unless an NVIDIA GPU is present (then
torch failing to use it is a FAIL). ``--force-cpu`` runs every part on the CPU (no GPU asked
for, both nodes on the CPU, a few steps): the plumbing, checked where no GPU is.
Writes ``OUT/gpu-check.json`` (every check, the step timings, the runs' ``results.json`` rows)
and ``OUT/gpu-check-logs.tar.gz`` (the Flower processes' logs, the runs' results, ledger and summary).
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fedmud/ and bench/ when the project is not installed
import fedmud  # noqa: E402
from bench.superlink import (  # noqa: E402
    CONNECTION, TOKEN_VAR, PrivateSuperLink, free_port, processes_with_token, stop_group, stop_pids,
    superlink_command, wait_for_port,
)
from fedmud.models import TextTransformer  # noqa: E402
from fedmud.results import RoundResult, read_results, to_json  # noqa: E402
from fedmud.training import describe_device  # noqa: E402
from step_time import MODELS as IMAGE_MODELS, machine, summary, trainable  # noqa: E402  (this file's directory)

PARTS = ("steps", "deployment", "simulation")
BATCHES = (32, 128)
VOCAB, SEQ_LEN = 1000, 64  # the text Transformer's random token sequences
MODELS = {**IMAGE_MODELS, "text-transformer": (lambda: TextTransformer(VOCAB, SEQ_LEN, 10), (SEQ_LEN,))}


class Checks:
    """PASS/FAIL lines as they happen, and what the summary and the JSON say."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, ok: bool, name: str, detail: str) -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if not r["ok"]]


def gpu_hardware() -> str | None:
    """What shows an NVIDIA GPU is here (nvidia-smi on the PATH, a /dev/nvidiaN), or None."""
    smi = shutil.which("nvidia-smi")
    nodes = glob.glob("/dev/nvidia[0-9]*")
    return smi or (nodes[0] if nodes else None)


# ---------------------------------------------------------------------------------- steps
def batch_for(name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    if name == "text-transformer":
        x = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=g)
    else:
        x = torch.randn(batch, *MODELS[name][1], generator=g)
    return x.to(device), torch.randint(0, 10, (batch,), generator=g).to(device)


def step(model, optimizer, x, y, device: torch.device) -> tuple[float, float]:
    """One SGD step, synchronised on both sides: (wall seconds, loss)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item()


def check_steps(checks: Checks, device: torch.device, batches, warmup: int, steps: int, max_ratio: float) -> list[dict]:
    cases = []
    for name, (factory, _) in MODELS.items():
        try:
            torch.manual_seed(0)
            plain = factory()
            dense, twin = copy.deepcopy(plain).to(device), copy.deepcopy(plain)  # copies before decompose
            decomposed = fedmud.decompose(plain, fedmud.DecompositionConfig()).to(device)
            decomposed.reset(0)
            reference = fedmud.decompose(twin, fedmud.DecompositionConfig())  # on the CPU
            reference.reset(0)
            here, there = decomposed.state_dict(), reference.state_dict()
            same = here.keys() == there.keys() and all(torch.equal(here[k].cpu(), there[k]) for k in there)
            checks.record(same, f"factors {name}", f"{len(there)} tensors drawn on {device.type} "
                          + ("equal the CPU's bitwise" if same else "differ from the CPU's"))
            del reference, twin
        except Exception as err:  # a model that cannot even be built or moved: one FAIL, the others go on
            checks.record(False, f"steps {name}", f"{type(err).__name__}: {err}")
            continue
        runs = {"dense": (dense, torch.optim.SGD(trainable(dense), lr=1e-3)),
                "decomposed": (decomposed, torch.optim.SGD(trainable(decomposed), lr=1e-3))}
        for batch in batches:
            label = f"step {name} batch {batch}"
            try:
                case = time_case(runs, name, batch, device, warmup, steps)
            except Exception as err:
                checks.record(False, label, f"{type(err).__name__}: {err}")
                continue
            cases.append(case)
            ok = case["finite"] and case["ratio"] <= max_ratio
            checks.record(ok, label, f"dense {case['dense']['median_ms']:.2f} ms, decomposed "
                          f"{case['decomposed']['median_ms']:.2f} ms, decomposed/dense {case['ratio']:.2f}"
                          + ("" if case["finite"] else ", a loss is not finite")
                          + ("" if case["ratio"] <= max_ratio else f" (above {max_ratio})"))
        del runs, dense, decomposed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return cases


def time_case(runs: dict, name: str, batch: int, device: torch.device, warmup: int, steps: int) -> dict:
    """Warm-up steps of each, then timed steps in ABBA order (so drift reaches both alike)."""
    x, y = batch_for(name, batch, device)
    losses = []
    for model, optimizer in runs.values():
        losses += [step(model, optimizer, x, y, device)[1] for _ in range(warmup)]
    times: dict[str, list[float]] = {variant: [] for variant in runs}
    for i in range(steps):
        for variant in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            seconds, loss = step(*runs[variant], x, y, device)
            times[variant].append(seconds)
            losses.append(loss)
    case = {"model": name, "batch": batch, **{variant: summary(t) for variant, t in times.items()}}
    case["ratio"] = statistics.median(times["decomposed"]) / statistics.median(times["dense"])
    case["finite"] = all(math.isfinite(v) for v in losses)
    return case


# ---------------------------------------------------------------------------------- Flower runs
class Processes:
    """Flower processes of one part, each in its own process group and all carrying one token, so
    that every one of them, and whatever they start, is stopped by process id."""

    def __init__(self, work: Path, name: str) -> None:
        self.work, self.token, self.started = work, uuid.uuid4().hex, []
        self.home = work / f"{name}-flwr-home"
        self.home.mkdir(parents=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    TOKEN_VAR: self.token}

    def start(self, args: list[str], log: Path, port: int, env: dict | None = None) -> subprocess.Popen:
        with open(log, "a") as out:
            process = subprocess.Popen(args, cwd=ROOT, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append(process)
        wait_for_port(port, process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            stop_group(process)
        stop_pids(processes_with_token(self.token))


def flwr_run(env: dict, args: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """`flwr run . CONNECTION --stream ARGS`, its output to ``log``: (exit status or None on timeout, output)."""
    with open(log, "w") as out:
        process = subprocess.Popen(["flwr", "run", ".", CONNECTION, "--stream", *args], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        stop_group(process)
    return code, log.read_text(errors="replace")


def run_rows(run_dir: Path) -> list[RoundResult]:
    """The rows of the one run under ``run_dir``; none when it wrote no results.json."""
    results = sorted(run_dir.glob("*/results.json"))
    return read_results(results[0]) if results else []


def check_run(checks: Checks, part: str, code: int | None, output: str, rows: list[RoundResult], rounds: int) -> bool:
    """The run ended well and, every round, both replies were merged with no resync."""
    if code != 0:
        why = "timed out" if code is None else f"exited {code}"
        return checks.record(False, f"{part} run", f"flwr run {why}; its last lines:\n{output[-3000:]}")
    trained = [r for r in rows if r.round >= 1]
    bad = [r.round for r in trained if (r.accepted, r.resync, r.failed, r.rejected) != (2, 0, 0, 0)]
    ok = len(trained) == rounds and not bad
    counts = ", ".join(f"round {r.round}: accepted {r.accepted} resync {r.resync} failed {r.failed}" for r in trained)
    return checks.record(ok, f"{part} digest", f"{len(trained)} of {rounds} rounds; {counts or 'no rows'}"
                         + (" (both nodes reached the server's digest every round)" if ok else ""))


def device_lines(text: str) -> list[str]:
    return re.findall(r"training device: ([^\n]*)", text)


def check_device_line(checks: Checks, name: str, lines: list[str], want: str) -> None:
    """Every `training device:` line found starts with ``want`` ("CUDA" or "CPU"), and there is one."""
    ok = bool(lines) and all(line.startswith(want) for line in lines)
    checks.record(ok, name, f"trained on {want}: {lines[0]}" if ok else
                  f"expected every 'training device:' line to say {want}; found {lines or 'none'}")


def check_deployment(checks: Checks, work: Path, force_cpu: bool, timeout: float) -> list[dict]:
    """A SuperLink and two SuperNodes (partition 0 on the GPU, partition 1 on the CPU), 3 rounds.

    The nodes hold 2 of 50 partitions of mnist5k (80 examples each) and train one epoch a round:
    the check is about devices and digests, not training volume."""
    processes, run_dir, rounds = Processes(work, "deployment"), work / "deployment-runs", 3
    try:
        args, http_port, fleet_port = superlink_command(processes.home, work / "deployment.db", CONNECTION, False)
        processes.start(args, work / "deployment-superlink.log", http_port)
        for partition in (0, 1):
            env = dict(processes.env)
            if partition == 1 or force_cpu:
                env["CUDA_VISIBLE_DEVICES"] = ""  # torch sees no GPU: this node trains on the CPU
            port = free_port()
            processes.start(
                ["flower-supernode", "--insecure", "--grpc-rere", "--superlink", f"127.0.0.1:{fleet_port}",
                 "--node-config", f"partition-id={partition} num-partitions=50", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port)],
                work / f"deployment-supernode-{partition}.log", port, env,
            )
        config = f'num-server-rounds={rounds} local-epochs=1 round-timeout=120 run-dir="{run_dir}"'
        code, output = flwr_run(processes.env, ["-c", config], work / "deployment-flwr-run.log", timeout)
    except Exception as err:
        checks.record(False, "deployment run", f"{type(err).__name__}: {err}")
        return []
    finally:
        processes.stop()
    rows = run_rows(run_dir)
    if check_run(checks, "deployment", code, output, rows, rounds):
        for partition, want in ((0, "CPU" if force_cpu else "CUDA"), (1, "CPU")):
            log = (work / f"deployment-supernode-{partition}.log").read_text(errors="replace")
            check_device_line(checks, f"deployment node {partition}", device_lines(log), want)
    return json.loads(to_json(rows))  # for gpu-check.json, as results.json holds them


def check_simulation(checks: Checks, work: Path, force_cpu: bool, timeout: float) -> list[dict]:
    """`flwr run` in simulation: 2 clients, half a GPU each, the smoke preset."""
    gpus = 0.0 if force_cpu else 0.5
    if importlib.util.find_spec("ray") is None:
        checks.record(False, "simulation run", "ray is not installed (flwr[simulation]): Flower's simulation cannot start")
        return []
    superlink, run_dir = PrivateSuperLink(ROOT, work / "simulation-superlink.log"), work / "simulation-runs"
    try:
        superlink.start()
        federation = f"num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus={gpus}"
        smoke = tomllib.loads((ROOT / "configs/smoke.toml").read_text())  # flwr takes a file or key=values, not both
        config = " ".join(f"{key}={json.dumps(value)}" for key, value in {**smoke, "run-dir": str(run_dir)}.items())
        args = ["--federation-config", federation, "-c", config]
        code, output = flwr_run(superlink.env, args, work / "simulation-flwr-run.log", timeout)
    except Exception as err:
        checks.record(False, "simulation run", f"{type(err).__name__}: {err}")
        return []
    finally:
        superlink.close()
    rows = run_rows(run_dir)
    if check_run(checks, f"simulation (client-resources-num-gpus={gpus})", code, output, rows, 2):
        text = output + (work / "simulation-superlink.log").read_text(errors="replace")
        check_device_line(checks, "simulation clients", device_lines(text), "CPU" if force_cpu else "CUDA")
    return json.loads(to_json(rows))  # for gpu-check.json, as results.json holds them


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(env("OUT") or ROOT / "docs/perf/gpu-check"))
    parser.add_argument("--parts", default=env("GPU_CHECK_PARTS") or ",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)} (env GPU_CHECK_PARTS)")
    parser.add_argument("--force-cpu", action="store_true", default=env("GPU_CHECK_FORCE_CPU") == "1",
                        help="run every part on the CPU: the plumbing, where no GPU is (env GPU_CHECK_FORCE_CPU=1)")
    parser.add_argument("--max-ratio", type=float, default=float(env("GPU_CHECK_MAX_RATIO") or 5.0),
                        help="a decomposed/dense step ratio above this is a FAIL (default 5)")
    parser.add_argument("--timeout", type=float, default=float(env("GPU_CHECK_RUN_TIMEOUT") or 240),
                        help="seconds each flwr run may take (default 240)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        parser.error(f"--parts {','.join(args.parts)!r}: choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    device, line = describe_device()
    hardware = gpu_hardware()
    if device.type != "cuda" and not args.force_cpu and hardware is None:
        print(f"SKIP: no CUDA here: {line}", flush=True)
        return 0
    checks, result = Checks(), {"parts": args.parts, "force_cpu": args.force_cpu, "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda" or args.force_cpu:
        checks.record(True, "device", line + (" (--force-cpu: every part on the CPU)" if args.force_cpu else ""))
        run_parts(args, device, checks, result)
    else:
        checks.record(False, "device", f"an NVIDIA GPU is present ({hardware}) but torch trains on the {line}")
    result.update(checks=checks.rows, seconds=round(time.monotonic() - started, 1))
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
    failed = checks.failed
    verdict = f"FAIL ({len(failed)} of {len(checks.rows)}: {', '.join(failed)})" if failed else "PASS"
    print(f"SUMMARY: {verdict}; {len(checks.rows)} checks in {result['seconds']:.0f} s; "
          f"written to {args.out}/gpu-check.json", flush=True)
    return 1 if failed else 0


def run_parts(args: argparse.Namespace, device: torch.device, checks: Checks, result: dict) -> None:
    """The parts asked for, in order; the Flower processes' logs and results end in OUT/gpu-check-logs.tar.gz."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}", "torch_cuda": torch.version.cuda}
    if args.force_cpu:  # one thread per process: on a shared machine, more threads wait on each other
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = Path(tempfile.mkdtemp(prefix="fedmud-gpu-check-"))
    try:
        if "steps" in args.parts:
            batches, warmup, steps = ((8,), 1, 3) if args.force_cpu else (BATCHES, 5, 30)
            result["steps"] = check_steps(checks, device, batches, warmup, steps, args.max_ratio)
        if "deployment" in args.parts:
            result["deployment_rows"] = check_deployment(checks, work, args.force_cpu, args.timeout)
        if "simulation" in args.parts:
            result["simulation_rows"] = check_simulation(checks, work, args.force_cpu, args.timeout)
    finally:
        kept = sorted(work.glob("*.log")) + sorted(work.glob("*-runs/*/*.json"))
        if kept:
            with tarfile.open(args.out / "gpu-check-logs.tar.gz", "w:gz") as tar:
                for path in kept:
                    tar.add(path, arcname=f"gpu-check-logs/{path.relative_to(work)}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
