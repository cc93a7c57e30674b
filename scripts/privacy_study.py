"""Privacy-utility study (issue 13): accuracy against ε at δ = 1e-5, FedMUD with client-level DP
against FedAvg with client-level DP, on MNIST-5k.

    python scripts/privacy_study.py --docs docs     # the committed study (59 runs, ~75 min on 2 idle cores)
    python scripts/privacy_study.py --quick         # a smoke run of every stage (< 1 min)

The question: at equal (ε, δ), do decomposed updates buy accuracy? Under DP-FedAvg the server
adds N(0, σ²C²) to the sum of clipped updates and divides by q·N, so the noise on the mean update
has norm ≈ σC·√d/(qN) for an update of d values, while the signal (the mean of clipped updates)
is at most C whatever d is. FedMUD uploads d ≈ 12K values (1/32), FedAvg d ≈ 392K.

Setup (``COMMON``): the paper CNN on MNIST-5k (4,000 training images, 1,000 held out), IID over
N = 500 clients (8 images each), Poisson sampling at q = ``fraction-train`` = 0.2 (about 100
clients a round), 20 rounds, 2 local epochs of batch 4 (4 SGD steps, lr 0.1), full downlink,
``dp=server`` (Gaussian noise added by the server to the sum), δ = 1e-5, σ calibrated from the
target ε with ``dp-accounting``'s RDP accountant (``fedmud.privacy.calibrate``). Every run goes
through the apps' round logic in one process (``fedmud.rounds.simulate_in_process``: client clip,
server re-clip, weight 1, fixed denominator, the server's noise); only the transport is left out.

Stages, each with the same procedure for both methods:

1. ``norms``: 5 rounds with clipping and noise effectively off (C = 1e6, σ = 1e-9), pilot seed
   100: the median L2 norm m of the clients' unclipped updates (factor space for FedMUD).
2. ``pilot``: at the middle ε (8), pilot seed 100, C ∈ {1/8, 1/4, 1/2, 1}·m (2 significant
   digits); the C with the best mean accuracy over the last 5 rounds is the method's clip norm at
   ε = 8. At every other ε, C ∈ {1/2, 1, 2}× that choice, judged the same way: the best C moves
   with the noise (a step of at most C a round against noise ∝ σC), so each (method, ε) gets its
   own. Wherever the best C is a grid's smallest (largest), C/2 (2C) is tried too, up to twice.
3. ``main``: both methods at every ε in ``EPSILONS`` with their C, and without DP (``dp=off``:
   fixed-size sampling, weighted mean), seeds 0, 1, 2 (run seed s, data seed 42 + s, Poisson
   sampling from ``numpy.random.default_rng(s)``; the DP noise is OS entropy by design, so reruns
   differ by the noise only); and the small population the issue names, N = 50 at q = 0.2 (10
   clients a round, 80 images each), at ε = 8 with the C chosen at N = 500.

Each run records held-out accuracy after rounds 0..R, σ, ε recomputed from σ
(``fedmud.privacy.epsilon``), payload bytes per client per round, the clients' unclipped update
norms (median, fraction clipped) and per round the norm of the clipped mean update (the signal,
before noise) next to the noise's expected norm σC√d/(qN). Writes ``OUT/runs.json`` (resumable),
and with ``--docs``: ``DOCS/privacy/summary.json``, ``DOCS/privacy/tables.md`` and
``DOCS/privacy/privacy.png``. Runs two at a time (``--workers``), one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from bench.suites import FLOAT32_UP

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"fedmud": {"method": "fedmud", **FLOAT32_UP}, "fedavg": {"method": "fedavg"}}  # fedmud: kron, aad, 1/32, float32 uploads
COMMON = {
    "dataset": "mnist5k",
    "partition": "iid",
    "num-partitions": 500,
    "fraction-train": 0.2,
    "num-server-rounds": 20,
    "local-epochs": 2,
    "batch-size": 4,
    "lr": 0.1,
    "downlink": "full",
    "dp-delta": 1e-5,
}
EPSILONS = (2.0, 8.0, 32.0)
SEEDS = (0, 1, 2)
PILOT = {"seed": 100, "epsilon": 8.0, "norm_rounds": 5, "multiples": (0.125, 0.25, 0.5, 1.0), "around": (0.5, 1.0, 2.0),
         "last": 5, "extend": 2}
SMALL = {"num-partitions": 50, "epsilon": 8.0}  # the small-population reference
QUICK = {
    "common": {"num-partitions": 40, "num-server-rounds": 2, "local-epochs": 1, "batch-size": 32},
    "epsilons": (8.0,),
    "seeds": (0,),
    "pilot": {"seed": 100, "epsilon": 8.0, "norm_rounds": 1, "multiples": (0.5,), "around": (1.0,), "last": 1},
    "small": None,
}

# --- one run (in a worker process) ------------------------------------------------------------

_NORMS: list[float] = []  # each client's unclipped update norm, as privatise sees it
_SIGNAL: list[float] = []  # per round: the norm of the clipped mean update before noise


def _instrument() -> None:
    """Record what DP sees without changing it: wrap Mechanism.privatise (client side, the update
    before clipping) and Mechanism.release (server side, the sum before noise)."""
    import numpy as np

    from fedmud import privacy

    if getattr(privacy.Mechanism, "_study_instrumented", False):
        return
    privatise, release = privacy.Mechanism.privatise, privacy.Mechanism.release

    def recorded_privatise(self, update, rng=None):
        _NORMS.append(float(np.linalg.norm(np.asarray(update, dtype=np.float64))))
        return privatise(self, update, rng)

    def recorded_release(self, update_sum, population, rng=None):
        _SIGNAL.append(float(np.linalg.norm(update_sum)) / (self.rate * max(population, 1)))
        return release(self, update_sum, population, rng)

    privacy.Mechanism.privatise = recorded_privatise
    privacy.Mechanism.release = recorded_release
    privacy.Mechanism._study_instrumented = True


def run_config(job: dict) -> dict:
    """The Flower-style run config of ``job``."""
    config = {**job["common"], **METHODS[job["method"]], "seed": job["seed"], "data-seed": 42 + job["seed"]}
    if job["dp"] == "norms":  # clipping and noise effectively off: the updates' own norms
        config.update({"dp": "server", "dp-clip": 1e6, "dp-noise-multiplier": 1e-9})
    elif job["dp"] == "server":
        config.update({"dp": "server", "dp-clip": job["clip"], "dp-epsilon": job["epsilon"]})
    return config


def run_one(job: dict) -> dict:
    import numpy as np
    import torch

    from fedmud import privacy
    from fedmud.config import parse_run_config
    from fedmud.rounds import simulate_in_process

    torch.set_num_threads(1)
    _instrument()
    _NORMS.clear()
    _SIGNAL.clear()
    run = parse_run_config(run_config(job))
    started = time.monotonic()
    uploaded: list[int] = []  # per round: the payload bytes each sampled client sent
    bn: list[tuple[float, int, bool]] = []  # per round: smallest BatchNorm running variance, how many < 0, all finite

    def on_round(_: int, server) -> None:
        uploaded.append(server.codec.payload_nbytes)
        state = server.global_state()
        variances = [t.flatten() for name, t in state.items() if name.endswith("running_var")]
        finite = all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
        low = torch.cat(variances) if variances else torch.ones(1)
        bn.append((float(low.min()), int((low < 0).sum()), finite))

    server, history, _, _ = simulate_in_process(run, on_round=on_round, rng=np.random.default_rng(job["seed"]))
    seconds = time.monotonic() - started
    d = int(server.codec.layout.numel)
    population, q = run.data.num_partitions, run.fraction_train
    row = {
        **job,
        "accuracy": history,
        "final": history[-1],
        "last5": statistics.fmean(history[-5:]),
        "upload_numel": d,
        "upload_bytes_per_round": uploaded,  # payload bytes each sampled client sent, rounds 1..R
        "dense_numel": int(server.model.dense_reference_numel),
        "bn_var_min_per_round": [b[0] for b in bn],
        "bn_var_negative_per_round": [b[1] for b in bn],
        "finite_per_round": [b[2] for b in bn],
        "seconds": seconds,
    }
    if _NORMS:
        norms = np.asarray(_NORMS)
        row["norm_median"] = float(np.median(norms))
        row["norm_quantiles"] = [float(v) for v in np.quantile(norms, [0.1, 0.25, 0.75, 0.9])]
        row["clients_per_round"] = len(norms) / run.rounds
    if job["dp"] == "server":
        dp = server.dp
        row["sigma"] = dp.noise_multiplier
        row["epsilon_recomputed"] = privacy.epsilon(dp.noise_multiplier, q, run.rounds, dp.delta)
        row["clipped_fraction"] = float(np.mean(np.asarray(_NORMS) > dp.clip))
        row["signal_norm_per_round"] = list(_SIGNAL)  # ||sum of clipped updates|| / (qN), before noise
        row["noise_norm"] = dp.noise_multiplier * dp.clip * math.sqrt(d) / (q * population)  # expected
    return row


def key(row: dict) -> str:
    """A run's identity: everything that defines it."""
    fields = ("stage", "method", "dp", "epsilon", "clip", "seed")
    return json.dumps([row.get(f) for f in fields] + [sorted(row["common"].items())])


