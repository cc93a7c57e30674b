"""One method = one ``flwr run . --stream`` on the private SuperLink; streamed output -> progress + log."""

from __future__ import annotations

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


def flwr_command(suite: Suite, method: str, run_dir: Path) -> list[str]:
    config = {**suite.run_config(method), "run-dir": str(run_dir)}
    return [
        "flwr",
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={suite.supernodes}",
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


@dataclass
class Outcome:
    method: str
    command: str
    status: str  # ok | failed | interrupted
    run_dir: Path | None = None
    error: str = ""
    seconds: float = 0.0


class Runner:
    """Runs the suite's methods one after another, printing one status line per round."""

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
        self.eta = Eta(runs=len(suite.methods), rounds=suite.rounds)
        self.current: subprocess.Popen | None = None

    def status(self, index: int, method: str, text: str, in_run_s: float) -> None:
        elapsed = time.monotonic() - self.started
        eta = self.eta.remaining(index, in_run_s)
        self.echo(
            f"[{index + 1}/{len(self.suite.methods)} {method}] {text} "
            f"| elapsed {duration(elapsed)}, ETA {duration(eta)}",
            flush=True,
        )

    def run(self, index: int, method: str) -> Outcome:
        run_dir = self.out / "raw" / method
        shutil.rmtree(run_dir, ignore_errors=True)  # this method's previous results in this out dir
        run_dir.mkdir(parents=True)
        command = flwr_command(self.suite, method, run_dir)
        outcome = Outcome(method, shell_command(command), "failed")
        log_path = self.out / "logs" / f"{method}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        self.status(index, method, "starting", 0.0)
        errors: list[str] = []
        last_eval, rounds_done = None, 0
        with open(log_path, "w") as log:
            log.write(f"$ {outcome.command}\n")
            log.flush()
            self.current = process = subprocess.Popen(
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
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
            reader.start()
            timed_out = False
            try:
                while True:
                    try:
                        line = lines.get(timeout=1.0)
                    except queue.Empty:
                        if time.monotonic() - start > self.run_timeout:
                            timed_out = True
                            break
                        continue
                    if line is None:
                        break
                    line = ANSI_RE.sub("", line)
                    log.write(line)
                    log.flush()
                    match = EVAL_RE.search(line)
                    if match:
                        r = int(match.group(1))
                        now = time.monotonic()
                        if last_eval is not None and r > 0:
                            self.eta.saw_round(now - last_eval)
                        last_eval, rounds_done = now, r
                        if r > 0:
                            self.status(
                                index,
                                method,
                                f"round {r}/{self.suite.rounds} acc {float(match.group(2)):.4f} "
                                f"up {float(match.group(6)):.2f} MB down {float(match.group(7)):.2f} MB",
                                now - start,
                            )
                    else:
                        found = CONFIG_ERROR_RE.search(line) or ERROR_RE.search(line)
                        if found:
                            errors.append(found.group(0).strip())
                if timed_out:
                    stop_group(process, grace=5.0)
                else:
                    process.wait()
            finally:
                if process.poll() is None:  # interrupted: stop this run's client
                    stop_group(process, grace=5.0)
                self.current = None
        outcome.seconds = time.monotonic() - start
        self.eta.saw_run(outcome.seconds, rounds_done)
        results = sorted(run_dir.glob("*/summary.json"))
        if timed_out:
            outcome.error = f"timed out after {duration(self.run_timeout)} (--run-timeout); the SuperLink was restarted"
            self.superlink.restart()  # the run goes on inside the SuperLink otherwise
        elif not results:  # a run that wrote its summary finished, whatever `flwr run` returned
            configuration = [e for e in errors if e.startswith("configuration error")]
            reason = (configuration or errors or ["no error in the log"])[0]
            outcome.error = (
                f"{reason}; `flwr run` exited with {process.returncode}, no summary.json (see logs/{method}.log)"
            )
        else:
            outcome.status, outcome.run_dir = "ok", results[-1].parent
            (outcome.run_dir / "checkpoint.pt").unlink(missing_ok=True)  # not needed to compare; large
        text = f"done in {duration(outcome.seconds)}" if outcome.status == "ok" else f"FAILED: {outcome.error}"
        self.status(index, method, text, outcome.seconds)
        return outcome

    def stop_current(self) -> None:
        if self.current is not None:
            stop_group(self.current, grace=5.0)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)
