"""A PEFT-wrapped model under FedMUD: decompose PEFT's trainable adapters, or the base weights?

    python scripts/peft_study.py --out docs/finetune-lm/peft.json      # 36 runs, ~25 min on 2 cores

Issue 26 left one choice open: with a PEFT model (``peft.get_peft_model``), ``method=fedmud`` can
decompose the tensors PEFT left trainable (its LoRA matrices; the base stays frozen, as everywhere
in FedMUD: frozen means frozen) or the base weights PEFT targets (LoRA's work then done by FedMUD
itself, which is what ``method=fedmud`` on the unwrapped model does). This measures both, beside
PEFT's own LoRA federated as it is (``method=fedavg`` of its trainable tensors: FedIT with PEFT's
Init[A]), in the language-model study's setting (``docs/finetune-lm.md``: the Llama-style model
pretrained on the Python Language Reference, fine-tuned on the docstrings of twelve
standard-library packages, one client per package, Adam, 6 rounds, the same keys):

- ``peft-fedavg``: PEFT LoRA (rank 8, α 16, every linear layer of every block), its A and B
  trained and averaged;
- ``peft-fedmud``: the same PEFT model, ``method=fedmud`` at ``ratio=1/8`` of its trained tensors
  (a rank-8 matrix has little left to shrink: 1/32 of it is refused with the smallest ratio);
- ``fedmud``: the unwrapped model, ``method=fedmud`` at 1/32 of the whole model;
- ``fedmud-1/75``: the same at 1/75, the smallest ratio the planner reaches on this model, near
  ``peft-fedmud``'s bytes.

Three learning rates around the study's best, seeds 0-2; the held-out perplexity after the last
round and the bytes each client uploads. The output keeps every run and is read back first, so
an interrupted study resumes and a variant added later runs alone. Runs through ``fedmud.rounds.simulate_in_process``, one
thread a run, two at a time. The pretrained model is made when missing, as the study makes it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench.suites import FLOAT32_UP  # noqa: E402

from finetune_study import ARMS, LM_DIR, pretrained_lm, run_config  # noqa: E402  (the study's setting)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "peft-fedavg": {"peft": True, "method": "fedavg"},
    "peft-fedmud": {"peft": True, "method": "fedmud", "ratio": "1/8", **FLOAT32_UP},
    "fedmud": {"peft": False, "method": "fedmud", "ratio": "1/32", **FLOAT32_UP},
    "fedmud-1/75": {"peft": False, "method": "fedmud", "ratio": "1/75", **FLOAT32_UP},
}
LRS = (0.003, 0.01, 0.03)
SEEDS = (0, 1, 2)
ROUNDS = ARMS["lm"]["rounds"]


def peft_llama(directory: str):
    """A zero-argument factory: the pretrained model with PEFT LoRA adapters (drawn from torch's
    global generator, which every party seeds with the run seed)."""

    def build():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(directory)
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))

    return build


def run_one(job: dict) -> dict:
    import torch

    from fedmud.config import parse_run_config
    from fedmud.data import test_loader
    from fedmud.rounds import simulate_in_process

    torch.set_num_threads(1)
    variant = VARIANTS[job["variant"]]
    arm = ARMS["lm"]
    study = {"metric": "perplexity", "config": arm["config"], "method": variant["method"], "model": arm["model"],
             "weights": job["weights"], "partition": arm["partitions"][0], "optimizer": arm["optimizer"],
             "lr": job["lr"], "seed": job["seed"], "rounds": ROUNDS}
    # the LM study's run, with the tokenizer named (a PEFT model's directory is the base's) and the variant's ratio
    config = {**run_config(study), "tokenizer": f"hf:{job['weights']}", **({"ratio": variant["ratio"]} if "ratio" in variant else {})}
    run = parse_run_config(config)
    model_fn = peft_llama(job["weights"]) if variant["peft"] else None
    started = time.monotonic()
    server, _, uploaded, _ = simulate_in_process(run, model_fn=model_fn)
    return {
        **job,
        "perplexity": math.exp(server.evaluate(test_loader(run.data))[0]),
        "upload_bytes_per_client": sum(uploaded) // run.data.num_partitions,  # every client every round
        "dense_upload_bytes_per_client_round": server.model.dense_reference_numel * 4,
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "finetune-lm" / "peft.json")
    parser.add_argument("--pretrained", type=Path, default=ROOT / "pretrained")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    weights = str(pretrained_lm(args.pretrained / LM_DIR))
    rows = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    done = {(r["variant"], r["lr"], r["seed"]) for r in rows}
    jobs = [
        {"variant": v, "lr": lr, "seed": s, "weights": weights}
        for v in VARIANTS for lr in LRS for s in SEEDS if (v, lr, s) not in done
    ]
    started, total = time.monotonic(), len(rows) + len(jobs)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            rows.append({k: v for k, v in row.items() if k != "weights"})
            print(f"[{len(rows)}/{total}] {row['variant']:12s} lr {row['lr']:<6g} seed {row['seed']} "
                  f"perplexity {row['perplexity']:.2f} upload {row['upload_bytes_per_client'] / 1e3:.1f} kB "
                  f"({row['seconds']:.0f} s)", flush=True)
    cells = {}
    for row in rows:
        cells.setdefault((row["variant"], row["lr"]), []).append(row)
    summary = {
        "command": "python scripts/peft_study.py --out docs/finetune-lm/peft.json",
        "python": platform.python_version(),
        "seeds": list(SEEDS),
        "rounds": ROUNDS,
        "seconds_this_call": round(time.monotonic() - started, 1),
        "cells": [
            {
                "variant": variant,
                "lr": lr,
                "perplexity": [r["perplexity"] for r in sorted(group, key=lambda r: r["seed"])],
                "mean": statistics.fmean(r["perplexity"] for r in group),
                "std": statistics.stdev(r["perplexity"] for r in group),
                "upload_kb_per_client": group[0]["upload_bytes_per_client"] / 1e3,
                "dense_upload_kb_per_client": group[0]["dense_upload_bytes_per_client_round"] * ROUNDS / 1e3,
            }
            for (variant, lr), group in sorted(cells.items())
        ],
        "runs": sorted(rows, key=lambda r: (r["variant"], r["lr"], r["seed"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    for cell in summary["cells"]:
        print(f"{cell['variant']:12s} lr {cell['lr']:<6g} perplexity {cell['mean']:.2f} ± {cell['std']:.2f} "
              f"upload {cell['upload_kb_per_client']:.1f} kB of {cell['dense_upload_kb_per_client']:.0f} kB dense")


if __name__ == "__main__":
    main()