def run_jobs(jobs: list[dict], rows: list[dict], runs_path: Path, workers: int, started: float) -> list[dict]:
    """Run what ``rows`` lacks, two at a time; returns the rows of ``jobs``."""
    done = {key(r) for r in rows}
    todo = [j for j in jobs if key(j) not in done]
    print(f"{jobs[0]['stage']}: {len(jobs)} runs, {len(todo)} to do, {workers} at a time", flush=True)
    if todo:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for i, row in enumerate(pool.imap_unordered(run_one, todo), 1):
                rows.append(row)
                runs_path.write_text(json.dumps(rows))
                what = "no DP" if row["dp"] == "off" else ("norms" if row["dp"] == "norms" else
                                                           f"ε {row['epsilon']:g} C {row['clip']:g} σ {row['sigma']:.3f}")
                print(
                    f"[{i}/{len(todo)}] {row['stage']:6s} N={row['common']['num-partitions']} {row['method']:6s} "
                    f"{what:24s} seed {row['seed']} final {row['final']:.4f} last5 {row['last5']:.4f} "
                    f"({row['seconds']:.0f} s; {time.monotonic() - started:.0f} s in all)",
                    flush=True,
                )
    wanted = {key(j) for j in jobs}
    return [r for r in rows if key(r) in wanted]


