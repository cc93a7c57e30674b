"""Bytes on the wire, per round, client and direction.

The apps record the serialised size of every message content they send or
receive; the ledger only adds them up and compares with dense FedAvg.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

UP, DOWN = "up", "down"
MODEL, PROTOCOL, CONTROL = "model", "protocol", "control"
# what a message carries: the model's exchange, secure aggregation's keys, or the run's own questions
# (which partition a node holds)


@dataclass
class Ledger:
    """Records ``(round, client, direction, bytes)``; ``dense_up_bytes`` is one dense FedAvg upload.

    ``records`` holds the model's messages (downlinks, uploads: under secure aggregation the
    collect stage, which carries both); ``protocol`` the other messages of secure aggregation
    (keys, shares); ``control`` the partition queries. Totals count all three; the dense
    equivalent counts the model's messages as dense ones, and the control messages as they are.
    """

    dense_up_bytes: int = 0
    dense_down_bytes: int = 0
    records: list[tuple[int, str, str, int]] = field(default_factory=list)
    protocol: list[tuple[int, str, str, int]] = field(default_factory=list)
    control: list[tuple[int, str, str, int]] = field(default_factory=list)

    def record(self, server_round: int, client: str, direction: str, nbytes: int, part: str = MODEL) -> None:
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {direction!r}")
        rows = {MODEL: self.records, PROTOCOL: self.protocol, CONTROL: self.control}.get(part)
        if rows is None:
            raise ValueError(f"part must be {MODEL!r}, {PROTOCOL!r} or {CONTROL!r}, got {part!r}")
        rows.append((server_round, str(client), direction, int(nbytes)))

    def round_totals(self, server_round: int) -> dict[str, int]:
        totals = {UP: 0, DOWN: 0}
        for r, _, direction, nbytes in self.records + self.protocol + self.control:
            if r == server_round:
                totals[direction] += nbytes
        return totals

    def totals(self, part: str | None = None) -> dict[str, int]:
        """Bytes each way: every message, or only ``part``'s (MODEL, PROTOCOL, CONTROL)."""
        rows = {
            None: self.records + self.protocol + self.control,
            MODEL: self.records,
            PROTOCOL: self.protocol,
            CONTROL: self.control,
        }[part]
        totals = {UP: 0, DOWN: 0}
        for _, _, direction, nbytes in rows:
            totals[direction] += nbytes
        return totals

    def dense_equivalent(self) -> dict[str, int]:
        """What dense FedAvg would have sent for the same messages: a dense message for each of the
        model's, and the partition queries as they were (dense FedAvg through these apps asks too)."""
        counts = {UP: 0, DOWN: 0}
        for _, _, direction, _ in self.records:
            counts[direction] += 1
        control = self.totals(CONTROL)
        return {UP: counts[UP] * self.dense_up_bytes + control[UP], DOWN: counts[DOWN] * self.dense_down_bytes + control[DOWN]}

    def to_dict(self) -> dict:
        return {
            "dense_up_bytes": self.dense_up_bytes,
            "dense_down_bytes": self.dense_down_bytes,
            "totals": self.totals(),
            "dense_equivalent": self.dense_equivalent(),
            "records": _rows(self.records),
            "protocol": _rows(self.protocol),
            "control": _rows(self.control),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Ledger":
        rows = lambda key: [(r["round"], r["client"], r["direction"], r["bytes"]) for r in data.get(key, [])]  # noqa: E731
        return cls(data["dense_up_bytes"], data["dense_down_bytes"], rows("records"), rows("protocol"), rows("control"))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)


def _rows(records: list[tuple[int, str, str, int]]) -> list[dict]:
    return [{"round": r, "client": c, "direction": d, "bytes": b} for r, c, d, b in records]


def strict_json(value) -> str:
    """``value`` as strict JSON (indented), every non-finite float (a skipped round's NaN train-loss)
    written as null: ``json.dumps`` would write ``NaN``/``Infinity``, which JSON readers refuse."""
    return json.dumps(_finite(value), indent=1, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
