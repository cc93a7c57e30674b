"""deploy/fedmud_deploy.py's bytes check: the ledger against the SuperLink's own traffic counters."""

import json

import pytest

from .conftest import load_script

fedmud_deploy = load_script("deploy/fedmud_deploy.py")


def _run(tmp_path, up, down, inbound, outbound, messages):
    """A finished run's summary and ledger (``messages`` each way, half of them protocol) and Flower's counters."""
    rows = lambda d: [{"round": 1, "client": "1", "direction": d, "bytes": 1}] * (messages // 2)  # noqa: E731
    (tmp_path / "summary.json").write_text(json.dumps({"up_bytes": up, "down_bytes": down}))
    (tmp_path / "ledger.json").write_text(json.dumps({"records": rows("up") + rows("down"), "protocol": rows("up") + rows("down")}))
    counters = {"inbound-bytes": inbound, "outbound-bytes": outbound, "total-bytes": inbound + outbound}
    ls = tmp_path / "flwr-ls.json"
    ls.write_text(json.dumps({"runs": [{"run-id": 7, "status": "finished:completed", "network-traffic": counters}]}))
    return ls


@pytest.mark.parametrize(
    "up, down, inbound, outbound, messages, ok",
    [
        (607_544, 47_132, 624_742, 68_788, 24, True),  # measured: compose, 3 clients, SecAgg+ (docs/deployment.md)
        (198_612, 16_476, 202_000, 20_942, 4, True),  # measured: compose, 2 clients, plain
        (198_612, 16_476, 202_000, 60_000, 4, False),  # a whole downlink the ledger missed
        (198_612, 16_476, 150_000, 20_942, 4, False),  # the ledger counting more than was sent
    ],
)
def test_flowers_counters_must_match_the_ledger_within_10_percent_plus_framing_per_message(
    tmp_path, up, down, inbound, outbound, messages, ok
):
    ls = _run(tmp_path, up, down, inbound, outbound, messages)
    assert fedmud_deploy.traffic(ls, tmp_path, 0.10) is ok
    report = json.loads((tmp_path / "traffic.json").read_text())
    assert report["within_tolerance"] is ok and report["up"]["messages"] == messages
