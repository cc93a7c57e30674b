"""Fine-tuning study (issue 12): federated LoRA, its initialisations, FFA-LoRA, FedMUD and full
fine-tuning of a pretrained model, over learning-rate sweeps.

    python scripts/finetune_study.py --docs docs           # the committed image study (its three arms)
    python scripts/finetune_study.py --arms lm --docs docs # the language-model study (docs/finetune-lm.md)
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

The ``lm`` arm (issue 26, ``docs/finetune-lm.md``; not in the default ``--arms``) is the two
initialisation papers' home setting: a small Llama-style causal language model pretrained on the
Python Language Reference (``scripts/pretrain.py --model llama``, made here when missing) and
fine-tuned federated on the docstrings of twelve standard-library packages, one client per package
(``partition="natural"``), with Adam, all seven methods. Its metric is the held-out perplexity
(lower is better); it also records each round's downlink (the chain link every client that
keeps state receives) beside the upload. Its files go to ``results/finetune-lm/runs.json`` and
``DOCS/finetune-lm/`` (``summary.json``, ``tables.md``, ``lm.png``, ``lm-bytes.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

from bench.suites import FLOAT32_UP, INT4_SR, LINK_INT2, RANK_16

ROOT = Path(__file__).resolve().parents[1]
FEDMUD = {"method": "fedmud", **FLOAT32_UP}  # the committed tables' upload (the default until issue 27)
METHODS = {
    "fedavg": {"method": "fedavg"},
    "fedmud": FEDMUD,
    "lora-zero": {"method": "lora", "init": "zero"},
    "lora-nonzero": {"method": "lora", "init": "nonzero", "lora-init-scale": 0.1},
    "lora-hrp": {"method": "lora", "init": "hrp", "hrp-rounds": 1, "hrp-rank": 32},
    "ffa-lora": {"method": "ffa-lora", "init": "zero"},
    # Init[AB] with the initial product as large as a freshly initialised weight (10x lora-nonzero's)
    "lora-nonzero-x10": {"method": "lora", "init": "nonzero", "lora-init-scale": 1.0},
    # issue 27's levers (bench/suites.py), which beat float32 uploads on the CNN at every participation:
    # twice the rank, int4 uploads with unbiased rounding, int2 chain links; and LoRA's adapters at int4
    "fedmud-r16": {**FEDMUD, **RANK_16},
    "fedmud-int4-sr": {**FEDMUD, **INT4_SR},
    "fedmud-link-int2": {**FEDMUD, **LINK_INT2},
    "fedmud-r16-int4-sr-link-int2": {**FEDMUD, **RANK_16, **INT4_SR, **LINK_INT2},
    "lora-zero-int4-sr": {"method": "lora", "init": "zero", **INT4_SR},
}
PRETRAIN = {"cnn-mnist": {"epochs": 4, "lr": 3e-3}, "vit": {"epochs": 25, "lr": 2e-3}}
SGD_METHODS = ("fedavg", "fedmud", "lora-zero", "lora-nonzero", "lora-hrp", "ffa-lora")
CNN_SGD_METHODS = (*SGD_METHODS, "lora-nonzero-x10")
INIT_AB = ("lora-nonzero", "lora-nonzero-x10")  # compared with lora-zero (Init[A])
LM_METHODS = ("fedavg", "fedmud", "lora-zero", "lora-nonzero", "lora-nonzero-x10", "lora-hrp", "ffa-lora")
# issue 27: the CNN's best codecs (docs/benchmarks.md), each lever alone and together, on the language model
LM_CODEC_METHODS = ("fedmud", "fedmud-r16", "fedmud-int4-sr", "fedmud-link-int2", "fedmud-r16-int4-sr-link-int2",
                    "lora-zero", "lora-zero-int4-sr")
LM_DIR = "llama-python-reference"  # the pretrained language model's directory under --pretrained
# one arm: a model, an optimiser, its methods, learning rates (300x, 100x, 100x) and rounds; optional:
# "config" (run-config keys over COMMON), "metric" ("accuracy" or "perplexity"), "compare" (the
# variants compared with lora-zero, paired by seed), "docs" (the folder under --docs), "default"
# (False: left out of the default --arms)
LM_CONFIG = {"dataset": "fedmud.corpora:stdlib_docstrings", "task": "causal-lm", "tokenizer": "auto",
             "classes": "", "num-partitions": 12, "max-length": 32, "batch-size": 16}
ARMS = {
    "cnn-mnist": {"model": "cnn-mnist", "optimizer": "sgd", "methods": CNN_SGD_METHODS,
                  "lrs": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3), "rounds": 10, "partitions": ("iid", "dirichlet")},
    # a ViT round costs 5x a CNN round on a CPU: 6 rounds, IID only
    "vit": {"model": "vit", "optimizer": "sgd", "methods": SGD_METHODS,
            "lrs": (0.003, 0.01, 0.03, 0.1, 0.3), "rounds": 6, "partitions": ("iid",)},
    # the non-zero init paper's own setting: Adam; Init[A] against Init[AB] at two initial scales
    "cnn-mnist-adam": {"model": "cnn-mnist", "optimizer": "adam", "methods": ("lora-zero", "lora-nonzero", "lora-nonzero-x10"),
                       "lrs": (0.0001, 0.0003, 0.001, 0.003, 0.01), "rounds": 10, "partitions": ("iid", "dirichlet")},
    # issue 26: a Llama-style LM pretrained on the language reference, fine-tuned on stdlib docstrings,
    # one client per package; Adam (LoRA's usual optimiser and the init paper's analysis), 100x of rates
    "lm": {"model": "llama", "optimizer": "adam", "methods": LM_METHODS,
           "lrs": (0.0001, 0.0003, 0.001, 0.003, 0.01), "rounds": 6, "partitions": ("natural",),
           "config": LM_CONFIG,
           "metric": "perplexity", "compare": (*INIT_AB, "lora-hrp"), "docs": "finetune-lm", "default": False},
    # issue 27: the codecs the CNN's tuned benchmarks favour, on the same language model and clients, at
    # the lm arm's three best rates (docs/finetune-lm.md, "Codecs")
    "lm-codecs": {"model": "llama", "optimizer": "adam", "methods": LM_CODEC_METHODS, "lrs": (0.001, 0.003, 0.01),
                  "rounds": 6, "partitions": ("natural",), "config": LM_CONFIG, "metric": "perplexity", "compare": (),
                  "docs": "finetune-lm-codecs", "default": False},
    # issue 27: LoRA's upload at int4 with unbiased rounding (free on the LM: docs/finetune-lm.md, "Codecs") on the
    # CNN, at the cnn-mnist arm's best rate for lora-zero and either side of it
    "cnn-codecs": {"model": "cnn-mnist", "optimizer": "sgd", "methods": ("lora-zero", "lora-zero-int4-sr"),
                   "lrs": (0.03, 0.1, 0.3), "rounds": 10, "partitions": ("iid", "dirichlet"), "compare": ("lora-zero-int4-sr",),
                   "docs": "finetune-cnn-codecs", "default": False},
}
DOCS = "finetune"  # the default folder under --docs
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
    """The pretrained checkpoint of ``model`` on digits 0-4, or the language model's directory, made
    once (``scripts/pretrain.py``)."""
    if model == "llama":
        return pretrained_lm(directory / LM_DIR)
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


def pretrained_lm(path: Path) -> Path:
    """The language model and tokenizer ``save_pretrained`` wrote into ``path``, made when missing
    (``scripts/pretrain.py --model llama``, seed 0, two threads)."""
    if not (path / "config.json").is_file():
        import sys

        sys.path.insert(0, str(ROOT / "scripts"))
        import torch
        from pretrain import pretrain_lm

        torch.set_num_threads(2)
        figures = pretrain_lm(path, seed=0, eval_length=ARMS["lm"]["config"]["max-length"])
        print(f"pretrained the language model: {json.dumps(figures)}", flush=True)
    return path


def run_config(job: dict) -> dict:
    """The run config of one study run: ``COMMON``, the arm's keys, the method's and the job's
    (model, weights, partition, rate, seeds, rounds, optimiser). ``scripts/peft_study.py`` builds on it."""
    lm = job.get("metric") == "perplexity"
    return {
        **COMMON,
        **job.get("config", {}),
        **METHODS[job["method"]],
        "model": f"hf:{job['weights']}" if lm else job["model"],
        "init-weights": "" if lm else job["weights"],
        "partition": job["partition"],
        "lr": job["lr"],
        "seed": job["seed"],
        "data-seed": 42 + job["seed"],
        "num-server-rounds": job["rounds"],
        "optimizer": job["optimizer"],
    }


def run_one(job: dict) -> dict:
    import torch

    from fedmud.config import parse_run_config
    from fedmud.rounds import simulate_in_process

    torch.set_num_threads(1)
    lm = job.get("metric") == "perplexity"
    run = parse_run_config(run_config(job))
    started = time.monotonic()
    links: list[int] = []  # each round's chain link: what a client holding the previous round downloads

    def on_round(r: int, server) -> None:
        last = server.chain.links[-1] if server.chain.links else None
        links.append(last.nbytes if last is not None and last.round == r else 0)

    server, history, uploaded, _ = simulate_in_process(run, on_round=on_round)
    clients = run.data.num_partitions  # every client every round
    uploaded = [nbytes // clients for nbytes in uploaded]  # each client's upload
    row = {
        **{k: job[k] for k in ("arm", "model", "optimizer", "method", "partition", "lr", "seed", "rounds")},
        "accuracy": history,
        "final": history[-1],
        "upload_bytes_per_client": sum(uploaded),
        "upload_bytes_total": sum(uploaded) * clients,
        "dense_upload_bytes_per_client_round": server.model.dense_reference_numel * 4,
        "seconds": time.monotonic() - started,
    }
    if lm:  # the headline is the held-out perplexity, exp(mean next-token loss over predicted tokens)
        from fedmud.data import test_loader
        from fedmud.rounds import ServerModel

        loader = test_loader(run.data)
        initial = ServerModel(run).evaluate(loader)[0]  # round 0: Init[AB] keeps its initial product
        row.update({
            "token_accuracy": row.pop("accuracy"),
            "final": math.exp(server.evaluate(loader)[0]),
            "perplexity_round0": math.exp(initial),
            "upload_bytes_per_round": list(uploaded),
            "download_bytes_per_round": links,
            "download_bytes_per_client": sum(links),
            "seconds": time.monotonic() - started,
        })
    return row


def key(row: dict) -> tuple:
    """A run's identity; rows written before arms existed are SGD runs of the arm named as their model."""
    return (row.get("arm", row["model"]), row["method"], row["partition"], row["lr"], row["seed"], row["rounds"])


