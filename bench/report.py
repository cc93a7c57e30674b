"""What the bench writes: per-run CSV/JSON, summary.md/json, PNG plots, TensorBoard logs."""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path

from fedmud.ledger import strict_json
from fedmud.results import read_results

from .metrics import COLUMNS, comm_seconds, enrich, mean_std, over_seeds, pareto_front, run_summary
from .runner import Outcome
from .suites import BASELINE, METHODS, Suite


# ---------------------------------------------------------------------- per run
def load_run(outcome: Outcome, suite: Suite) -> dict:
    """A finished run's rows (with the bandwidth model's times) and summary line.

    The summary adds the ledger's dense equivalent: what dense FedAvg would have sent for the
    same messages (``dense_up_bytes``, ``dense_down_bytes``).
    """
    run_dir = outcome.run_dir
    results = read_results(run_dir / "results.json")
    ledger = json.loads((run_dir / "ledger.json").read_text())
    server_summary = json.loads((run_dir / "summary.json").read_text())
    rows = enrich(results, comm_seconds(ledger["records"], suite.up_mbps, suite.down_mbps))
    summary = run_summary(rows, suite.target)
    summary["dense_up_bytes"] = ledger["dense_equivalent"]["up"]
    summary["dense_down_bytes"] = ledger["dense_equivalent"]["down"]
    return {
        "method": outcome.method,
        "seed": outcome.seed,
        "overrides": METHODS[outcome.method],
        "command": outcome.command,
        "run_dir": str(run_dir),
        "run_s": outcome.seconds,
        "dense_up_bytes_per_message": ledger["dense_up_bytes"],
        "dense_down_bytes_per_message": ledger["dense_down_bytes"],
        "summary": summary,
        "server_summary": server_summary,
        "rows": rows,
    }


def write_run(run: dict, out: Path) -> None:
    """runs/<method>/seed-<seed>.csv and .json."""
    runs = out / "runs" / run["method"]
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"seed-{run['seed']}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(run["rows"])
    (runs / f"seed-{run['seed']}.json").write_text(strict_json(_portable(run)))


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
def _mb(nbytes: float | None, std: float | None = None) -> str:
    if nbytes is None:
        return "not reached"
    return f"{nbytes / 1e6:.3f}" + ("" if not std else f" ± {std / 1e6:.3f}")


