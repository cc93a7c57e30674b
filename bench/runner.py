"""One method = one ``flwr run . --stream`` on the private SuperLink; streamed output -> progress + log."""

from __future__ import annotations

import json
import queue
import re
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .superlink import PrivateSuperLink, stop_group
from .suites import Suite, render_overrides

ROUND_RE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
EVAL_RE = re.compile(
    r"round (\d+): accuracy (\S+) loss (\S+) \| up (\S+) MB down (\S+) MB \| cumulative up (\S+) MB down (\S+) MB"
)
CONFIG_ERROR_RE = re.compile(r"configuration error: .*")
ERROR_RE = re.compile(r"\bERROR\b.*|Traceback.*")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def flwr_command(suite: Suite, method: str, seed: int, directory: Path) -> list[str]:
    """The ``flwr run`` of one method and seed, its results written under ``directory``."""
    config = {**suite.run_config(method, seed), "run-dir": str(directory)}
    return [
        "flwr",
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={suite.supernodes} client-resources-num-cpus={suite.client_cpus:g}",
        "-c",
        render_overrides(config),
    ]


def shell_command(command: list[str]) -> str:
    """The command as one would type it (the env var is set on the bench's SuperLink too)."""
    return "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 " + " ".join(_quote(arg) for arg in command)


def _quote(arg: str) -> str:
    """``-c "method='fedavg' ..."`` rather than shlex's '\''-style quoting where that is safe."""
    quoted = shlex.quote(arg)
    if quoted != arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return quoted


def duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class Eta:
    """Estimates what is left from what has been seen: per-run overhead and seconds per round."""

    runs: int
    rounds: int
    overhead_s: float = 20.0  # start-up + report, until measured
    round_s: float = 9.0
    _overheads: list[float] = field(default_factory=list)
    _rounds: list[float] = field(default_factory=list)

    def saw_round(self, seconds: float) -> None:
        self._rounds.append(seconds)
        self.round_s = sum(self._rounds) / len(self._rounds)

    def saw_run(self, total_s: float, rounds_done: int) -> None:
        self._overheads.append(max(total_s - rounds_done * self.round_s, 0.0))
        self.overhead_s = sum(self._overheads) / len(self._overheads)

    def remaining(self, run_index: int, in_run_s: float) -> float:
        """Seconds left with run ``run_index`` (0-based) ``in_run_s`` seconds in."""
        per_run = self.overhead_s + self.rounds * self.round_s
        return max(per_run - in_run_s, 0.0) + (self.runs - run_index - 1) * per_run


def run_dir(out: Path, method: str, seed: int) -> Path:
    """Where one run writes its own results (under a timestamped directory of its own)."""
    return out / "raw" / method / f"seed-{seed}"


def log_path(out: Path, method: str, seed: int) -> Path:
    return out / "logs" / method / f"seed-{seed}.log"


@dataclass
class Outcome:
    method: str
    seed: int
    command: str
    status: str  # ok | failed | interrupted
    run_dir: Path | None = None
    error: str = ""
    seconds: float = 0.0


@dataclass
class Watch:
    """What is followed of one run while its output streams in."""

    index: int
    method: str
    seed: int
    start: float = field(default_factory=time.monotonic)
    errors: list[str] = field(default_factory=list)
    last_eval: float | None = None  # when the last evaluated round was seen
    rounds_done: int = 0
    timed_out: bool = False
    returncode: int | None = None


