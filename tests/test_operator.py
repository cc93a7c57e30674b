"""What an operator's scripts rely on: a failed run says so (summary, exit status), the documented
command stops only this user's local SuperLink, and the shell scripts are safe under pipefail."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.superlink import free_port
from server.app import RunFailed, run_server

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "scripts" / "flwr-run.sh"


class DeadGrid:
    """A grid whose every call fails, as when the SuperLink goes away mid-run."""

    def __getattr__(self, name):
        raise ConnectionError(f"the grid is down ({name})")


def _summary(run_dir: Path) -> dict:
    summaries = list(run_dir.glob("*/summary.json"))
    assert len(summaries) == 1, summaries
    return json.loads(summaries[0].read_text())


# --- a run that stops on an error -----------------------------------------------------------


def test_a_configuration_error_raises_and_the_summary_says_failed_and_why(tmp_path):
    with pytest.raises(RunFailed, match=r"configuration error: pattern='xyz' is not allowed"):
        run_server(DeadGrid(), {"pattern": "xyz", "run-dir": str(tmp_path)})
    summary = _summary(tmp_path)
    assert summary["status"] == "failed"
    assert summary["error"] == "configuration error: pattern='xyz' is not allowed; choose one of ab, fab, aad"
    assert summary["last_round"] is None


def test_an_error_during_the_rounds_raises_and_the_summary_names_it_and_the_last_round(tmp_path):
    with pytest.raises(RunFailed, match=r"ConnectionError: the grid is down") as failed:
        run_server(DeadGrid(), {"run-dir": str(tmp_path), "num-server-rounds": 2, "local-epochs": 1})
    assert isinstance(failed.value.__cause__, ConnectionError)  # the traceback is kept
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["error"].startswith("ConnectionError: the grid is down")
    assert summary["last_round"] == 0 and summary["rounds"] == 2  # round 0 was evaluated, round 1 failed
    assert json.loads((tmp_path / Path(summary["run_dir"]).name / "results.json").read_text())[0]["round"] == 0


def test_a_failure_before_the_run_has_a_directory_never_writes_into_another_runs(tmp_path):
    for _ in range(3):  # within one second: three directories, one summary each
        with pytest.raises(RunFailed):
            run_server(DeadGrid(), {"pattern": "xyz", "run-dir": str(tmp_path)})
    assert len(list(tmp_path.glob("*/summary.json"))) == 3


# --- scripts/flwr-run.sh, with a stand-in `flwr` ----------------------------------------------

FAKE_FLWR = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_CALLS"
case $1 in
run) echo "Using SuperLink: x"; echo "Successfully started run 4242"; echo "INFO : log line"; exit "${FAKE_RUN_RC:-0}" ;;
ls) cat "$FAKE_LS" ;;
esac
"""