def _ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` as a fraction of the reference: 1/31.6, or 1.05× above it."""
    if value is None or not reference:
        return "—"
    ratio = value / reference
    if ratio <= 0:
        return f"{ratio:.4f}"
    return f"1/{1 / ratio:.1f}" if ratio < 0.9995 else f"{ratio:.2f}×"


def _accuracy(s: dict, key: str) -> str:
    return f"{s[key]:.4f}" + (f" ± {s[key + '_std']:.4f}" if s["finished"] > 1 else "")


def summarise(
    suite: Suite, runs: dict[str, dict[int, dict]], outcomes: list[Outcome], command: str, out: Path
) -> dict:
    """Write summary.json and summary.md; returns the summary.

    ``runs``: method -> seed -> finished run. A method's line holds the means over its
    finished seeds (see :func:`bench.metrics.over_seeds`), each run's own line under
    ``per_seed``, and ratios to the baseline's means (``*_vs_fedavg``, when it ran).
    """
    lines = {name: over_seeds({seed: run["summary"] for seed, run in by_seed.items()})
             for name, by_seed in runs.items() if by_seed}
    base = lines.get(BASELINE, {})
    methods = {}
    for name, line in lines.items():
        s = dict(line)
        for key in ("up_bytes", "down_bytes", "total_bytes", "up_bytes_to_target", "total_bytes_to_target"):
            s[key.replace("_bytes", "") + "_vs_fedavg"] = (
                s[key] / base[key] if s[key] is not None and base.get(key) else None
            )
        first = runs[name][min(runs[name])]
        s["overrides"] = first["overrides"]
        s["commands"] = {seed: run["command"] for seed, run in sorted(runs[name].items())}
        s["per_seed"] = {seed: run["summary"] for seed, run in sorted(runs[name].items())}
        methods[name] = s
    summary = {
        "suite": {**suite.to_dict(), "clients_per_round": suite.clients_per_round},
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "bandwidth_model": {
            "up_mbps": suite.up_mbps,
            "down_mbps": suite.down_mbps,
            "round_comm_s": "max over the round's clients of up_bytes*8/up_bps + down_bytes*8/down_bps",
        },
        "methods": methods,
        "pareto_front": pareto_front({name: (s["total_bytes"], s["final_accuracy"]) for name, s in methods.items()}),
        "failed": {
            f"{o.method}/seed-{o.seed}": {
                "method": o.method, "seed": o.seed, "status": o.status, "error": o.error, "command": o.command
            }
            for o in outcomes
            if o.status != "ok"
        },
    }
    summary = _portable(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(strict_json(summary))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    suite, m, target = summary["suite"], summary["machine"], summary["suite"]["target"]
    partition = suite["partition"] + (f" (α={suite['alpha']})" if suite["partition"] == "dirichlet" else "")
    extra = "".join(f", {k}={v}" for k, v in suite["extra"].items())
    training = "".join(
        f", {key}={suite[field]}"
        for field, key in (("local_epochs", "local-epochs"), ("batch_size", "batch-size"), ("lr", "lr"))
        if suite.get(field) is not None
    )
    model = f", model {suite['model']}" if suite.get("model") is not None else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    per_round = suite["clients_per_round"]
    clients = (
        f"{suite['supernodes']} clients (all train every round)"
        if per_round == suite["supernodes"]
        else f"{suite['supernodes']} clients, {per_round} drawn each round"
    )
    seeds = suite["seeds"]
    seeds_text = (
        f"seed={seeds[0]}"
        if len(seeds) == 1
        else f"seeds {', '.join(map(str, seeds))} (one run per method and seed; mean ± sample std over them)"
    )
    lines = [
        f"# Communication-cost benchmark: `{suite['name']}`",
        "",
        f"Made by `{summary['command']}` on {summary['date']}.",
        "",
        f"Machine: {m['cpu_cores']} CPU cores ({m['cpu_cores_usable']} usable, {m['cpu']}){gpu}, "
        f"{m.get('memory_gb', '?')} GB; Python {m['python']}, flwr {m.get('flwr')}, torch {m.get('torch')}.",
        "",
        f"Suite: {suite['dataset']}{model}, partition {partition}, {clients}, {suite['rounds']} rounds, "
        f"{seeds_text}, data-seed={suite['data_seed']}{training}{extra}; "
        "every other key at its `pyproject.toml` default; same data and partition for every method and seed, "
        "one `flwr run` each through the same ServerApp/ClientApp in Flower's simulation.",
        "",
        f"Bandwidth model: every client has its own {suite['up_mbps']:g} Mbit/s up and {suite['down_mbps']:g} Mbit/s "
        "down link and clients transfer in parallel, so a round's comm time is the max over its clients of "
        "up bytes·8/up_bps + down bytes·8/down_bps (bytes from `ledger.json`, as Flower serialises them). "
        "Compute is the measured wall time per round on this machine (ServerApp clock, start-up excluded).",
        "",
    ]
    lines += table(summary)
    front = summary.get("pareto_front", [])
    lines += [
        "",
        "MB = 10^6 bytes, summed over all clients and rounds; total = up + down. *vs dense*: over what dense "
        "FedAvg would have sent for the same messages (the ledger's dense equivalent: a float32 model each way). "
        "*vs FedAvg*: over the `fedavg` method's measured bytes in this suite.",
        "",
        f"To {target:g}: cumulative bytes when accuracy first reached {target:g}, interpolated linearly in "
        "cumulative bytes between the two rounds that bracket it; with several seeds, mean ± std over the seeds "
        "that reached it (*reached*: how many). Time: compute wall + modelled comm time, interpolated the same way.",
        "",
        "Pareto front (final accuracy against total MB, `pareto_accuracy_vs_total_bytes.png`): "
        + (", ".join(f"`{name}`" for name in front) if front else "(none)")
        + ".",
        "",
    ]
    lines += per_seed_table(summary)
    if summary["failed"]:
        lines += ["## Failed", ""]
        lines += [f"- `{name}` ({f['status']}): {f['error']}" for name, f in summary["failed"].items()]
        lines.append("")
    lines += [
        "## Runs",
        "",
        "Each run is this command from the repository root, against the bench's own simulation SuperLink "
        "(a private `FLWR_HOME` whose default connection points at it; `run-dir` is where the bench read it from):",
        "",
    ]
    for name, s in summary["methods"].items():
        for seed, command in s["commands"].items():
            lines += [f"- `{name}`, seed {seed}:", "  ```", f"  {command}", "  ```"]
    for name, f in summary["failed"].items():
        lines += [f"- `{name}` ({f['status']}):", "  ```", f"  {f['command']}", "  ```"]
    lines += [
        "",
        "Files: `runs/<method>/seed-<seed>.csv|json` every round; `logs/<method>/seed-<seed>.log` each run's "
        "output; `raw/<method>/seed-<seed>/<timestamp>/` the run's own results.json, ledger.json, summary.json; "
        "`accuracy_vs_mb_up.png`, `accuracy_vs_round.png` (mean over seeds, band ± std), "
        "`pareto_accuracy_vs_total_bytes.png`, `label_distribution.png`; "
        "`tensorboard/<method>/seed-<seed>/` (`tensorboard --logdir tensorboard`).",
        "",
    ]
    return "\n".join(lines)


def table(summary: dict) -> list[str]:
    """The markdown tables, one row per method with a finished run: what it cost in all, and to the target."""
    target = summary["suite"]["target"]
    lines = [
        "| method | seeds | final acc | best acc | MB up | up vs dense | up vs FedAvg | MB down | down vs dense "
        "| down vs FedAvg | MB total | total vs dense | total vs FedAvg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["methods"].items():
        lines.append(
            f"| {name} | {s['finished']} | {_accuracy(s, 'final_accuracy')} | {_accuracy(s, 'best_accuracy')} "
            f"| {_mb(s['up_bytes'])} | {_ratio(s['up_bytes'], s['dense_up_bytes'])} "
            f"| {_ratio(s['up_bytes'], _base(summary, 'up_bytes'))} "
            f"| {_mb(s['down_bytes'])} | {_ratio(s['down_bytes'], s['dense_down_bytes'])} "
            f"| {_ratio(s['down_bytes'], _base(summary, 'down_bytes'))} "
            f"| {_mb(s['total_bytes'])} | {_ratio(s['total_bytes'], s['dense_up_bytes'] + s['dense_down_bytes'])} "
            f"| {_ratio(s['total_bytes'], _base(summary, 'total_bytes'))} |"
        )
    if not summary["methods"]:
        lines.append("| (no run finished) |" + " |" * 12)
    lines += [
        "",
        f"| method | reached {target:g} | MB up to {target:g} | up vs FedAvg (to {target:g}) | MB total to {target:g} "
        f"| total vs FedAvg (to {target:g}) | time to {target:g} (s) | comm s/round | compute s/round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["methods"].items():
        time_to = "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f}"
        lines.append(
            f"| {name} | {s['reached']}/{s['finished']} "
            f"| {_mb(s['up_bytes_to_target'], s['up_bytes_to_target_std'])} "
            f"| {_ratio(s['up_bytes_to_target'], _base(summary, 'up_bytes_to_target'))} "
            f"| {_mb(s['total_bytes_to_target'], s['total_bytes_to_target_std'])} "
            f"| {_ratio(s['total_bytes_to_target'], _base(summary, 'total_bytes_to_target'))} "
            f"| {time_to} | {s['comm_s_per_round']:.2f} | {s['compute_s_per_round']:.2f} |"
        )
    if not summary["methods"]:
        lines.append("| (no run finished) |" + " |" * 8)
    return lines


def per_seed_table(summary: dict) -> list[str]:
    """Every run's own final accuracy and bytes to target (only with several seeds)."""
    if len(summary["suite"]["seeds"]) < 2 or not summary["methods"]:
        return []
    target = summary["suite"]["target"]
    lines = [
        "## Per seed",
        "",
        f"| method | seed | final acc | MB up | MB down | MB up to {target:g} | MB total to {target:g} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["methods"].items():
        for seed, r in s["per_seed"].items():
            lines.append(
                f"| {name} | {seed} | {r['final_accuracy']:.4f} | {_mb(r['up_bytes'])} | {_mb(r['down_bytes'])} "
                f"| {_mb(r['up_bytes_to_target'])} | {_mb(r['total_bytes_to_target'])} |"
            )
    return lines + [""]


def _base(summary: dict, key: str):
    return summary["methods"].get(BASELINE, {}).get(key)


# ---------------------------------------------------------------------- plots
def mean_curve(by_seed: dict[int, dict], key: str) -> tuple[list[float], list[float]]:
    """Per round, the mean and std over seeds of row ``key`` (rounds every seed has)."""
    rounds = min(len(run["rows"]) for run in by_seed.values())
    stats = [mean_std([float(run["rows"][i][key]) for run in by_seed.values()]) for i in range(rounds)]
    return [m for m, _ in stats], [s for _, s in stats]


def _title(suite: Suite) -> str:
    model = f", {suite.model}" if suite.model is not None else ""
    clients = (
        f"{suite.supernodes} clients"
        if suite.clients_per_round == suite.supernodes
        else f"{suite.clients_per_round} of {suite.supernodes} clients a round"
    )
    seeds = f", {len(suite.seeds)} seeds" if len(suite.seeds) > 1 else ""
    return f"{suite.dataset}{model}, {suite.partition}, {clients}, {suite.rounds} rounds{seeds}"


def plot_curves(runs: dict[str, dict[int, dict]], suite: Suite, out: Path) -> list[Path]:
    """Accuracy against cumulative MB uploaded and against round: the mean over seeds, a band of ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, xkey, xlabel, log in (
        ("accuracy_vs_mb_up.png", "cum_up_bytes", "cumulative MB uploaded (all clients, log scale)", True),
        ("accuracy_vs_round.png", "round", "round", False),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for method, by_seed in runs.items():
            if not by_seed:
                continue
            x, _ = mean_curve(by_seed, xkey)
            accuracy, std = mean_curve(by_seed, "accuracy")
            if xkey == "cum_up_bytes":
                x = [v / 1e6 for v in x]
            points = [(xi, a, s) for xi, a, s in zip(x, accuracy, std) if not log or xi > 0]
            xs, ys, ss = ([p[i] for p in points] for i in range(3))
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=method)
            if len(by_seed) > 1:
                ax.fill_between(xs, [y - e for y, e in zip(ys, ss)], [y + e for y, e in zip(ys, ss)],
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(suite.target, color="grey", ls="--", lw=1, label=f"target {suite.target:g}")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy" + (" (mean ± std over seeds)" if len(suite.seeds) > 1 else ""))
        what = "upload" if log else "round"
        ax.set_title(f"Accuracy vs {what}: {_title(suite)}", fontsize=10)
        ax.grid(True, which="both" if log else "major", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_pareto(summary: dict, suite: Suite, out: Path) -> Path:
    """Final accuracy (mean ± std over seeds) against total MB (up + down, log x); the front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    front = summary["pareto_front"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, s in methods.items():
        on_front = name in front
        ax.errorbar(
            s["total_bytes"] / 1e6,
            s["final_accuracy"],
            xerr=s["total_bytes_std"] / 1e6,
            yerr=s["final_accuracy_std"],
            fmt="o" if on_front else "s",
            ms=7 if on_front else 5,
            capsize=3,
            label=name,
        )
        ax.annotate(name, (s["total_bytes"] / 1e6, s["final_accuracy"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=7)
    if front:
        ax.plot([methods[n]["total_bytes"] / 1e6 for n in front], [methods[n]["final_accuracy"] for n in front],
                color="black", lw=1.2, ls="-", alpha=0.7, label="Pareto front", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("total MB sent, up + down (all clients, all rounds, log scale)")
    ax.set_ylabel("final test accuracy" + (" (mean ± std over seeds)" if len(suite.seeds) > 1 else ""))
    ax.set_title(f"Accuracy vs total bytes: {_title(suite)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "pareto_accuracy_vs_total_bytes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def partitioner(suite: Suite):
    """The fitted flwr-datasets partitioner of the suite's clients (the one the ClientApp loads from)."""
    from fedmud.config import parse_run_config
    from fedmud.data import partitioner_for

    return partitioner_for(parse_run_config(suite.run_config(BASELINE)).data)


MAX_CLIENTS_PLOTTED = 100  # a bar per client: more do not read


def plot_partition(suite: Suite, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions

    partition = suite.partition + (f" α={suite.alpha:g}" if suite.partition == "dirichlet" else "")
    shown = min(suite.supernodes, MAX_CLIENTS_PLOTTED)
    clients = f"{suite.supernodes} clients" + (f", the first {shown}" if shown < suite.supernodes else "")
    fig, _, _ = plot_label_distributions(
        partitioner(suite),
        label_name="label",
        plot_type="bar",
        size_unit="absolute",
        max_num_partitions=shown,
        partition_id_axis="x",
        legend=True,
        verbose_labels=False,
        title=f"Label distribution per client: {suite.dataset}, {partition}, {clients}",
    )
    path = out / "label_distribution.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- TensorBoard
def write_tensorboard(runs: dict[str, dict[int, dict]], out: Path) -> None:
    """tensorboard/<method>/seed-<seed>/: by round, and with cumulative uploaded bytes as the step."""
    from torch.utils.tensorboard import SummaryWriter

    root = out / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)  # a rerun would otherwise add a second event file
    for name, by_seed in runs.items():
        for seed, run in by_seed.items():
            writer = SummaryWriter(log_dir=str(root / name / f"seed-{seed}"))
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
