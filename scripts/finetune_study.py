"""Fine-tuning study (issue 12): federated LoRA, its initialisations, FFA-LoRA, FedMUD and full
fine-tuning of a pretrained model, over learning-rate sweeps.

    python scripts/finetune_study.py --docs docs           # the committed study (all arms)
    python scripts/finetune_study.py --arms cnn-mnist --partitions iid --seeds 0 --lrs 0.01,0.1   # a slice

The task runs offline: a model pretrained centrally on MNIST-5k digits 0-4
(``scripts/pretrain.py``, made here when missing, seed 0) is fine-tuned federated on digits
5-9: 10 clients, every client every round, 1 local epoch a round, batch 32. Every run goes
through the apps' own round logic (``fedmud.rounds.simulate_in_process``: chain sync with
digests, encoding, exact merges); only the transport is left out. Arms (``ARMS``):

- ``cnn-mnist`` (the paper CNN, SGD, 10 rounds, lr 0.001-0.3, IID and Dirichlet 0.3) and ``vit``
  (SGD, 6 rounds, lr 0.003-0.3, IID), each with ``fedavg`` (full fine-tuning, the reference), ``fedmud`` (BKD, AAD,
  1/32), ``lora-zero`` (Init[A]), ``lora-nonzero`` (Init[AB]), ``lora-hrp`` (1 preheat round at
  rank 32, then the top-8 SVD) — rank-8 LoRA, α = 16, both factors averaged (FedIT) — and
  ``ffa-lora`` (A frozen, B trained, exact);
- ``cnn-mnist-adam``: the non-zero init paper's own setting, Adam (lr 1e-4-1e-2, IID and
  Dirichlet 0.3), Init[A]
  against Init[AB] with the initial product at 0.1 (``lora-nonzero``) and 1 (``lora-nonzero-x10``)
  times the std of a freshly initialised weight.

The classifier head, biases and norms train densely in every method (the head must learn
digits the pretraining never saw). Seeds 0, 1, 2 change the run seed (adapter and factor
draws, batch order) and the data seed (42 + seed: train/test split of digits 5-9 and the
Dirichlet draw); the pretrained weights are the same. Writes ``OUT/runs.json`` (every run,
resumable), and with ``--docs``: ``DOCS/finetune/summary.json``, ``DOCS/finetune/tables.md``
and ``DOCS/finetune/<arm>.png`` (accuracy against learning rate). Runs two at a time
(``--workers``), one thread each.
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

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "fedavg": {"method": "fedavg"},
    "fedmud": {"method": "fedmud"},
    "lora-zero": {"method": "lora", "init": "zero"},
    "lora-nonzero": {"method": "lora", "init": "nonzero", "lora-init-scale": 0.1},
    "lora-hrp": {"method": "lora", "init": "hrp", "hrp-rounds": 1, "hrp-rank": 32},
    "ffa-lora": {"method": "ffa-lora", "init": "zero"},
    # Init[AB] with the initial product as large as a freshly initialised weight (10x lora-nonzero's)
    "lora-nonzero-x10": {"method": "lora", "init": "nonzero", "lora-init-scale": 1.0},
}
PRETRAIN = {"cnn-mnist": {"epochs": 4, "lr": 3e-3}, "vit": {"epochs": 25, "lr": 2e-3}}
SGD_METHODS = ("fedavg", "fedmud", "lora-zero", "lora-nonzero", "lora-hrp", "ffa-lora")
CNN_SGD_METHODS = (*SGD_METHODS, "lora-nonzero-x10")
INIT_AB = ("lora-nonzero", "lora-nonzero-x10")  # compared with lora-zero (Init[A])
# one arm: a model, an optimiser, its methods, learning rates (300x, 100x, 100x) and rounds
ARMS = {
    "cnn-mnist": {"model": "cnn-mnist", "optimizer": "sgd", "methods": CNN_SGD_METHODS,
                  "lrs": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3), "rounds": 10, "partitions": ("iid", "dirichlet")},
    # a ViT round costs 5x a CNN round on a CPU: 6 rounds, IID only
    "vit": {"model": "vit", "optimizer": "sgd", "methods": SGD_METHODS,
            "lrs": (0.003, 0.01, 0.03, 0.1, 0.3), "rounds": 6, "partitions": ("iid",)},
    # the non-zero init paper's own setting: Adam; Init[A] against Init[AB] at two initial scales
    "cnn-mnist-adam": {"model": "cnn-mnist", "optimizer": "adam", "methods": ("lora-zero", "lora-nonzero", "lora-nonzero-x10"),
                       "lrs": (0.0001, 0.0003, 0.001, 0.003, 0.01), "rounds": 10, "partitions": ("iid", "dirichlet")},
}
COMMON = {
    "dataset": "mnist5k",
    "classes": "5-9",
    "num-partitions": 10,
    "local-epochs": 1,
    "batch-size": 32,
    "lora-rank": 8,
    "lora-alpha": 16.0,
}


def pretrained_path(model: str, directory: Path) -> Path:
    """The pretrained checkpoint of ``model`` on digits 0-4, made once (``scripts/pretrain.py``)."""
    path = directory / f"{model}-0to4.pt"
    if not path.exists():
        import sys

        sys.path.insert(0, str(ROOT / "scripts"))
        import torch
        from pretrain import pretrain

        net, figures = pretrain(model, "0-4", PRETRAIN[model]["epochs"], PRETRAIN[model]["lr"], seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
        print(f"pretrained {model} on digits 0-4: {figures}", flush=True)
    return path


def run_one(job: dict) -> dict:
    import torch

    from fedmud.config import parse_run_config
    from fedmud.rounds import simulate_in_process

    torch.set_num_threads(1)
    config = {
        **COMMON,
        **METHODS[job["method"]],
        "model": job["model"],
        "init-weights": job["weights"],
        "partition": job["partition"],
        "lr": job["lr"],
        "seed": job["seed"],
        "data-seed": 42 + job["seed"],
        "num-server-rounds": job["rounds"],
        "optimizer": job["optimizer"],
    }
    run = parse_run_config(config)
    started = time.monotonic()
    server, history, uploaded = simulate_in_process(run)
    clients = run.data.num_partitions
    return {
        **{k: job[k] for k in ("arm", "model", "optimizer", "method", "partition", "lr", "seed", "rounds")},
        "accuracy": history,
        "final": history[-1],
        "upload_bytes_per_client": sum(uploaded),
        "upload_bytes_total": sum(uploaded) * clients,
        "dense_upload_bytes_per_client_round": server.model.dense_reference_numel * 4,
        "seconds": time.monotonic() - started,
    }


def key(row: dict) -> tuple:
    """A run's identity; rows written before arms existed are SGD runs of the arm named as their model."""
    return (row.get("arm", row["model"]), row["method"], row["partition"], row["lr"], row["seed"], row["rounds"])