def summarise(rows: list[dict], lrs: list[float]) -> dict:
    """Mean ± std over seeds of the final metric (accuracy; the ``lm`` arm's perplexity) and the
    upload, per (arm, partition, method, lr), and each compared variant's difference from Init[A]
    (the arm's ``compare``, by default :data:`INIT_AB`, − lora-zero, paired by seed) at each
    learning rate (the key ``init_ab_minus_init_a`` holds them all)."""
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
        if "download_bytes_per_client" in group[0]:
            ordered = sorted(group, key=lambda r: r["seed"])
            entry.update({
                "perplexity_round0": [r["perplexity_round0"] for r in ordered],
                "token_accuracy_final": [r["token_accuracy"][-1] for r in ordered],
                "upload_kb_per_client_round": statistics.fmean(r["upload_bytes_per_client"] / r["rounds"] for r in group) / 1e3,
                "download_kb_per_client_round": statistics.fmean(r["download_bytes_per_client"] / r["rounds"] for r in group) / 1e3,
                "dense_kb_per_client_round": group[0]["dense_upload_bytes_per_client_round"] / 1e3,
            })
        out.setdefault(model, {}).setdefault(partition, {}).setdefault(method, {})[f"{lr:g}"] = entry
    for model, partitions in out.items():
        for partition, methods in partitions.items():
            zero = methods.get("lora-zero", {})
            gaps: dict = {}
            for variant in ARMS.get(model, {}).get("compare", INIT_AB):
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
        lm = spec.get("metric") == "perplexity"
        digits = 2 if lm else 4
        for partition, methods in partitions.items():
            what = "held-out perplexity (lower is better)" if lm else "accuracy"
            columns = "kB up / down per client per round" if lm else "MB uploaded per client"
            lines += [
                f"### {spec['model']}, {spec['optimizer'].upper()}, {partition}: final {what} after {spec['rounds']} rounds "
                "(mean ± std over seeds)",
                "",
                "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + f" | {columns} |",
                "|---" * (len(lrs) + 2) + "|",
            ]
            for method in spec["methods"]:
                cells = methods.get(method)
                if not cells:
                    continue
                vals = [cells.get(f"{lr:g}") for lr in lrs]
                shown = " | ".join("–" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" for v in vals)
                first = next(v for v in vals if v)
                size = (f"{first['upload_kb_per_client_round']:.1f} / {first['download_kb_per_client_round']:.1f}" if lm
                        else f"{first['upload_mb_per_client']:.3f}")
                lines.append(f"| {method} | {shown} | {size} |")
            for variant, gaps in methods.get("init_ab_minus_init_a", {}).items():
                shown = " | ".join(
                    f"{gaps[f'{lr:g}']['mean']:+.{digits}f} ± {gaps[f'{lr:g}']['std']:.{digits}f}" if f"{lr:g}" in gaps else "–"
                    for lr in lrs
                )
                lines.append(f"| {variant} − lora-zero (paired by seed) | {shown} | |")
            if lm:
                dense = next(v for c in methods.values() for v in c.values() if "dense_kb_per_client_round" in v)
                lines += ["", f"Dense FedAvg of the whole model in float32: {dense['dense_kb_per_client_round']:.1f} kB "
                          "per client per round each way. Differences are in perplexity: negative, the variant is better."]
            lines.append("")
    return lines


def plot(summary: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for arm, partitions in summary.items():
        spec = ARMS[arm]
        lrs = arm_lrs(partitions)
        if spec.get("metric") == "perplexity":
            plot_lm(arm, spec, partitions, lrs, directory, plt)
            continue
        fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.2), squeeze=False)
        for ax, (partition, methods) in zip(axes[0], partitions.items()):
            for method, marker in zip(spec["methods"], "osD^v<>PX*"):
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


