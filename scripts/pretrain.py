"""Pretrain a model centrally on some classes of an embedded dataset: the fine-tuning task's start.

    python scripts/pretrain.py --model cnn-mnist --out pretrained/cnn-mnist-0to4.pt
    python scripts/pretrain.py --model vit --epochs 12 --out pretrained/vit-0to4.pt

Trains on MNIST-5k's train split restricted to ``--classes`` (default digits 0-4) with
AdamW, seeded (model init from ``--seed`` as every party builds it, batches from
``--seed``), on the CPU, and saves the undecomposed model's ``state_dict``. Federated
fine-tuning then starts from it on the other classes::

    flwr run . --stream -c 'init-weights="/abs/path/pretrained/cnn-mnist-0to4.pt" classes="5-9" method="lora"'

The same architecture is built as the run's (``fedmud.models.model_factory`` with the
dataset's shape and all of its classes, so the head has a row for every class).
Prints the held-out accuracy on the pretraining classes and on the others, and the time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedmud.config import parse_run_config
from fedmud.data import client_loader, test_loader
from fedmud.models import model_factory
from fedmud.training import evaluate


def pretrain(model_name: str, classes: str, epochs: int, lr: float, seed: int, dataset: str = "mnist5k") -> tuple[torch.nn.Module, dict]:
    run = parse_run_config({"model": model_name, "dataset": dataset, "classes": classes, "num-partitions": 1, "seed": seed})
    torch.manual_seed(run.seed)  # as build_decomposed draws round 0 on every party
    model = model_factory(run.model, run.data)()
    loader = client_loader(run.data, 0, batch_size=64, seed=seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.monotonic()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimiser.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
            schedule.step()
    seconds = time.monotonic() - started
    seen = evaluate(model, test_loader(run.data), torch.device("cpu"))[1]
    others = ",".join(str(c) for c in range(10) if c not in run.data.classes)
    unseen_run = parse_run_config({"model": model_name, "dataset": dataset, "classes": others})
    unseen = evaluate(model, test_loader(unseen_run.data), torch.device("cpu"))[1]
    return model, {"seconds": seconds, "accuracy_pretrain_classes": seen, "accuracy_other_classes": unseen}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn-mnist", help="a built-in model name (default cnn-mnist)")
    parser.add_argument("--classes", default="0-4", help="classes to pretrain on (default 0-4)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="the run seed the fine-tuning runs will use too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, figures = pretrain(args.model, args.classes, args.epochs, args.lr, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(
        f"{args.model} pretrained on classes {args.classes} in {figures['seconds']:.1f} s: held-out accuracy "
        f"{figures['accuracy_pretrain_classes']:.4f} on them, {figures['accuracy_other_classes']:.4f} on the others; "
        f"saved {args.out}"
    )


if __name__ == "__main__":
    main()
