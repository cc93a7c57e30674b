"""Pure functions of a finished run: bytes and time to a target accuracy, the bandwidth model."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from fedmud.results import RoundResult

# the columns of runs/<method>.csv, in order
COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "train_loss",
    "accepted",
    "up_bytes",
    "down_bytes",
    "cum_up_bytes",
    "cum_down_bytes",
    "dense_cum_up_bytes",
    "dense_cum_down_bytes",
    "wall_s",
    "compute_s",
    "comm_s",
    "cum_comm_s",
    "est_time_s",
)


def value_at_target(accuracies: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """``values`` where accuracy first reaches ``target``, linearly interpolated; None if never reached.

    Rows are in round order. If round ``i`` is the first with accuracy >= target, the
    result lies between ``values[i-1]`` and ``values[i]`` at the fraction of the way the
    accuracy went from ``accuracies[i-1]`` to ``target``. Already reached at the first
    row: ``values[0]``.
    """
    if len(accuracies) != len(values):
        raise ValueError("accuracies and values differ in length")
    for i, accuracy in enumerate(accuracies):
        if not accuracy >= target:  # NaN never reaches
            continue
        if i == 0:
            return float(values[0])
        before = accuracies[i - 1]
        frac = (target - before) / (accuracy - before) if math.isfinite(before) else 1.0
        return float(values[i - 1] + frac * (values[i] - values[i - 1]))
    return None


def bytes_to_target(rows: Sequence[Mapping], target: float, key: str = "cum_up_bytes") -> float | None:
    """Cumulative bytes (``key``) uploaded when the run first reached ``target`` accuracy, or None."""
    return value_at_target([r["accuracy"] for r in rows], [r[key] for r in rows], target)


def comm_seconds(records: Iterable[Mapping], up_mbps: float, down_mbps: float) -> dict[int, float]:
    """Estimated communication time of each round from a ledger's records.

    Every client has its own link (``up_mbps`` up, ``down_mbps`` down, megabits per
    second) and the clients transfer in parallel, so a round takes as long as its
    slowest client: max over clients of up_bytes*8/up_bps + down_bytes*8/down_bps.
    """
    if up_mbps <= 0 or down_mbps <= 0:
        raise ValueError("bandwidths must be > 0")
    per_client: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for record in records:
        slot = 0 if record["direction"] == "up" else 1
        per_client[int(record["round"])][str(record["client"])][slot] += int(record["bytes"])
    return {
        r: max(up * 8 / (up_mbps * 1e6) + down * 8 / (down_mbps * 1e6) for up, down in clients.values())
        for r, clients in per_client.items()
    }


def enrich(results: Sequence[RoundResult], comm: Mapping[int, float]) -> list[dict]:
    """Rows of ``runs/<method>.csv``: the run's results rows plus compute and modelled comm time.

    compute_s: measured wall time of the round (ServerApp clock, start-up excluded);
    comm_s: the bandwidth model's time of the round; est_time_s: wall_s + cumulative comm_s;
    train_loss is NaN and accepted empty for a round without them (round 0).
    """
    rows, previous_wall, cum_comm = [], 0.0, 0.0
    for r in results:
        wall = float(r.wall_s)
        comm_s = float(comm.get(r.round, 0.0))
        cum_comm += comm_s
        row = {
            "round": r.round,
            "accuracy": float(r.accuracy),
            "loss": float(r.loss),
            "train_loss": float("nan") if r.train_loss is None else float(r.train_loss),
            "accepted": "" if r.accepted is None else r.accepted,
            "up_bytes": r.up_bytes,
            "down_bytes": r.down_bytes,
            "cum_up_bytes": r.cum_up_bytes,
            "cum_down_bytes": r.cum_down_bytes,
            "dense_cum_up_bytes": r.dense_cum_up_bytes,
            "dense_cum_down_bytes": r.dense_cum_down_bytes,
            "wall_s": wall,
            "compute_s": wall - previous_wall,
            "comm_s": comm_s,
            "cum_comm_s": cum_comm,
            "est_time_s": wall + cum_comm,
        }
        previous_wall = wall
        rows.append(row)
    return rows


def run_summary(rows: Sequence[Mapping], target: float) -> dict:
    """One method's line of the summary (bytes in bytes, times in seconds; None = not reached)."""
    trained = [r for r in rows if r["round"] > 0]
    final = rows[-1]
    return {
        "rounds": final["round"],
        "final_accuracy": final["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "up_bytes": final["cum_up_bytes"],
        "down_bytes": final["cum_down_bytes"],
        "total_bytes": final["cum_up_bytes"] + final["cum_down_bytes"],
        "up_bytes_to_target": bytes_to_target(rows, target),
        "down_bytes_to_target": bytes_to_target(rows, target, "cum_down_bytes"),
        "total_bytes_to_target": value_at_target(
            [r["accuracy"] for r in rows], [r["cum_up_bytes"] + r["cum_down_bytes"] for r in rows], target
        ),
        "rounds_to_target": value_at_target([r["accuracy"] for r in rows], [r["round"] for r in rows], target),
        "time_to_target_s": bytes_to_target(rows, target, "est_time_s"),
        "comm_s_per_round": sum(r["comm_s"] for r in trained) / len(trained) if trained else 0.0,
        "compute_s_per_round": sum(r["compute_s"] for r in trained) / len(trained) if trained else 0.0,
        "wall_s": final["wall_s"],
        "comm_s": final["cum_comm_s"],
        "est_time_s": final["est_time_s"],
    }


# ---------------------------------------------------------------------- over seeds
# a run's summary keys averaged over every seed, and those averaged over the seeds that reached the target
PER_RUN = (
    "final_accuracy",
    "best_accuracy",
    "up_bytes",
    "down_bytes",
    "total_bytes",
    "dense_up_bytes",
    "dense_down_bytes",
    "comm_s_per_round",
    "compute_s_per_round",
    "wall_s",
    "comm_s",
    "est_time_s",
)
TO_TARGET = (
    "up_bytes_to_target",
    "down_bytes_to_target",
    "total_bytes_to_target",
    "rounds_to_target",
    "time_to_target_s",
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return float(mean), 0.0
    return float(mean), math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def over_seeds(per_seed: Mapping[int, Mapping]) -> dict:
    """One method's line of the summary from its runs' summaries (one per seed that finished).

    Every ``PER_RUN`` key becomes its mean, with ``<key>_std`` beside it. A ``TO_TARGET`` key
    is averaged over the seeds that reached the target (None when none did); ``reached``
    says how many. ``*_vs_dense``: the mean bytes over what dense FedAvg would have sent for
    the same messages (the ledger's dense equivalent), so 1/32 reads 0.03125.
    """
    if not per_seed:
        raise ValueError("no finished run")
    runs = list(per_seed.values())
    line: dict = {"seeds": sorted(per_seed), "finished": len(runs)}
    for key in PER_RUN:
        line[key], line[f"{key}_std"] = mean_std([float(run[key]) for run in runs])
    reached = [run for run in runs if run["up_bytes_to_target"] is not None]
    line["reached"] = len(reached)
    for key in TO_TARGET:
        values = [float(run[key]) for run in reached if run[key] is not None]
        line[key], line[f"{key}_std"] = mean_std(values) if values else (None, None)
    dense_total = line["dense_up_bytes"] + line["dense_down_bytes"]
    line["up_vs_dense"] = line["up_bytes"] / line["dense_up_bytes"] if line["dense_up_bytes"] else None
    line["down_vs_dense"] = line["down_bytes"] / line["dense_down_bytes"] if line["dense_down_bytes"] else None
    line["total_vs_dense"] = line["total_bytes"] / dense_total if dense_total else None
    return line


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The names of the non-dominated ``(cost, accuracy)`` points, by increasing cost.

    A point is dominated when another costs no more and is no less accurate, and is strictly
    better in one of the two; of identical points the first named is kept.
    """
    front: list[str] = []
    best = -math.inf
    for name, (_, accuracy) in sorted(points.items(), key=lambda item: (item[1][0], -item[1][1])):
        if accuracy > best:  # cheapest first: on the front iff more accurate than everything cheaper
            front.append(name)
            best = accuracy
    return front
