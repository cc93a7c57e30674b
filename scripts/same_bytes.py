"""Whether a fresh benchmark run sent the same bytes, round by round, as a committed one.

    fedmud-bench --suite iid --seeds 0 --out /tmp/iid-again
    python scripts/same_bytes.py docs/bench/iid /tmp/iid-again

Reads both directories' ``tensorboard/<method>/seed-<s>/`` events (``fedmud-bench`` writes the
cumulative bytes of every round as the steps of ``by_up_bytes/*`` and ``by_total_bytes/*``,
exact integers) and, for every (method, seed) present in both, compares the bytes uploaded and
in all after each round, and the held-out accuracy. Prints one line per run; exits 1 if any
run's bytes differ. A code change that must not change what is sent (a refactor) is checked so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curves(run_dir: Path) -> dict[str, list[float]]:
    """Per round: cumulative bytes uploaded, cumulative bytes in all, accuracy."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {
        "up_bytes": [e.step for e in events.Scalars("by_up_bytes/accuracy")],
        "total_bytes": [e.step for e in events.Scalars("by_total_bytes/accuracy")],
        "accuracy": [e.value for e in events.Scalars("by_round/accuracy")],
    }


def runs(suite_dir: Path) -> dict[tuple[str, str], Path]:
    root = suite_dir / "tensorboard"
    return {(d.parent.name, d.name): d for d in sorted(root.glob("*/seed-*")) if d.is_dir()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("committed", type=Path, help="a committed suite's directory, e.g. docs/bench/iid")
    parser.add_argument("fresh", type=Path, help="the new run's --out directory")
    parser.add_argument("--rounds", type=int, help="compare the first ROUNDS rounds only (one run was cut shorter)")
    args = parser.parse_args(argv)
    committed, fresh = runs(args.committed), runs(args.fresh)
    both = sorted(set(committed) & set(fresh))
    if not both:
        print(f"no (method, seed) is in both {args.committed} and {args.fresh}", file=sys.stderr)
        return 2
    differ = 0
    for key in both:
        old, new = curves(committed[key]), curves(fresh[key])
        if args.rounds is not None:
            old, new = ({k: v[: args.rounds + 1] for k, v in c.items()} for c in (old, new))
        same_bytes = old["up_bytes"] == new["up_bytes"] and old["total_bytes"] == new["total_bytes"]
        same_accuracy = old["accuracy"] == new["accuracy"]
        differ += not same_bytes
        print(
            f"{key[0]}/{key[1]}: {len(new['up_bytes']) - 1} rounds, bytes "
            f"{'bitwise the same' if same_bytes else 'DIFFER'} (up {new['up_bytes'][-1]:,}, all {new['total_bytes'][-1]:,}), "
            f"accuracy {'the same' if same_accuracy else 'differs'} (final {old['accuracy'][-1]:.4f} -> {new['accuracy'][-1]:.4f})"
        )
    print(f"{len(both) - differ} of {len(both)} runs sent bitwise the same bytes")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