def plot_lm(arm: str, spec: dict, partitions: dict, lrs: list[float], directory: Path, plt) -> None:
    """``<arm>.png``: perplexity against learning rate; ``<arm>-bytes.png``: each method's best
    perplexity against its bytes per client per round, up and down."""
    markers = dict(zip(spec["methods"], "osD^v<>PX*"))
    for partition, methods in partitions.items():
        fig, ax = plt.subplots(figsize=(7, 4.6))
        for method in spec["methods"]:
            cells = methods.get(method)
            if not cells:
                continue
            pts = [(lr, cells[f"{lr:g}"]) for lr in lrs if f"{lr:g}" in cells]
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                        marker=markers[method], capsize=3, label=method)
        round0 = methods.get("lora-zero", {})
        if round0:
            start = statistics.fmean(next(iter(round0.values()))["perplexity_round0"])
            ax.axhline(start, color="grey", ls=":", lw=1, label=f"pretrained ({start:.1f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"learning rate ({spec['optimizer']})")
        ax.set_ylabel("held-out perplexity after fine-tuning")
        ax.set_title(f"Llama-style LM ({spec['rounds']} rounds, {partition} split over 12 packages), mean ± sd of 3 seeds", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        directory.mkdir(parents=True, exist_ok=True)
        fig.savefig(directory / f"{arm}.png", dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, (direction, field) in zip(axes, (("upload", "upload_kb_per_client_round"), ("download", "download_kb_per_client_round"))):
            for method in spec["methods"]:
                cells = methods.get(method)
                if not cells:
                    continue
                best = min(cells.values(), key=lambda c: c["mean"])
                ax.errorbar([best[field]], [best["mean"]], yerr=[best["std"]], marker=markers[method], capsize=3, ls="", label=method)
            dense = next(v for c in methods.values() for v in c.values() if "dense_kb_per_client_round" in v)
            ax.axvline(dense["dense_kb_per_client_round"], color="grey", ls=":", lw=1, label="dense FedAvg, float32")
            ax.set_xscale("log")
            ax.set_xlabel(f"kB {direction}ed per client per round (payload)")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("best held-out perplexity over the learning rates")
        axes[1].legend(fontsize=8)
        fig.suptitle("each method at its best learning rate: perplexity against bytes", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / f"{arm}-bytes.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(a for a, spec in ARMS.items() if spec.get("default", True)),
                        help=f"from {', '.join(ARMS)} (default: all but lm)")
    parser.add_argument("--methods", default=None, help="only these methods of each arm")
    parser.add_argument("--lrs", default=None, help="learning rates for every arm (default: each arm's)")
    parser.add_argument("--partitions", default=None, help="partitions for every arm (default: each arm's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every arm (default: each arm's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pretrained", type=Path, default=ROOT / "pretrained", help="where the checkpoints are made")
    parser.add_argument("--out", type=Path, default=None,
                        help="where runs.json is kept (default results/finetune; the lm arm's results/finetune-lm)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="write DOCS/finetune/{summary.json,tables.md,*.png} (the lm arm: DOCS/finetune-lm/)")
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
    groups = {spec.get("docs", DOCS) for spec in arms.values()}
    if len(groups) > 1:
        parser.error(f"--arms {args.arms}: run the lm arm on its own (its files go elsewhere)")
    group = groups.pop()
    weights = {spec["model"]: str(pretrained_path(spec["model"], args.pretrained).resolve()) for spec in arms.values()}
    jobs = [
        {"arm": name, "model": spec["model"], "optimizer": spec["optimizer"], "method": method, "partition": p,
         "lr": lr, "seed": int(s), "rounds": spec["rounds"], "weights": weights[spec["model"]],
         **{k: spec[k] for k in ("config", "metric") if k in spec}}
        for name, spec in arms.items()
        for p in spec["partitions"]
        for s in args.seeds.split(",")
        for lr in spec["lrs"]
        for method in spec["methods"]
    ]
    out = args.out or ROOT / "results" / group
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
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
        directory = args.docs / group
        directory.mkdir(parents=True, exist_ok=True)
        setup = {**COMMON, "arms": arms, "seeds": args.seeds, "methods": METHODS, "pretrain": PRETRAIN}
        for spec in arms.values():  # an arm's own data keys
            setup.update(spec.get("config", {}))
        if "llama" in weights:  # the language model: its pretraining's figures, the Python its corpora came from
            setup["pretrain"] = json.loads((Path(weights["llama"]) / "pretrain.json").read_text())
            setup["python"] = platform.python_version()
        if group != DOCS:
            setup["run_seconds_summed"] = round(sum(r["seconds"] for r in rows if key(r) in wanted))
        (directory / "summary.json").write_text(json.dumps({"setup": setup, "results": summary}, indent=1))
        (directory / "tables.md").write_text("\n".join(tables(summary)))
        plot(summary, directory)
    print("\n".join(tables(summary)))
    print(f"cores: {os.cpu_count()}; {math.ceil(time.monotonic() - started)} s")


if __name__ == "__main__":
    main()
