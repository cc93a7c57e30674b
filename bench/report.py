"""What the bench writes: per-run CSV/JSON, summary.md/json, PNG plots, TensorBoard logs."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

from .metrics import COLUMNS, comm_seconds, enrich, run_summary
from .runner import Outcome
from .suites import BASELINE, METHODS, Suite


# ---------------------------------------------------------------------- per run
def load_run(outcome: Outcome, suite: Suite) -> dict:
    """A finished run's rows (with the bandwidth model's times) and summary line."""
    run_dir = outcome.run_dir
    results = json.loads((run_dir / "results.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    server_summary = json.loads((run_dir / "summary.json").read_text())
    rows = enrich(results, comm_seconds(ledger["records"], suite.up_mbps, suite.down_mbps))
    return {
        "method": outcome.method,
        "overrides": METHODS[outcome.method],
        "command": outcome.command,
        "run_dir": str(run_dir),
        "run_s": outcome.seconds,
        "dense_up_bytes_per_message": ledger["dense_up_bytes"],
        "dense_down_bytes_per_message": ledger["dense_down_bytes"],
        "summary": run_summary(rows, suite.target),
        "server_summary": server_summary,
        "rows": rows,
    }


def write_run(run: dict, out: Path) -> None:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"{run['method']}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(run["rows"])
    (runs / f"{run['method']}.json").write_text(_json(_portable(run)))


def _json(value) -> str:
    """Strict JSON: NaN/Inf (e.g. round 0's train loss) become null."""
    return json.dumps(_finite(value), indent=1, allow_nan=False)


def _portable(value, root: str | None = None):
    """``value`` with paths under the current directory made relative to it: results get committed,
    and a path of the machine that made them means nothing elsewhere."""
    root = root or str(Path.cwd()) + "/"
    if isinstance(value, str):
        return value.replace(root, "")
    if isinstance(value, dict):
        return {k: _portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v, root) for v in value]
    return value


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------- the machine
def machine() -> dict:
    info = {
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for package in ("flwr", "torch", "flwr-datasets"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational only
        info["gpu"] = None
    return info


# ---------------------------------------------------------------------- summary
def _mb(nbytes: float | None) -> str:
    return "not reached" if nbytes is None else f"{nbytes / 1e6:.3f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "—"
    ratio = value / reference
    return f"{ratio:.4f} (1/{1 / ratio:.1f})" if 0 < ratio < 1 else f"{ratio:.4f}"


def summarise(suite: Suite, runs: dict[str, dict], outcomes: list[Outcome], command: str, out: Path) -> dict:
    """Write summary.json and summary.md; returns the summary."""
    base = runs.get(BASELINE, {}).get("summary", {})
    methods = {}
    for name, run in runs.items():
        s = dict(run["summary"])
        s["up_to_target_vs_fedavg"] = (
            s["up_bytes_to_target"] / base["up_bytes_to_target"]
            if s["up_bytes_to_target"] is not None and base.get("up_bytes_to_target")
            else None
        )
        s["up_vs_fedavg"] = s["up_bytes"] / base["up_bytes"] if base.get("up_bytes") else None
        s["overrides"] = run["overrides"]
        s["command"] = run["command"]
        methods[name] = s
    summary = {
        "suite": suite.to_dict(),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "bandwidth_model": {
            "up_mbps": suite.up_mbps,
            "down_mbps": suite.down_mbps,
            "round_comm_s": "max over the round's clients of up_bytes*8/up_bps + down_bytes*8/down_bps",
        },
        "methods": methods,
        "failed": {
            o.method: {"status": o.status, "error": o.error, "command": o.command} for o in outcomes if o.status != "ok"
        },
    }
    summary = _portable(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(_json(summary))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    suite, m, target = summary["suite"], summary["machine"], summary["suite"]["target"]
    partition = suite["partition"] + (f" (α={suite['alpha']})" if suite["partition"] == "dirichlet" else "")
    extra = "".join(f", {k}={v}" for k, v in suite["extra"].items())
    epochs = f", local-epochs={suite['local_epochs']}" if suite["local_epochs"] is not None else ""
    model = f", model {suite['model']}" if suite.get("model") is not None else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    lines = [
        f"# Communication-cost benchmark: `{suite['name']}`",
        "",
        f"Made by `{summary['command']}` on {summary['date']}.",
        "",
        f"Machine: {m['cpu_cores']} CPU cores ({m['cpu_cores_usable']} usable, {m['cpu']}){gpu}, "
        f"{m.get('memory_gb', '?')} GB; Python {m['python']}, flwr {m.get('flwr')}, torch {m.get('torch')}.",
        "",
        f"Suite: {suite['dataset']}{model}, partition {partition}, {suite['supernodes']} clients "
        f"(all train every round), {suite['rounds']} rounds, seed={suite['seed']}, data-seed={suite['data_seed']}{epochs}{extra}; "
        "every other key at its `pyproject.toml` default; same data, partition and seeds for every method, "
        "one `flwr run` each through the same ServerApp/ClientApp in Flower's simulation.",
        "",
        f"Bandwidth model: every client has its own {suite['up_mbps']:g} Mbit/s up and {suite['down_mbps']:g} Mbit/s "
        "down link and clients transfer in parallel, so a round's comm time is the max over its clients of "
        "up bytes·8/up_bps + down bytes·8/down_bps (bytes from `ledger.json`, as Flower serialises them). "
        "Compute is the measured wall time per round on this machine (ServerApp clock, start-up excluded).",
        "",
    ]
    lines += table(summary)
    lines += [
        "",
        f"MB up to {target:g}: cumulative upload when accuracy first reached {target:g}, interpolated linearly in "
        "cumulative bytes between the two rounds that bracket it. vs FedAvg: that divided by FedAvg's. "
        f"Time to {target:g}: compute wall + modelled comm time, interpolated the same way. MB = 10^6 bytes.",
        "",
    ]
    if summary["failed"]:
        lines += ["## Failed", ""]
        lines += [f"- `{name}` ({f['status']}): {f['error']}" for name, f in summary["failed"].items()]
        lines.append("")
    lines += [
        "## Runs",
        "",
        "Each method is this command from the repository root, against the bench's own simulation SuperLink "
        "(a private `FLWR_HOME` whose default connection points at it; `run-dir` is where the bench read it from):",
        "",
    ]
    for name, s in summary["methods"].items():
        lines += [f"- `{name}`:", "  ```", f"  {s['command']}", "  ```"]
    for name, f in summary["failed"].items():
        lines += [f"- `{name}` (failed):", "  ```", f"  {f['command']}", "  ```"]
    lines += [
        "",
        "Files: `runs/<method>.csv|json` every round; `logs/<method>.log` each run's output; "
        "`raw/<method>/<timestamp>/` the run's own results.json, ledger.json, summary.json; "
        "`accuracy_vs_mb_up.png`, `accuracy_vs_round.png`, `label_distribution.png`; "
        "`tensorboard/<method>/` (`tensorboard --logdir tensorboard`).",
        "",
    ]
    return "\n".join(lines)


def table(summary: dict) -> list[str]:
    """The markdown table: one row per finished method."""
    target = summary["suite"]["target"]
    lines = [
        f"| method | final acc | best acc | MB up | MB down | MB up to {target:g} | vs FedAvg (to {target:g}) "
        f"| up vs FedAvg (total) | comm s/round | compute s/round | time to {target:g} (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["methods"].items():
        time_to = "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f}"
        lines.append(
            f"| {name} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | {s['up_bytes'] / 1e6:.3f} "
            f"| {s['down_bytes'] / 1e6:.3f} | {_mb(s['up_bytes_to_target'])} "
            f"| {_ratio(s['up_bytes_to_target'], _base(summary, 'up_bytes_to_target'))} "
            f"| {_ratio(s['up_bytes'], _base(summary, 'up_bytes'))} "
            f"| {s['comm_s_per_round']:.2f} | {s['compute_s_per_round']:.2f} | {time_to} |"
        )
    if not summary["methods"]:
        lines.append("| (no run finished) |" + " |" * 10)
    return lines


def _base(summary: dict, key: str):
    return summary["methods"].get(BASELINE, {}).get(key)


# ---------------------------------------------------------------------- plots
def plot_curves(runs: dict[str, dict], suite: Suite, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    model = f", {suite.model}" if suite.model is not None else ""
    title = f"{suite.dataset}{model}, {suite.partition}, {suite.supernodes} clients, {suite.rounds} rounds"
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in runs.items():
        rows = [r for r in run["rows"] if r["cum_up_bytes"] > 0]
        ax.plot([r["cum_up_bytes"] / 1e6 for r in rows], [r["accuracy"] for r in rows], marker="o", ms=3, label=name)
    ax.axhline(suite.target, color="grey", ls="--", lw=1, label=f"target {suite.target:g}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB uploaded (all clients, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy vs upload: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "accuracy_vs_mb_up.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in runs.items():
        ax.plot([r["round"] for r in run["rows"]], [r["accuracy"] for r in run["rows"]], marker="o", ms=3, label=name)
    ax.axhline(suite.target, color="grey", ls="--", lw=1, label=f"target {suite.target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy vs round: {title}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "accuracy_vs_round.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def partitioner(suite: Suite):
    """The fitted flwr-datasets partitioner of the suite's clients (the one the ClientApp loads from)."""
    from fedmud.config import parse_run_config
    from fedmud.data import partitioner_for

    return partitioner_for(parse_run_config(suite.run_config(BASELINE)).data)


def plot_partition(suite: Suite, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions

    partition = suite.partition + (f" α={suite.alpha:g}" if suite.partition == "dirichlet" else "")
    fig, _, _ = plot_label_distributions(
        partitioner(suite),
        label_name="label",
        plot_type="bar",
        size_unit="absolute",
        partition_id_axis="x",
        legend=True,
        verbose_labels=False,
        title=f"Label distribution per client: {suite.dataset}, {partition}, {suite.supernodes} clients",
    )
    path = out / "label_distribution.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- TensorBoard
def write_tensorboard(runs: dict[str, dict], out: Path) -> None:
    """tensorboard/<method>/: by round, and with cumulative uploaded bytes as the step."""
    from torch.utils.tensorboard import SummaryWriter

    root = out / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)  # a rerun would otherwise add a second event file
    for name, run in runs.items():
        writer = SummaryWriter(log_dir=str(root / name))
        for r in run["rows"]:
            step = r["round"]
            writer.add_scalar("by_round/accuracy", r["accuracy"], step)
            writer.add_scalar("by_round/loss", r["loss"], step)
            writer.add_scalar("by_round/cum_up_MB", r["cum_up_bytes"] / 1e6, step)
            writer.add_scalar("by_round/cum_down_MB", r["cum_down_bytes"] / 1e6, step)
            writer.add_scalar("by_round/est_time_s", r["est_time_s"], step)
            writer.add_scalar("by_up_bytes/accuracy", r["accuracy"], r["cum_up_bytes"])
            writer.add_scalar("by_up_bytes/loss", r["loss"], r["cum_up_bytes"])
            writer.add_scalar("by_total_bytes/accuracy", r["accuracy"], r["cum_up_bytes"] + r["cum_down_bytes"])
        writer.close()