# --- summary, tables, plot -----------------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(norm_rows: list[dict], pilot_rows: list[dict], main_rows: list[dict], clips: dict) -> dict:
    pilot = {}
    for method in METHODS:
        norms = [r for r in norm_rows if r["method"] == method]
        by_epsilon = {}
        for eps, chosen in sorted(clips[method].items()):
            grid = sorted((r for r in pilot_rows if r["method"] == method and r["epsilon"] == eps), key=lambda r: r["clip"])
            by_epsilon[f"eps={eps:g}"] = {
                "grid": [{"clip": r["clip"], "final": r["final"], "last5": r["last5"], "sigma": r["sigma"],
                          "clipped_fraction": r["clipped_fraction"]} for r in grid],
                "chosen_clip": chosen,
            }
        pilot[method] = {
            "median_update_norm": norms[0]["norm_median"] if norms else None,
            "update_norm_quantiles_10_25_75_90": norms[0]["norm_quantiles"] if norms else None,
            "by_epsilon": by_epsilon,
        }
    cells: dict = {}
    for row in main_rows:
        cells.setdefault((row["common"]["num-partitions"], row["method"], row["epsilon"]), []).append(row)
    results: dict = {}
    for (population, method, eps), group in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2] or math.inf)):
        group = sorted(group, key=lambda r: r["seed"])
        finals, last5 = [r["final"] for r in group], [r["last5"] for r in group]
        rounds = len(group[0]["accuracy"])
        entry = {
            "seeds": [r["seed"] for r in group],
            "final": finals,
            "final_mean": _mean_sd(finals)[0],
            "final_sd": _mean_sd(finals)[1],
            "last5_mean": _mean_sd(last5)[0],
            "last5_sd": _mean_sd(last5)[1],
            "accuracy_curve_mean": [statistics.fmean(r["accuracy"][i] for r in group) for i in range(rounds)],
            "upload_numel": group[0]["upload_numel"],
            "upload_bytes_per_client_round": group[0]["upload_bytes_per_round"][0],
            "dense_bytes_per_client_round": group[0]["dense_numel"] * 4,
            "norm_median": statistics.fmean(r["norm_median"] for r in group) if "norm_median" in group[0] else None,
            "seconds_mean": statistics.fmean(r["seconds"] for r in group),
            # seeds whose final model has a negative BatchNorm running variance / a non-finite value
            "runs_negative_bn_variance": sum(1 for r in group if r.get("bn_var_negative_per_round", [0])[-1] > 0),
            "runs_nonfinite": sum(1 for r in group if not r.get("finite_per_round", [True])[-1]),
            "bn_var_min_final_mean": (statistics.fmean(r["bn_var_min_per_round"][-1] for r in group)
                                      if all("bn_var_min_per_round" in r for r in group) else None),
        }
        if eps is not None:
            entry.update({
                "clip": group[0]["clip"],
                "sigma": group[0]["sigma"],
                "epsilon_recomputed": group[0]["epsilon_recomputed"],
                "clipped_fraction": statistics.fmean(r["clipped_fraction"] for r in group),
                "signal_norm_mean": statistics.fmean(statistics.fmean(r["signal_norm_per_round"]) for r in group),
                "noise_norm": group[0]["noise_norm"],
            })
            entry["noise_to_signal"] = entry["noise_norm"] / entry["signal_norm_mean"]
        label = "no-dp" if eps is None else f"eps={eps:g}"
        results.setdefault(f"N={population}", {}).setdefault(method, {})[label] = entry
    # FedMUD − FedAvg at each ε, paired by seed (same seed: same data split and client sampling)
    for population, methods in results.items():
        a, b = methods.get("fedmud", {}), methods.get("fedavg", {})
        for label in a:
            if label in b and a[label]["seeds"] == b[label]["seeds"]:
                diffs = [x - y for x, y in zip(a[label]["final"], b[label]["final"])]
                m, s = _mean_sd(diffs)
                methods.setdefault("fedmud_minus_fedavg", {})[label] = {"mean": m, "sd": s}
    return {"pilot": pilot, "results": results}


