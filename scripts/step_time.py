"""Training-step time of a FedMUD-decomposed model relative to the same model trained densely.

    python scripts/step_time.py                      # 3 models x batch 32, 128; 2 threads; ~1.5 min on 2 cores
    python scripts/step_time.py --models vit --batches 32 --steps 60 --out /tmp/vit.json

What it measures: one local SGD step (zero_grad, forward, cross-entropy, backward,
optimizer step) on a fixed random batch, for the dense model and for the same model
after ``fedmud.decompose(model, fedmud.DecompositionConfig())`` (the default: block
Kronecker ``aad`` updates at ratio 1/32; every decomposed tensor reads
``W + offset + ΔW(factors)`` through ``torch.nn.utils.parametrize``, so ΔW is rebuilt
in every forward and its factors' gradients in every backward). Both copies start from
the same weights (the plain model is deep-copied before it is decomposed; a
parametrised model cannot be) and ``reset(seed)`` draws the round's factors once. SGD
updates every parameter with ``requires_grad``: all of them for the dense copy, the
trained factors and the dense tensors for the decomposed one.

After ``--warmup`` untimed steps of each, the two are timed in alternation, each step on
its own with ``time.perf_counter``: blocks of ``--block`` steps, dense first in even
blocks and decomposed first in odd ones (ABBA...), until each has ``--steps`` timed
steps, so drift of the machine (frequency, other load) reaches both alike. A third variant, ``unfused``, is the decomposed model computing each tensor as fedmud did
before 2026-11-25 (autograd through the broadcast factor products, the offset a tensor of the
weight's size; :func:`compute_unfused`), so the gain of the fused path is a ratio measured in
the same process. Reported per
(model, batch): median wall time per step of each and **the ratio decomposed / dense of
the medians** (and unfused / dense); beside it the median of the per-block ratios (each block's pair ran back
to back), the ratio of median process CPU times (``time.process_time``: less sensitive to
other processes on a shared machine), quartiles, the upload fraction the plan reached,
and the cores other processes kept busy meanwhile (from ``/proc/stat``; near 0 on a
quiet machine). Also the threads (``torch.set_num_threads``), the machine (CPU count,
torch version), the command. Printed as a table and written as JSON (default
``docs/perf/step_time.json`` in the repository, so the docs can cite it; ``results/`` is
git-ignored).

Models (random inputs, 10 classes): ``cnn`` the paper's CNN (``fedmud.models.CNN``,
1×28×28); ``resnet18`` torchvision's ``resnet18(num_classes=10)`` as torchvision
builds it (ImageNet stem: 7×7 stride-2 conv and max-pool) on 3×32×32; ``vit``
torchvision's ``VisionTransformer(image_size=32, patch_size=4, num_layers=6,
num_heads=4, hidden_dim=192, mlp_dim=384)`` on 3×32×32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fedmud
from fedmud.models import CNN

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("docs/perf/step_time.json")  # relative to the repository root; results/ is git-ignored
NUM_CLASSES = 10


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=NUM_CLASSES)


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=192, mlp_dim=384, num_classes=NUM_CLASSES
    )


# name -> (factory, one example's shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn": (lambda: CNN(in_channels=1, num_classes=NUM_CLASSES, spatial=1), (1, 28, 28)),
    "resnet18": (_resnet18, (3, 32, 32)),
    "vit": (_vit, (3, 32, 32)),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--batches", default="32,128", help="comma-separated batch sizes (default 32,128)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each variant per case (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (default 3)")
    parser.add_argument("--block", type=int, default=1, help="steps per alternation block (default 1: ABBA...)")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="weights, factors (reset(seed)), inputs, labels")
    parser.add_argument("--out", type=Path, help=f"JSON path (default {DEFAULT_OUT} in the repository)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: give comma-separated integers")
    if not args.batches or min(args.batches) < 1 or min(args.threads, args.steps, args.block) < 1 or args.warmup < 0:
        parser.error("batches, threads, steps and block must be >= 1, warmup >= 0")
    return args


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def step_seconds(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """One SGD step (zero_grad, forward, loss, backward, step): (wall seconds, this process's CPU seconds)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start, time.process_time() - cpu_start


class OtherLoad:
    """Cores busy with other processes while it is open: /proc/stat's busy time less this process's CPU time.

    The machine may be shared; a measurement taken while others ran says so in its JSON.
    """

    def __enter__(self) -> OtherLoad:
        self.cores = None
        self._start = self._busy(), time.process_time(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = self._busy(), time.process_time(), time.monotonic()
        if busy is not None and self._start[0] is not None and wall > self._start[2]:
            other = (busy - self._start[0]) - (own - self._start[1])
            self.cores = max(other, 0.0) / (wall - self._start[2])

    @staticmethod
    def _busy() -> float | None:
        """Seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal), or None."""
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        except (OSError, ValueError, IndexError):
            return None
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def build_models(name: str, seed: int) -> tuple[nn.Module, fedmud.DecomposedModel, fedmud.DecomposedModel]:
    """The dense model, its decomposed twin, and a second twin computed the unfused way, from the same weights."""
    factory, _ = MODELS[name]
    torch.manual_seed(seed)
    plain = factory()
    dense = copy.deepcopy(plain)  # before decompose: a parametrised model cannot be deep-copied
    twin = copy.deepcopy(plain)
    decomposed = fedmud.decompose(plain, fedmud.DecompositionConfig())
    decomposed.reset(seed)
    unfused = fedmud.decompose(twin, fedmud.DecompositionConfig())
    unfused.reset(seed)
    compute_unfused(unfused)
    return dense.train(), decomposed.train(), unfused.train()


def compute_unfused(model: fedmud.DecomposedModel) -> None:
    """Make every decomposed tensor compute ``W + offset + ΔW`` as fedmud did before 2026-11-25: autograd
    through the broadcast factor products, each term at the weight's size, and the non-zero
    initialisation's offset kept as a tensor of the weight's size. The reference the fused path is
    measured against; the values are the same up to float rounding."""
    for update in model.updates().values():
        offset = update.offset()
        offset = torch.zeros(update.update.weight_shape) if offset is None else offset.detach().clone()

        def forward(self, weight: torch.Tensor, offset: torch.Tensor = offset) -> torch.Tensor:
            return weight + offset + self.delta_weight()

        update.forward = types.MethodType(forward, update)


def interleave(
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]], x, y, steps: int, block: int
) -> dict[str, list[tuple[float, float]]]:
    """``steps`` timed steps of each run, alternating in blocks of ``block``; the order flips every block."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    order = list(runs)
    index = 0
    while any(len(t) < steps for t in times.values()):
        for name in order if index % 2 == 0 else order[::-1]:
            model, optimizer = runs[name]
            for _ in range(min(block, steps - len(times[name]))):
                times[name].append(step_seconds(model, optimizer, x, y))
        index += 1
    return times


def block_ratios(dense: list[float], decomposed: list[float], block: int) -> list[float]:
    """decomposed / dense of each block's summed time (the two ran back to back)."""
    return [
        sum(decomposed[i : i + block]) / sum(dense[i : i + block])
        for i in range(0, min(len(dense), len(decomposed)), block)
    ]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def summary(seconds: list[float]) -> dict[str, float]:
    low, high = quartiles(seconds)
    return {"median_ms": 1e3 * statistics.median(seconds), "q1_ms": 1e3 * low, "q3_ms": 1e3 * high,
            "min_ms": 1e3 * min(seconds)}