def summarise(rows: list[dict], lrs: list[float]) -> dict:
    """Mean ± std over seeds of the final accuracy and the upload, per (arm, partition, method, lr),
    and Init[AB]'s advantage over Init[A] (each of :data:`INIT_AB` − lora-zero, paired by seed)
    at each learning rate."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((key(row)[0], row["partition"], row["method"], row["lr"]), []).append(row)
    out: dict = {}
    for (model, partition, method, lr), group in sorted(cells.items()):
        finals = [r["final"] for r in sorted(group, key=lambda r: r["seed"])]
        entry = {
            "seeds": [r["seed"] for r in sorted(group, key=lambda r: r["seed"])],
            "final": finals,
            "mean": statistics.fmean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "upload_mb_per_client": group[0]["upload_bytes_per_client"] / 1e6,
            "dense_upload_mb_per_client": group[0]["dense_upload_bytes_per_client_round"] * group[0]["rounds"] / 1e6,
        }
        out.setdefault(model, {}).setdefault(partition, {}).setdefault(method, {})[f"{lr:g}"] = entry
    for model, partitions in out.items():
        for partition, methods in partitions.items():
            zero = methods.get("lora-zero", {})
            gaps: dict = {}
            for variant in INIT_AB:
                nonzero = methods.get(variant, {})
                for lr in lrs:
                    a, b = zero.get(f"{lr:g}"), nonzero.get(f"{lr:g}")
                    if a and b and a["seeds"] == b["seeds"]:
                        diffs = [y - x for x, y in zip(a["final"], b["final"])]
                        gaps.setdefault(variant, {})[f"{lr:g}"] = {
                            "mean": statistics.fmean(diffs),
                            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                        }
            methods["init_ab_minus_init_a"] = gaps
    return out


def arm_lrs(partitions: dict) -> list[float]:
    """The learning rates an arm's summary has, in order."""
    return sorted({float(lr) for methods in partitions.values() for m, cells in methods.items()
                   if m != "init_ab_minus_init_a" for lr in cells})


def tables(summary: dict) -> list[str]:
    lines = []
    for arm, partitions in summary.items():
        spec = ARMS[arm]
        lrs = arm_lrs(partitions)
        for partition, methods in partitions.items():
            lines += [
                f"### {spec['model']}, {spec['optimizer'].upper()}, {partition}: final accuracy after {spec['rounds']} rounds "
                "(mean ± std over seeds)",
                "",
                "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | MB uploaded per client |",
                "|---" * (len(lrs) + 2) + "|",
            ]
            for method in spec["methods"]:
                cells = methods.get(method)
                if not cells:
                    continue
                vals = [cells.get(f"{lr:g}") for lr in lrs]
                shown = " | ".join("–" if v is None else f"{v['mean']:.4f} ± {v['std']:.4f}" for v in vals)
                mb = next(v["upload_mb_per_client"] for v in vals if v)
                lines.append(f"| {method} | {shown} | {mb:.3f} |")
            for variant, gaps in methods.get("init_ab_minus_init_a", {}).items():
                shown = " | ".join(
                    f"{gaps[f'{lr:g}']['mean']:+.4f} ± {gaps[f'{lr:g}']['std']:.4f}" if f"{lr:g}" in gaps else "–"
                    for lr in lrs
                )
                lines.append(f"| {variant} − lora-zero (paired by seed) | {shown} | |")
            lines.append("")
    return lines