def _eps_order(label: str) -> float:
    return math.inf if label == "no-dp" else float(label.split("=")[1])


def tables(summary: dict, common: dict, pilot_spec: dict) -> list[str]:
    q, rounds = common["fraction-train"], common["num-server-rounds"]
    lines = [
        f"### Pilot: clip norm C per method and ε (seed {pilot_spec['seed']}, N = {common['num-partitions']}, q = {q:g}, "
        f"{rounds} rounds)",
        "",
        f"m: the median unclipped update norm over {pilot_spec['norm_rounds']} rounds without clipping or noise. At ε = "
        f"{pilot_spec['epsilon']:g} C ∈ {{{', '.join(f'{f:g}' for f in pilot_spec['multiples'])}}}·m; at every other ε "
        f"C ∈ {{{', '.join(f'{f:g}' for f in pilot_spec['around'])}}}× the choice at ε = {pilot_spec['epsilon']:g}; a best C "
        f"at an end of its grid extends the grid (halved or doubled, up to {pilot_spec.get('extend', 0)} times). Score: "
        f"mean accuracy over the last {pilot_spec['last']} rounds.",
        "",
        "| method | m (10%-90% of updates) | ε | C tried: mean accuracy of the last rounds (updates clipped) | chosen C |",
        "|---|---|---|---|---|",
    ]
    for method, p in summary["pilot"].items():
        qs = p["update_norm_quantiles_10_25_75_90"]
        for label, at in p["by_epsilon"].items():
            cells = "; ".join(f"C {g['clip']:g}: {g['last5']:.4f} ({100 * g['clipped_fraction']:.0f}%)" for g in at["grid"]) or "– (given)"
            lines.append(f"| {method} | {p['median_update_norm']:.3f} ({qs[0]:.2f}-{qs[3]:.2f}) | {_eps_order(label):g} | {cells} | "
                         f"**{at['chosen_clip']:g}** |")
    lines.append("")
    for population, methods in summary["results"].items():
        labels = sorted({lbl for m, c in methods.items() if m != "fedmud_minus_fedavg" for lbl in c}, key=_eps_order)
        lines += [
            f"### {population}, q = {q:g}, {rounds} rounds, δ = {common['dp-delta']:g}: held-out accuracy (mean ± sd over seeds)",
            "",
            "| method | ε (target) | σ | ε recomputed | C | final accuracy | mean of last 5 rounds | clipped | signal ‖mean‖ | noise ‖z‖/(qN) | noise/signal | BN var < 0 at the end (runs) | bytes up per client per round |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            for label in labels:
                e = methods.get(method, {}).get(label)
                if e is None:
                    continue
                if label == "no-dp":
                    dp = "∞ (no DP) | – | – | –"
                    extra = "– | – | – | –"
                else:
                    dp = f"{_eps_order(label):g} | {e['sigma']:.4f} | {e['epsilon_recomputed']:.3f} | {e['clip']:g}"
                    extra = (f"{100 * e['clipped_fraction']:.0f}% | {e['signal_norm_mean']:.4f} | {e['noise_norm']:.4f} | "
                             f"{e['noise_to_signal']:.2f}")
                lines.append(
                    f"| {method} | {dp} | {e['final_mean']:.4f} ± {e['final_sd']:.4f} | {e['last5_mean']:.4f} ± {e['last5_sd']:.4f} | "
                    f"{extra} | {e['runs_negative_bn_variance']}/{len(e['seeds'])} | {e['upload_bytes_per_client_round']:,} |"
                )
        gaps = methods.get("fedmud_minus_fedavg", {})
        if gaps:
            lines += ["", "FedMUD − FedAvg, final accuracy, paired by seed: " + "; ".join(
                f"{'no DP' if lbl == 'no-dp' else 'ε ' + lbl.split('=')[1]}: {g['mean']:+.4f} ± {g['sd']:.4f}"
                for lbl, g in sorted(gaps.items(), key=lambda kv: _eps_order(kv[0])))]
        lines.append("")
    return lines


def geometry_table(summary: dict) -> list[str]:
    lines = [
        "### Where the noise lands: the upload space against the weights (round 1, seed 0)",
        "",
        "The server's noise is isotropic in the upload space; the weights move by J·(update). Gains are ‖J·x‖/‖x‖.",
        "",
        "| method | upload values d | noise gain (isotropic z) | weight-space noise energy d·gain² | signal gain, one client's update | signal gain, mean of 8 |",
        "|---|---|---|---|---|---|",
    ]
    for method, g in summary.get("geometry", {}).items():
        lines.append(f"| {method} | {g['upload_numel']:,} | {g['noise_gain']:.3f} | {g['weight_space_noise_energy_per_unit']:,.0f} | "
                     f"{g['signal_gain_per_client']:.3f} | {g['signal_gain_of_mean']:.3f} |")
    return lines + [""]


def plot(summary: dict, common: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fedmud": "tab:blue", "fedavg": "tab:orange"}
    big = f"N={common['num-partitions']}"
    results = summary["results"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for method, colour in colours.items():
        cells = results.get(big, {}).get(method, {})
        pts = sorted((_eps_order(lbl), e) for lbl, e in cells.items() if lbl != "no-dp")
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1]["final_mean"] for p in pts], yerr=[p[1]["final_sd"] for p in pts],
                        marker="o", capsize=3, color=colour, label=f"{method} + DP, {big}")
        ref = cells.get("no-dp")
        if ref:
            ax.axhline(ref["final_mean"], color=colour, ls="--", lw=1, label=f"{method}, no DP ({ref['final_mean']:.3f})")
            ax.axhspan(ref["final_mean"] - ref["final_sd"], ref["final_mean"] + ref["final_sd"], color=colour, alpha=0.1)
        for population, methods in results.items():
            if population == big:
                continue
            for lbl, e in methods.get(method, {}).items():
                if lbl != "no-dp":
                    nudge = 0.95 if method == "fedmud" else 1.05  # the two methods' points side by side
                    ax.errorbar([_eps_order(lbl) * nudge], [e["final_mean"]], yerr=[e["final_sd"]], marker="s", mfc="none",
                                capsize=3, color=colour, ls="none", label=f"{method} + DP, {population}")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance (0.1)")
    ax.set_xscale("log", base=2)
    ticks = sorted({_eps_order(lbl) for methods in results.values() for cells in methods.values() for lbl in cells} - {math.inf})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    if ticks:
        ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
    ax.set_xlabel(f"ε at δ = {common['dp-delta']:g} after {common['num-server-rounds']} rounds")
    seeds = len(next(iter(results.get(big, {}).get("fedmud", {}).values()), {"seeds": []})["seeds"])
    ax.set_ylabel(f"final held-out accuracy (mean ± sd, {seeds} seeds)")
    ax.set_title(f"MNIST-5k, paper CNN, q = {common['fraction-train']:g}, client-level DP-FedAvg", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    styles = ["-", "--", "-.", ":"]
    for method, colour in colours.items():
        cells = results.get(big, {}).get(method, {})
        for style, lbl in zip(styles, sorted(cells, key=_eps_order)):
            curve = cells[lbl]["accuracy_curve_mean"]
            ax2.plot(range(len(curve)), curve, ls=style, color=colour,
                     label=f"{method}, {'no DP' if lbl == 'no-dp' else 'ε ' + lbl.split('=')[1]}")
    ax2.set_xlabel("round")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_ylabel("held-out accuracy (mean over seeds)")
    ax2.set_title(f"{big}: accuracy per round", fontsize=9)
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pilot(scale: dict, multiples: tuple, epsilon: float, common: dict, spec: dict, rows: list[dict], runs_path: Path,
          workers: int, started: float):
    """Each method's clip norm at ``epsilon``: the grid ``multiples`` × ``scale[method]`` (2 significant
    digits), judged by the mean accuracy of the last ``spec['last']`` rounds on the pilot seed; while a
    method's best C is at an end of its grid, the grid goes on past that end (C halved or doubled, at
    most ``spec['extend']`` times), so no method's choice is cut off by the grid. Returns (rows, clips)."""
    factors = {m: sorted(multiples) for m in METHODS}
    job = lambda m, f: {"stage": "pilot", "method": m, "dp": "server", "epsilon": epsilon,  # noqa: E731
                        "clip": _two_digits(f * scale[m]), "seed": spec["seed"], "common": common}
    score = lambda r: (statistics.fmean(r["accuracy"][-spec["last"]:]), -r["clip"])  # noqa: E731 (ties: smaller C)
    jobs = [job(m, f) for m in METHODS for f in factors[m]]
    for extension in range(spec.get("extend", 0) + 1):
        pilot_rows = run_jobs(jobs, rows, runs_path, workers, started)
        clips = {m: max((r for r in pilot_rows if r["method"] == m), key=score)["clip"] for m in METHODS}
        more = []
        for m in METHODS:
            grid = sorted({r["clip"] for r in pilot_rows if r["method"] == m})
            if len(grid) > 1 and clips[m] == grid[0]:
                factors[m].insert(0, factors[m][0] / 2)
                more.append(job(m, factors[m][0]))
            elif len(grid) > 1 and clips[m] == grid[-1]:
                factors[m].append(factors[m][-1] * 2)
                more.append(job(m, factors[m][-1]))
        if not more or extension == spec.get("extend", 0):
            break
        print(f"pilot ε {epsilon:g}: best C at the end of the grid for {', '.join(j['method'] for j in more)}; extending",
              flush=True)
        jobs += more
    return pilot_rows, clips


def accounting(common: dict, epsilons: tuple) -> dict:
    """For each target ε: σ (``fedmud.privacy.calibrate``), ε recomputed with the system's RDP
    accountant, and ε from dp-accounting's PLD accountant for the same σ (tighter: RDP's
    conversion to (ε, δ) is an upper bound)."""
    import dp_accounting

    from fedmud import privacy

    q, rounds, delta = common["fraction-train"], common["num-server-rounds"], common["dp-delta"]
    out = {}
    for e in epsilons:
        sigma = privacy.calibrate(e, q, rounds, delta)
        pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
        pld.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds))
        out[f"eps={e:g}"] = {"sigma": sigma, "epsilon_rdp": privacy.epsilon(sigma, q, rounds, delta),
                             "epsilon_pld": float(pld.get_epsilon(delta))}
    return out


