"""The integers a secure round sums in: sized per round from the clipping range and its clients, so
a masked value travels in as few bits as keep the sum exact, not Flower's 64."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.common.config import parse_config_args

from client.app import app as client_app
from fedmud.config import parse_run_config
from fedmud.ledger import UP
from fedmud.privacy import mechanism
from fedmud.secagg import MAX_LEVELS, STEP, pack_values, packed_nbytes, size_field, unpack_values
from server.app import run_server
from server.secure import secure_field

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

from .conftest import ROOT
from .federation import InProcessGrid
from .test_privacy import SECAGG_TOLERANCE


# ---------------------------------------------------------------------------- the field
@pytest.mark.parametrize("clients, bits", [(2, 28), (4, 29), (10, 30), (63, 32)])
def test_a_round_sums_in_the_smallest_field_that_holds_its_clients_at_the_step(clients, bits):
    field = size_field(clients, 8.0)
    assert field.bits == bits
    assert clients * field.levels < field.modulus  # the sum of every client's largest value does not wrap
    assert field.step <= STEP  # ... at a step of at most 2^-22 over [-8, 8]
    assert clients * (2 * 8.0 / STEP) >= field.modulus // 2  # and no bit fewer would do


def test_the_clip_or_norm_bound_sets_the_levels_and_so_the_bits():
    """A narrower clipping range needs fewer levels for the same step: a DP clip of 1 saves 3 bits."""
    assert size_field(10, 1.0).bits == size_field(10, 8.0).bits - 3
    dp_run = parse_run_config({"secure-aggregation": True, "dp": "client", "dp-noise-multiplier": 1.0, "dp-clip": 0.5, "min-replies": 4})
    bounded = parse_run_config({"secure-aggregation": True, "update-norm-bound": 0.5})
    assert secure_field(dp_run, mechanism(dp_run), 10).clipping_range == pytest.approx(2.5)
    assert secure_field(bounded, mechanism(bounded), 10).bits == size_field(10, 8.0).bits - 4


def test_a_round_whose_clients_cannot_fit_32_bits_gets_a_larger_field_and_one_past_64_bit_sums_is_refused():
    field = size_field(1000, 8.0)  # 1,000 clients a round (Poisson sampling under DP can draw that many)
    assert field.bits == 36 and 1000 * field.levels < field.modulus and field.step <= STEP
    assert size_field(64, 8.0).bits == 33
    with pytest.raises(ValueError) as err:  # Flower adds the clients' values in int64 before it reduces them
        size_field(300_000, 8.0)
    for part in ("cannot sum 300,000 clients a round exactly", "64-bit", "fraction-train", "update-norm-bound"):
        assert part in str(err.value), str(err.value)


def test_a_range_wider_than_flowers_int32_quantiser_keeps_its_levels_and_a_coarser_step():
    field = size_field(10, 1e4)
    assert field.levels == MAX_LEVELS and field.step > STEP and 10 * field.levels < field.modulus


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [8, 13, 30, 32, 36, 62])
def test_packed_values_take_their_bits_and_unpack_to_flowers_int64(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=70_001, dtype=np.int64)
    packed = pack_values(values, bits)
    assert packed.dtype == np.uint8 and packed.nbytes == packed_nbytes(values.size, bits) == -(-values.size * bits // 8)
    unpacked = unpack_values(packed, bits)
    assert unpacked.dtype == np.int64 and np.array_equal(unpacked, values)
    assert unpack_values(packed[:-1], bits).shape == (values.size - 1,)  # a byte short is a value short
    assert unpack_values(packed.reshape(1, -1), bits).shape == (1, values.size)  # leading axes kept


def test_the_sum_of_packed_masked_vectors_unmasks_exactly():
    """Masks that cancel modulo the field, packed and unpacked on the way: the sum is the sum."""
    field = size_field(10, 8.0)
    rng = np.random.default_rng(0)
    quantised = rng.integers(0, field.levels + 1, size=(10, 5000))
    quantised[0] = field.levels  # the largest values every client can send
    quantised[1:] = np.maximum(quantised[1:], field.levels - 3)
    masks = rng.integers(0, field.modulus, size=(9, 5000))
    masks = np.vstack([masks, -masks.sum(axis=0)])  # pairwise masks sum to zero
    travelled = [unpack_values(pack_values((q + m) % field.modulus, field.bits), field.bits) for q, m in zip(quantised, masks)]
    assert np.array_equal(np.sum(travelled, axis=0) % field.modulus, quantised.sum(axis=0))


# ---------------------------------------------------------------------------- the README's example
class _Loopback(InProcessGrid):
    """Flower's Grid over the real ClientApp in this process, node 100 + p holding partition p; each
    message is serialised and read back on its way, as it is between machines (Flower's mod changes what it reads)."""

    def __init__(self, nodes: int, run_config: dict) -> None:
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p, "num-partitions": run_config["num-partitions"]},
                             state=RecordDict(), run_config=run_config)
            for p in range(nodes)
        }
        self.replies: dict = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            received = copy.copy(message)  # as the node receives it: serialised and read back
            received.content = recorddict_from_proto(recorddict_to_proto(message.content))
            self.replies[message.metadata.message_id] = client_app(received, self.contexts[message.metadata.dst_node_id])
        return ids

    def get_node_ids(self):
        return list(self.contexts)


