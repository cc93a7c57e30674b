"""Under secure aggregation the server never sees one client's vector, only the unmasked sum: a node
that sends a malformed masked vector must cost the round, never the run or the model."""

from __future__ import annotations

import pytest
import torch

from .conftest import finished_run

PROBE = "tests/apps/secure_probe"
MALFORMED = ("reshape", "short", "one", "zeros")


@pytest.mark.integration
@pytest.mark.parametrize("uplink", ['uplink="float32"', 'uplink="int4" update-norm-bound=1.0 max-examples=2000'])
def test_a_malformed_masked_vector_skips_the_round_and_names_why_and_the_model_stays_finite(simulation_superlink, tmp_path, uplink):
    """Partition 2 sends, one a round: its vector as (1, n) (Flower sums by broadcasting), one value
    short, a single value, and zeros (the masks no longer cancel). Each round is skipped with the
    reason logged; the run goes on to its end and the model is the round-0 model, finite. So for
    float32 values and for codes on the round's shared grid."""
    config = (
        f'num-server-rounds={len(MALFORMED)} secure-aggregation=true downlink="full" {uplink} '
        f'probe.malform-partitions="2" probe.malform="{",".join(MALFORMED)}"'
    )
    run = finished_run(simulation_superlink, tmp_path, config, supernodes=4, app=PROBE)
    rows = run["results"][1:]
    assert [row["accepted"] for row in rows] == [0] * len(MALFORMED), rows
    output = run["output"]
    assert output.count("skipped") >= len(MALFORMED), output[-4000:]
    assert "has shape (1," in output  # the reshaped vector, named
    assert "the masks did not cancel" in output
    state = torch.load(run["dir"] / "checkpoint.pt", weights_only=False)["server"]["global_state"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert run["results"][-1]["accuracy"] == run["results"][0]["accuracy"]  # nothing merged