def accounting_table(summary: dict, common: dict) -> list[str]:
    lines = [
        f"### Accounting: q = {common['fraction-train']:g}, {common['num-server-rounds']} rounds, δ = {common['dp-delta']:g}",
        "",
        "| target ε | σ (calibrated, RDP) | ε recomputed (RDP, the system's) | ε for the same σ (PLD accountant) |",
        "|---|---|---|---|",
    ]
    for label, a in summary.get("accounting", {}).items():
        lines.append(f"| {_eps_order(label):g} | {a['sigma']:.4f} | {a['epsilon_rdp']:.3f} | {a['epsilon_pld']:.3f} |")
    return lines + [""]


def geometry(method: str, common: dict, clients: int = 8, draws: int = 4) -> dict:
    """How the upload space maps onto the weights, at round 1 of seed 0: the noise the server adds
    lives in the upload space, the model feels it as a change of W. For an update u of the upload
    (factor space for FedMUD) the weights move by J·u (J linear for ``aad``); reports ‖J·z‖/‖z‖ for
    isotropic z (the noise's gain: √(‖J‖²_F / d)) and ‖J·u‖/‖u‖ for the first ``clients``
    partitions' real, unclipped updates and for their mean (the signal's gain). FedAvg's J is the
    identity."""
    import numpy as np
    import torch

    from fedmud.config import parse_run_config
    from fedmud.data import client_loader
    from fedmud.rounds import ClientModel, ServerModel
    from fedmud.seeds import round_seed
    from fedmud.sync import FULL, Downlink

    torch.set_num_threads(1)
    run = parse_run_config({**common, **METHODS[method], "seed": 0, "data-seed": 42})
    server, client = ServerModel(run), ClientModel(run, torch.device("cpu"))
    seed = round_seed(run.seed, 1)
    reference = server.reference(seed).astype(np.float64)
    before = {n: t.clone() for n, t in server.global_state().items()}
    client.sync(None, server.downlink(Downlink(FULL, 0), 1))

    def moved(u: np.ndarray) -> float:  # ‖ΔW‖ over every floating tensor when the upload is reference + u
        server.load(0, before)
        server.model.reset(seed)
        server.model.load_uploaded_state(server.codec.layout.unflatten((reference + u).astype(np.float32)))
        server.model.merge()
        after = server.global_state()
        return float(torch.cat([(after[n].double() - before[n].double()).flatten()
                                for n in before if before[n].is_floating_point()]).norm())

    rng = np.random.default_rng(0)
    noise = [moved(z / np.linalg.norm(z)) for z in rng.normal(size=(draws, reference.size))]
    updates = []
    for pid in range(clients):
        parts, _, _ = client.train_round(seed, client_loader(run.data, pid, run.train.batch_size, seed=seed + pid))
        updates.append(client.upload_update(seed, parts))
    signal = [moved(u) / np.linalg.norm(u) for u in updates]
    mean = np.mean(updates, axis=0)
    server.load(0, before)
    return {
        "upload_numel": int(reference.size),
        "noise_gain": statistics.fmean(noise),
        "signal_gain_per_client": statistics.fmean(signal),
        "signal_gain_of_mean": moved(mean) / float(np.linalg.norm(mean)),
        "weight_space_noise_energy_per_unit": int(reference.size) * statistics.fmean(noise) ** 2,
    }