def _readme_secure_example() -> tuple[dict, dict]:
    """(federation config, run config) of the README's secure-aggregation example."""
    section = (ROOT / "README.md").read_text().split("## Privacy", 1)[1].split("\n## ", 1)[0]
    command = next(block for block in section.split("flwr run ")[1:] if "secure-aggregation=true" in block).replace("\\\n", " ")
    federation = re.search(r'--federation-config "([^"]+)"', command).group(1)
    return parse_config_args([federation]), parse_config_args([re.search(r"-c '([^']+)'", command).group(1)])


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """One round of the README's example, plainly and under SecAgg+, in this process. The same model
    and number of clients; each client holds 40 examples (100 partitions) for one epoch, which
    changes no byte of an upload, with max-examples at that, as the README tells; downlink=full, so
    the merged weights are the mean itself."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    federation, example = _readme_secure_example()
    nodes = federation["num-supernodes"]
    runs = {}
    for name, secure in (("plain", False), ("secure", True)):
        # the plain run at the float32 upload a secure round's values start from (`uplink=auto` under
        # secure aggregation), so the figure is what the field costs
        config = {**example, "secure-aggregation": secure, "num-server-rounds": 1, "num-partitions": 100, "local-epochs": 1,
                  "max-examples": 40, "downlink": "full", "run-dir": str(tmp_path_factory.mktemp(name)), **FLOAT32_UP}
        summary = run_server(_Loopback(nodes, config), config)
        run_dir = Path(summary["run_dir"])
        runs[name] = {
            "summary": summary,
            "ledger": json.loads((run_dir / "ledger.json").read_text()),
            "state": torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["global_state"],
        }
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return runs


def test_the_readme_secure_example_uploads_at_most_1_1_times_the_plain_run(readme_runs):
    plain, secure = readme_runs["plain"], readme_runs["secure"]
    assert secure["summary"]["up_bytes"] <= 1.1 * plain["summary"]["up_bytes"]  # SecAgg+'s own messages included
    every = secure["ledger"]["records"] + secure["ledger"]["protocol"] + secure["ledger"]["control"]
    assert secure["summary"]["up_bytes"] == sum(r["bytes"] for r in every if r["direction"] == UP)
    # a masked vector is 30 bits a value (10 clients over [-8, 8]): below the float32 upload
    masked = [r["bytes"] for r in secure["ledger"]["records"] if r["direction"] == UP]
    clear = [r["bytes"] for r in plain["ledger"]["records"] if r["direction"] == UP]
    assert len(masked) == 10 and max(masked) < min(clear)


def test_the_readme_secure_example_merges_within_the_stated_tolerance_of_the_plain_run(readme_runs):
    plain, secure = readme_runs["plain"]["state"], readme_runs["secure"]["state"]
    diff = max((plain[k].double() - secure[k].double()).abs().max().item() for k in plain if plain[k].is_floating_point())
    assert 0 < diff <= SECAGG_TOLERANCE, diff  # 0 would mean the secure run did not merge its own sum