def _wrapper(tmp_path: Path, status: str, *args: str, run_rc: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "flwr").write_text(FAKE_FLWR)
    (bin_dir / "flwr").chmod(0o755)
    ls = {"runs": [{"run-id": "4242", "status": status, "status-details": "ServerApp failed with exception: boom"}]}
    (tmp_path / "ls.json").write_text(json.dumps(ls))
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_CALLS": str(calls),
        "FAKE_LS": str(tmp_path / "ls.json"),
        "FAKE_RUN_RC": str(run_rc),
    }
    result = subprocess.run([str(WRAPPER), *args], env=env, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines()


def test_flwr_run_sh_exits_0_for_a_completed_run_and_streams_its_log(tmp_path):
    result, calls = _wrapper(tmp_path, "finished:completed", ".", "-c", "num-server-rounds=1")
    assert result.returncode == 0, result.stderr
    assert "INFO : log line" in result.stdout and "run 4242 finished:completed" in result.stderr
    assert calls == ["run . -c num-server-rounds=1 --stream", "ls --run-id 4242 --format json"]


@pytest.mark.parametrize("status", ["finished:failed", "finished:stopped", "running"])
def test_flwr_run_sh_exits_1_with_the_runs_status_and_reason_otherwise(tmp_path, status):
    result, _ = _wrapper(tmp_path, status, ".")
    assert result.returncode == 1
    assert f"run 4242 {status}: ServerApp failed with exception: boom" in result.stderr


def test_flwr_run_sh_asks_the_superlink_the_run_went_to(tmp_path):
    args = (".", "--federation-config", "num-supernodes=2", "-c", "lr=0.1", "my-link")
    result, calls = _wrapper(tmp_path, "finished:completed", *args)
    assert result.returncode == 0, result.stderr
    assert calls[1] == "ls my-link --run-id 4242 --format json"


def test_flwr_run_sh_passes_on_flwr_runs_own_failure(tmp_path):
    result, calls = _wrapper(tmp_path, "finished:completed", ".", run_rc=2)
    assert result.returncode == 2 and "flwr run exited with 2" in result.stderr
    assert len(calls) == 1  # no `flwr ls`


# --- stopping the local SuperLink -------------------------------------------------------------

DOCS = (ROOT / "README.md", ROOT / "docs" / "deployment.md")
STOP = "scripts/stop-local-superlink.sh"


def _superlink_pids(marker: str) -> list[int]:
    """Process ids of `flower-superlink` processes whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "flower-superlink" in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_local_superlink(env: dict, marker: str) -> tuple[int, dict]:
    """The local SuperLink as `flwr run .` starts it (any `flwr` command on the ``:local:``
    connection does), on ports of its own; its process id and the environment that reaches it."""
    env = {**env, "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    result = subprocess.run(["flwr", "ls"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    pids = _superlink_pids(marker)
    assert len(pids) == 1, pids
    return pids[0], env


def test_the_documents_stop_the_local_superlink_with_the_script_and_no_process_by_name():
    for doc in DOCS:
        text = doc.read_text()
        assert STOP in text, doc
        assert not re.findall(r"`[^`]*\b(?:pkill|killall)\b[^`]*`", text), doc


@pytest.mark.integration
def test_the_stop_script_stops_this_users_local_superlink_by_its_id_and_no_other(tmp_path):
    # this user: the default Flower home, ~/.flwr; another user: a Flower home and port of their own
    home = tmp_path / "home"
    mine = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"} | {"HOME": str(home)}
    other = {**os.environ, "FLWR_HOME": str(tmp_path / "other-flwr-home")}
    started: list[int] = []
    try:
        mine_pid, mine = _start_local_superlink(mine, str(home / ".flwr"))
        started.append(mine_pid)
        other_pid, _ = _start_local_superlink(other, str(tmp_path / "other-flwr-home"))
        started.append(other_pid)
        stop = subprocess.run(["bash", STOP], cwd=ROOT, env=mine, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert f"(pid {mine_pid})" in stop.stderr
        assert not _alive(mine_pid) and _alive(other_pid)
        again = subprocess.run(["bash", STOP], cwd=ROOT, env=mine, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "no local SuperLink listens on port" in again.stderr
    finally:
        for pid in started:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if _alive(pid):
                    os.kill(pid, sig)
                    time.sleep(2)


def test_the_stop_script_leaves_a_process_that_is_not_a_superlink_on_the_port():
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]  # this test's own Python process holds the port
        env = {**os.environ, "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}
        stop = subprocess.run(["bash", STOP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 1 and "not a SuperLink of yours; not stopping it" in stop.stderr


# --- shell scripts under pipefail ----------------------------------------------------------

# a pipe into `grep` with -q, --quiet or --silent among its options (-qw, -E -q, ...)
PIPE_INTO_QUIET_GREP = re.compile(r"\|\s*grep(?:\s+-\S+)*?\s+(?:-[A-Za-z]*q[A-Za-z]*|--quiet|--silent)(?=\s|$)")


def _shell_scripts() -> list[Path]:
    return sorted(p for d in ("scripts", "deploy") for p in (ROOT / d).rglob("*.sh"))


def test_the_quiet_grep_check_catches_a_pipe():
    assert PIPE_INTO_QUIET_GREP.search('    if ip netns list | grep -qw -- "$ns"; then')
    assert PIPE_INTO_QUIET_GREP.search("x | grep --quiet y")
    assert PIPE_INTO_QUIET_GREP.search("x | grep -E -q 'a|b'")
    assert not PIPE_INTO_QUIET_GREP.search("x | grep -s y")  # -s is --no-messages
    assert not PIPE_INTO_QUIET_GREP.search('grep -qw -- "$1" <<<"$(ip netns list)"')
    assert not PIPE_INTO_QUIET_GREP.search("x | grep -c y || true")


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_script_pipes_into_a_quiet_grep(script):
    """Under pipefail `cmd | grep -q` fails at random: grep exits at the first match and `cmd`
    dies of SIGPIPE if it writes again. Read a file or a here-string instead. Every script is
    checked, with pipefail or not: a sourced one (deploy/smoke-lib.sh) runs under its caller's."""
    code = [line.split(" #", 1)[0] for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    offending = [f"{n}: {line.strip()}" for n, line in enumerate(code, 1) if PIPE_INTO_QUIET_GREP.search(line)]
    assert not offending, f"{script.relative_to(ROOT)} pipes into a quiet grep under pipefail: {offending}"