def _two_digits(x: float) -> float:
    return float(f"{x:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default=None, help="target ε values (default: 2,8,32)")
    parser.add_argument("--seeds", default=None, help="default: 0,1,2")
    parser.add_argument("--clips", default=None, help="skip the pilot: fedmud=C,fedavg=C")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage: N=40, 2 rounds, 1 seed, ε 8")
    parser.add_argument("--out", type=Path, default=None, help="runs.json goes here (default: results/privacy[-quick])")
    parser.add_argument("--docs", type=Path, default=None, help="write DOCS/privacy/{summary.json,tables.md,privacy.png}")
    args = parser.parse_args()
    common, epsilons, seeds, pilot_spec, small = dict(COMMON), EPSILONS, SEEDS, dict(PILOT), dict(SMALL)
    if args.quick:
        common.update(QUICK["common"])
        epsilons, seeds, pilot_spec, small = QUICK["epsilons"], QUICK["seeds"], dict(QUICK["pilot"]), QUICK["small"]
    if args.epsilons:
        epsilons = tuple(float(v) for v in args.epsilons.split(","))
    if args.seeds:
        seeds = tuple(int(v) for v in args.seeds.split(","))
    out = args.out or ROOT / "results" / ("privacy-quick" if args.quick else "privacy")
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    rows = json.loads(runs_path.read_text()) if runs_path.exists() else []
    started = time.monotonic()
    base = {"epsilon": None, "clip": None}

    # 1. the updates' own norms, 2. the clip norm per method
    norm_common = {**common, "num-server-rounds": pilot_spec["norm_rounds"]}
    norm_rows = run_jobs(
        [{**base, "stage": "norms", "method": m, "dp": "norms", "seed": pilot_spec["seed"], "common": norm_common} for m in METHODS],
        rows, runs_path, args.workers, started,
    )
    medians = {r["method"]: r["norm_median"] for r in norm_rows}
    pilot_rows: list[dict] = []
    if args.clips:  # the same C at every ε
        given = {k: float(v) for k, v in (item.split("=") for item in args.clips.split(","))}
        clips = {m: {e: given[m] for e in {*epsilons, pilot_spec["epsilon"]}} for m in METHODS}
    else:  # at the pilot's ε from the median norm; at every other ε around that choice
        rows8, chosen = pilot(medians, pilot_spec["multiples"], pilot_spec["epsilon"], common, pilot_spec, rows, runs_path,
                              args.workers, started)
        pilot_rows += rows8
        clips = {m: {pilot_spec["epsilon"]: chosen[m]} for m in METHODS}
        for e in epsilons:
            if e != pilot_spec["epsilon"]:
                rows_e, chosen_e = pilot(chosen, pilot_spec["around"], e, common, pilot_spec, rows, runs_path, args.workers, started)
                pilot_rows += rows_e
                for m in METHODS:
                    clips[m][e] = chosen_e[m]
    print(f"chosen clip norms: {clips} (median update norms {medians})", flush=True)

    # 3. the study
    jobs = [{**base, "stage": "main", "method": m, "dp": "off", "seed": s, "common": common} for m in METHODS for s in seeds]
    jobs += [{"stage": "main", "method": m, "dp": "server", "epsilon": e, "clip": clips[m][e], "seed": s, "common": common}
             for e in epsilons for m in METHODS for s in seeds]
    if small:
        small_common = {**common, "num-partitions": small["num-partitions"]}
        jobs += [{"stage": "main", "method": m, "dp": "server", "epsilon": small["epsilon"], "clip": clips[m][small["epsilon"]], "seed": s,
                  "common": small_common} for m in METHODS for s in seeds]
    main_rows = run_jobs(jobs, rows, runs_path, args.workers, started)
    summary = summarise(norm_rows, pilot_rows, main_rows, clips)
    summary["geometry"] = {m: geometry(m, common) for m in METHODS}
    summary["accounting"] = accounting(common, epsilons)
    wall = math.ceil(time.monotonic() - started)
    lines = tables(summary, common, pilot_spec) + accounting_table(summary, common) + geometry_table(summary)
    if args.docs:
        directory = args.docs / "privacy"
        directory.mkdir(parents=True, exist_ok=True)
        setup = {
            "command": "python scripts/privacy_study.py" + (" --quick" if args.quick else "") + " --docs docs",
            "common": common, "methods": METHODS, "epsilons": epsilons, "seeds": seeds, "pilot": pilot_spec,
            "small_population": small, "dp": "server", "clips": clips, "cores": os.cpu_count(),
            "run_seconds_summed": sum(r["seconds"] for r in norm_rows + pilot_rows + main_rows),
        }
        (directory / "summary.json").write_text(json.dumps({"setup": setup, **summary}, indent=1))
        (directory / "tables.md").write_text("\n".join(lines))
        plot(summary, common, directory / "privacy.png")
    print("\n".join(lines))
    print(f"cores: {os.cpu_count()}; {wall} s")


if __name__ == "__main__":
    main()