def plot(summary: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for arm, partitions in summary.items():
        spec = ARMS[arm]
        lrs = arm_lrs(partitions)
        fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.2), squeeze=False)
        for ax, (partition, methods) in zip(axes[0], partitions.items()):
            for method, marker in zip(spec["methods"], "osD^v<>P"):
                cells = methods.get(method)
                if not cells:
                    continue
                pts = [(lr, cells[f"{lr:g}"]) for lr in lrs if f"{lr:g}" in cells]
                ax.errorbar(
                    [p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                    marker=marker, capsize=3, label=method,
                )
            ax.set_xscale("log")
            ax.set_xlabel(f"learning rate ({spec['optimizer']})")
            ax.set_ylabel("final test accuracy, digits 5-9")
            ax.set_title(f"{spec['model']}, {spec['optimizer']}: 0-4 pretrained, 5-9 fine-tuned, {partition}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        directory.mkdir(parents=True, exist_ok=True)
        fig.savefig(directory / f"{arm}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"from {', '.join(ARMS)}")
    parser.add_argument("--methods", default=None, help="only these methods of each arm")
    parser.add_argument("--lrs", default=None, help="learning rates for every arm (default: each arm's)")
    parser.add_argument("--partitions", default=None, help="partitions for every arm (default: each arm's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every arm (default: each arm's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pretrained", type=Path, default=ROOT / "pretrained", help="where the checkpoints are made")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "finetune")
    parser.add_argument("--docs", type=Path, default=None, help="write DOCS/finetune/{summary.json,tables.md,*.png}")
    args = parser.parse_args()
    arms = {}
    for name in args.arms.split(","):
        spec = dict(ARMS[name])
        if args.lrs:
            spec["lrs"] = tuple(float(v) for v in args.lrs.split(","))
        if args.rounds:
            spec["rounds"] = args.rounds
        if args.methods:
            spec["methods"] = tuple(m for m in args.methods.split(",") if m in spec["methods"])
        if args.partitions:
            spec["partitions"] = tuple(args.partitions.split(","))
        arms[name] = spec
    weights = {spec["model"]: str(pretrained_path(spec["model"], args.pretrained).resolve()) for spec in arms.values()}
    jobs = [
        {"arm": name, "model": spec["model"], "optimizer": spec["optimizer"], "method": method, "partition": p,
         "lr": lr, "seed": int(s), "rounds": spec["rounds"], "weights": weights[spec["model"]]}
        for name, spec in arms.items()
        for p in spec["partitions"]
        for s in args.seeds.split(",")
        for lr in spec["lrs"]
        for method in spec["methods"]
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.json"
    rows = json.loads(runs_path.read_text()) if runs_path.exists() else []
    done = {key(r) for r in rows}
    todo = [j for j in jobs if key(j) not in done]
    started = time.monotonic()
    print(f"{len(jobs)} runs, {len(todo)} to do, {args.workers} at a time", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for i, row in enumerate(pool.imap_unordered(run_one, todo), 1):
            rows.append(row)
            runs_path.write_text(json.dumps(rows))
            print(
                f"[{i}/{len(todo)}] {row['arm']} {row['partition']:9s} {row['method']:16s} lr {row['lr']:<6g} "
                f"seed {row['seed']} final {row['final']:.4f} ({row['seconds']:.0f} s; {time.monotonic() - started:.0f} s in all)",
                flush=True,
            )
    wanted = {key(j) for j in jobs}
    summary = summarise([r for r in rows if key(r) in wanted], sorted({lr for a in arms.values() for lr in a["lrs"]}))
    if args.docs:
        directory = args.docs / "finetune"
        directory.mkdir(parents=True, exist_ok=True)
        setup = {**COMMON, "arms": arms, "seeds": args.seeds, "methods": METHODS, "pretrain": PRETRAIN}
        (directory / "summary.json").write_text(json.dumps({"setup": setup, "results": summary}, indent=1))
        (directory / "tables.md").write_text("\n".join(tables(summary)))
        plot(summary, directory)
    print("\n".join(tables(summary)))
    print(f"cores: {os.cpu_count()}; {math.ceil(time.monotonic() - started)} s")


if __name__ == "__main__":
    main()
