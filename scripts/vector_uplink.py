"""What ``vector-uplink`` changes: bytes a client uploads per round, and the paper CNN's accuracy.

    python scripts/vector_uplink.py bytes              # the README's table, plus the paper CNN and ViT
    python scripts/vector_uplink.py accuracy --seed 0  # paper CNN, mnist5k, 10 clients, 5 rounds

``bytes``: for each model at ``ratio=1/32`` with default settings, the uplink codec's payload per
round against dense FedAvg's float32 upload, with ``vector-uplink=uplink`` (every value at 4 bytes,
the behaviour before the key) and ``auto`` (the default), or the refusal's smallest ratio.
``accuracy``: held-out accuracy after rounds 0..5 of ``simulate_in_process`` with the vectors at
float32 (``uplink``; ``auto`` plans the CNN the same, bitwise) and at int8, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suites import FLOAT32_UP  # noqa: E402
from fedmud.config import ConfigError, parse_run_config  # noqa: E402
from fedmud.rounds import build_codec, build_decomposed, simulate_in_process  # noqa: E402


def _models() -> dict:
    import timm
    import torchvision.models as tvm

    return {  # name -> (model_fn or None, built-in model key)
        "torchvision shufflenet_v2_x1_0": (lambda: tvm.shufflenet_v2_x1_0(num_classes=10), None),
        "timm mobilevitv2_050": (lambda: timm.create_model("mobilevitv2_050", num_classes=10), None),
        "timm mobilevit_xxs": (lambda: timm.create_model("mobilevit_xxs", num_classes=10), None),
        "cnn-mnist (the paper CNN)": (None, "cnn-mnist"),
        "vit (built-in)": (None, "vit"),
    }


def upload_bytes() -> None:
    print("| model | vector-uplink=uplink | auto (default) |")
    print("|---|---|---|")
    for name, (model_fn, key) in _models().items():
        cells = []
        for choice in ("uplink", "auto"):
            run = parse_run_config({**FLOAT32_UP, "dataset": "mnist5k", "vector-uplink": choice, **({"model": key} if key else {})})
            try:
                model = build_decomposed(run, model_fn=model_fn)
            except ConfigError as refusal:
                cells.append("refused: smallest " + str(refusal).split("allowed: ratio >= ")[1].split(")")[0] + ")")
                continue
            sent, dense = build_codec(run, model).payload_nbytes, model.plan.dense_reference_bytes
            cells.append(f"{sent:,} B of {dense:,} (1/{dense / sent:.1f}); {len(model.plan.int8_names())} vectors at int8")
        print(f"| {name} | {' | '.join(cells)} |")


def accuracy(seed: int) -> None:
    torch.set_num_threads(1)
    for choice in ("uplink", "int8"):
        start = time.time()
        run = parse_run_config(
            {**FLOAT32_UP, "dataset": "mnist5k", "num-partitions": 10, "num-server-rounds": 5, "vector-uplink": choice, "seed": seed}
        )
        server, history, _, _ = simulate_in_process(run)
        print(json.dumps({
            "seed": seed, "vector-uplink": choice, "accuracy": history, "upload_bytes": server.codec.payload_nbytes,
            "dense_bytes": server.model.plan.dense_reference_bytes, "seconds": round(time.time() - start),
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("bytes", "accuracy"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    upload_bytes() if args.what == "bytes" else accuracy(args.seed)


if __name__ == "__main__":
    main()