def measure(name: str, batch: int, args: argparse.Namespace) -> dict:
    started = time.monotonic()
    dense, decomposed, unfused = build_models(name, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, *MODELS[name][1], generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    runs = {
        "dense": (dense, torch.optim.SGD(trainable(dense), lr=args.lr)),
        "decomposed": (decomposed, torch.optim.SGD(trainable(decomposed), lr=args.lr)),
        "unfused": (unfused, torch.optim.SGD(trainable(unfused), lr=args.lr)),
    }
    for model, optimizer in runs.values():
        for _ in range(args.warmup):
            step_seconds(model, optimizer, x, y)
    with OtherLoad() as load:
        times = interleave(runs, x, y, args.steps, args.block)
    wall = {variant: [w for w, _ in steps] for variant, steps in times.items()}
    cpu = {variant: [c for _, c in steps] for variant, steps in times.items()}
    case: dict = {"model": name, "input": list(MODELS[name][1]), "batch": batch}
    for variant in runs:
        case[variant] = {
            **summary(wall[variant]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[variant]),
            "trained_params": sum(p.numel() for p in trainable(runs[variant][0])),
        }
    case["ratio"] = case["decomposed"]["median_ms"] / case["dense"]["median_ms"]
    case["unfused_ratio"] = case["unfused"]["median_ms"] / case["dense"]["median_ms"]
    case["block_ratio_median"] = statistics.median(block_ratios(wall["dense"], wall["decomposed"], args.block))
    case["cpu_ratio"] = case["decomposed"]["cpu_median_ms"] / case["dense"]["cpu_median_ms"]
    case["upload_fraction"] = decomposed.plan.upload / decomposed.plan.dense_reference
    case["decomposed_tensors"] = len(decomposed.parametrised_names)
    case["other_load_cores"] = None if load.cores is None else round(load.cores, 2)
    case["seconds"] = round(time.monotonic() - started, 1)
    return case


def table(cases: list[dict]) -> list[str]:
    lines = [
        "| model | input | batch | dense ms/step | decomposed ms/step | ratio | per-block ratio | CPU-time ratio "
        "| unfused ratio (before) | upload | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        shape = "×".join(map(str, c["input"]))
        load = "?" if c["other_load_cores"] is None else f"{c['other_load_cores']:.1f} cores"
        lines.append(
            f"| {c['model']} | {shape} | {c['batch']} | {c['dense']['median_ms']:.1f} | "
            f"{c['decomposed']['median_ms']:.1f} | **{c['ratio']:.2f}** | {c['block_ratio_median']:.2f} | "
            f"{c['cpu_ratio']:.2f} | {c['unfused_ratio']:.2f} | 1/{1 / c['upload_fraction']:.1f} | {load} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python scripts/step_time.py", shlex.join(argv)]).strip()
    print(f"{command}: {torch.get_num_threads()} threads, {args.warmup} warm-up + {args.steps} timed steps "
          f"of each, blocks of {args.block}", flush=True)
    started = time.monotonic()
    cases = []
    for name in args.models:
        for batch in args.batches:
            cases.append(measure(name, batch, args))
            c = cases[-1]
            print(f"  {name} batch {batch}: dense {c['dense']['median_ms']:.1f} ms, decomposed "
                  f"{c['decomposed']['median_ms']:.1f} ms, ratio {c['ratio']:.2f} (unfused {c['unfused_ratio']:.2f})",
                  flush=True)
    print()
    print("\n".join(table(cases)))
    result = {
        "command": command,
        "what": "median seconds of one SGD training step (zero_grad, forward, cross-entropy, backward, step) on a "
        "fixed random batch; dense model vs fedmud.decompose(model, DecompositionConfig()), and the same decomposed "
        "model computed unfused (autograd through the factor products, as before 2026-11-25), timed interleaved",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "lr": args.lr,
        "seed": args.seed,
        "decomposition": repr(fedmud.DecompositionConfig()),
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "cases": cases,
    }
    out = ROOT / DEFAULT_OUT if args.out is None else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{len(cases)} cases in {result['seconds']:.0f} s; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