class Runner:
    """Runs the suite's (method, seed) runs one after another, printing one status line per round."""

    def __init__(
        self, suite: Suite, superlink: PrivateSuperLink, app_dir: Path, out: Path, run_timeout: float, echo=print
    ) -> None:
        self.suite = suite
        self.superlink = superlink
        self.app_dir = app_dir
        self.out = out
        self.run_timeout = run_timeout
        self.echo = echo
        self.started = time.monotonic()
        self.eta = Eta(runs=len(suite.runs), rounds=suite.rounds)
        self.current: subprocess.Popen | None = None

    def label(self, index: int, method: str, seed: int) -> str:
        """``[3/9 fedavg-int8]``, with the seed when the suite has several: ``[3/18 fedavg-int8 seed=1]``."""
        seed_text = f" seed={seed}" if len(self.suite.seeds) > 1 else ""
        return f"[{index + 1}/{len(self.suite.runs)} {method}{seed_text}]"

    def status(self, index: int, method: str, seed: int, text: str, in_run_s: float) -> None:
        elapsed = time.monotonic() - self.started
        eta = self.eta.remaining(index, in_run_s)
        self.echo(
            f"{self.label(index, method, seed)} {text} "
            f"| elapsed {duration(elapsed)}, ETA {duration(eta)}",
            flush=True,
        )

    def run(self, index: int, method: str, seed: int) -> Outcome:
        """One method's ``flwr run`` with ``seed``, followed line by line until it ends or times out."""
        directory = run_dir(self.out, method, seed)
        shutil.rmtree(directory, ignore_errors=True)  # this run's previous results in this out dir
        directory.mkdir(parents=True)
        command = flwr_command(self.suite, method, seed, directory)
        outcome = Outcome(method, seed, shell_command(command), "failed")
        watch = Watch(index, method, seed)
        self.status(index, method, seed, "starting", 0.0)
        self._follow(command, outcome.command, watch)
        outcome.seconds = time.monotonic() - watch.start
        self.eta.saw_run(outcome.seconds, watch.rounds_done)
        self._conclude(outcome, watch, directory)
        text = f"done in {duration(outcome.seconds)}" if outcome.status == "ok" else f"FAILED: {outcome.error}"
        self.status(index, method, seed, text, outcome.seconds)
        return outcome

    def _follow(self, command: list[str], shown: str, watch: Watch) -> None:
        """Start ``command``, log and read its output until it exits or ``run_timeout`` passes; then stop it."""
        path = log_path(self.out, watch.method, watch.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as log:
            log.write(f"$ {shown}\n")
            log.flush()
            self.current = process = self._start(command)
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
            reader.start()
            try:
                self._read(lines, log, watch)
                if watch.timed_out:
                    stop_group(process, grace=5.0)
                else:
                    process.wait()
            finally:
                if process.poll() is None:  # interrupted: stop this run's client
                    stop_group(process, grace=5.0)
                self.current = None
        watch.returncode = process.returncode

    def _start(self, command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            command,
            cwd=self.app_dir,
            env=self.superlink.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )

    def _read(self, lines: queue.Queue, log, watch: Watch) -> None:
        """Log every line and act on it, until the output ends or the run times out."""
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - watch.start > self.run_timeout:
                    watch.timed_out = True
                    return
                continue
            if line is None:
                return
            line = ANSI_RE.sub("", line)
            log.write(line)
            log.flush()
            self._on_line(line, watch)

    def _on_line(self, line: str, watch: Watch) -> None:
        """An evaluated round: progress line and ETA; an error line: kept for the outcome."""
        match = EVAL_RE.search(line)
        if not match:
            found = CONFIG_ERROR_RE.search(line) or ERROR_RE.search(line)
            if found:
                watch.errors.append(found.group(0).strip())
            return
        r = int(match.group(1))
        now = time.monotonic()
        if watch.last_eval is not None and r > 0:
            self.eta.saw_round(now - watch.last_eval)
        watch.last_eval, watch.rounds_done = now, r
        if r > 0:
            self.status(
                watch.index,
                watch.method,
                watch.seed,
                f"round {r}/{self.suite.rounds} acc {float(match.group(2)):.4f} "
                f"up {float(match.group(6)):.2f} MB down {float(match.group(7)):.2f} MB",
                now - watch.start,
            )

    def _conclude(self, outcome: Outcome, watch: Watch, directory: Path) -> None:
        """Status and error of a run that ended: a completed summary.json means it finished, whatever
        `flwr run` returned; a failed one says why."""
        summaries = [(path, json.loads(path.read_text())) for path in sorted(directory.glob("*/summary.json"))]
        results = [path for path, summary in summaries if summary.get("status", "completed") == "completed"]
        failed = [summary for _, summary in summaries if summary.get("status") == "failed"]
        if watch.timed_out:
            outcome.error = f"timed out after {duration(self.run_timeout)} (--run-timeout); the SuperLink was restarted"
            self.superlink.restart()  # the run goes on inside the SuperLink otherwise
        elif not results and failed:
            outcome.error = f"the run failed: {failed[-1].get('error', 'no reason given')}"
        elif not results:
            configuration = [e for e in watch.errors if e.startswith("configuration error")]
            reason = (configuration or watch.errors or ["no error in the log"])[0]
            outcome.error = (
                f"{reason}; `flwr run` exited with {watch.returncode}, no summary.json "
                f"(see {log_path(Path(), outcome.method, outcome.seed)})"
            )
        else:
            outcome.status, outcome.run_dir = "ok", results[-1].parent
            (outcome.run_dir / "checkpoint.pt").unlink(missing_ok=True)  # not needed to compare; large

    def stop_current(self) -> None:
        if self.current is not None:
            stop_group(self.current, grace=5.0)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)
