"""A round under secure aggregation: Flower's own SecAgg+ workflow, fed FedMUD's downlinks.

:class:`flwr.server.workflow.SecAggPlusWorkflow` runs the protocol (setup, share keys,
collect masked vectors, unmask) over the Grid and hands the *unmasked weighted mean*
to a legacy strategy's ``aggregate_fit``. Three seams adapt it, and nothing of the
protocol is rewritten:

- :class:`_Workflow` replaces the content of the collect stage's message to each node
  with that node's FedMUD downlink (chain or full model, digest, round seed), so the
  protocol's one training message is also the round's downlink; and it leaves a node
  that never shared its keys out of unmasking (Flower 1.39 fails the round on one);
- :class:`_RoundStrategy` is the legacy strategy the workflow asks: it names the round's
  nodes and takes the aggregate, which is all it ever receives (every result's
  parameters are the same unmasked mean; each client's array records were cleared by
  its mod);
- :class:`MeteredGrid` puts every message of every stage in the ledger, by node and
  direction: the collect stage as the model's exchange, the others as protocol traffic; and
  it unpacks each masked vector to Flower's int64 after counting the bytes it came in.

Quantisation, ``uplink=float32``: the workflow maps each coordinate of ``weight/max_weight ·
update`` from [-clipping_range, clipping_range] onto integer levels, by stochastic rounding, and
sums modulo a power of two. Both are sized each round (:func:`fedmud.secagg.size_field`) from the
clipping range and the round's sampled clients (every client in the sum was sampled): a step
of at most 2^-22 at full weight, in the smallest field that sums them exactly (30 bits for 10
clients over [-8, 8]); the client's mod wrapper sends each masked value in that many bits.
A coordinate of the mean is off by at most the step over the mean weight ratio.

``uplink=int8|int4``: the client rounds its rotated update onto the round's shared grid itself
(:class:`fedmud.secagg.CodeGrid`) and hands the workflow the codes and its weight's digits at
weight 1, with a clipping range and levels that map each code to one integer exactly; the field
holds the round's sum of codes (8 bits a value for 10 clients at int4), and the server decodes
the unmasked sums (:func:`SecureSum.mean`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, log, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedmud.config import RunConfig
from fedmud.ledger import DOWN, MODEL, PROTOCOL, UP, Ledger
from fedmud.privacy import Mechanism
from fedmud.secagg import CodeGrid, Field, code_grid, size_field
from fedmud_wire import content_bytes, secure_reply_seconds, unpack_masked_vector

DEFAULT_CLIPPING_RANGE = 8.0  # Flower's default, for runs with neither a DP clip nor an update-norm bound


def clipping_range(run: RunConfig, dp: Mechanism) -> float:
    """The largest coordinate SecAgg+ carries: a privatised update's (clip plus client noise), or
    the update-norm bound's, or Flower's default."""
    if dp.on:
        return float(dp.value_range())  # Flower's mod accepts a Python float only
    if run.bounds.update_norm_bound > 0:
        return float(run.bounds.update_norm_bound)
    return DEFAULT_CLIPPING_RANGE


def max_weight(run: RunConfig, dp: Mechanism) -> float:
    """The weight the workflow scales by: the most a client's weight can be after
    :func:`fedmud.bounds.bound_reply` (1 under DP, else ``max-examples``)."""
    return 1.0 if dp.on else float(run.bounds.max_examples)


def secure_field(run: RunConfig, dp: Mechanism, clients: int) -> Field:
    """The integers a round of ``clients`` sampled clients sums in: its levels from the clipping
    range (:func:`clipping_range`), its modulus the smallest that sums them exactly."""
    return size_field(clients, clipping_range(run, dp))


@dataclass(frozen=True)
class SecureSum:
    """How a round's workflow is parameterised and its unmasked mean read: values in a fine field
    (``grid`` None), or codes on the round's shared grid."""

    field: Field | None
    grid: CodeGrid | None
    modulus: int
    clipping_range: float  # the workflow's
    levels: int  # the workflow's quantization_range
    max_weight: float  # the workflow's

    def describe(self) -> str:
        if self.grid is None:
            return self.field.describe()
        g = self.grid
        return f"field 2^{self.modulus.bit_length() - 1}: codes in ±{g.half} on a shared grid of step {g.step:.2g} (rotated)"

    def mean(self, flower_mean: np.ndarray, clients: int, seed: int, bound: float) -> tuple[np.ndarray | None, str, float, float]:
        """(the weighted mean update, why it cannot be merged or "", the coordinate range its values keep
        (0: already checked), the slack its norm may exceed ``bound`` by) from the workflow's mean."""
        if self.grid is None:
            return flower_mean, "", self.clipping_range, 0.0
        flower_mean = np.asarray(flower_mean, dtype=np.float64)
        if flower_mean.shape != (self.grid.length,) or not np.isfinite(flower_mean).all():
            return None, (
                f"the unmasked sum has shape {flower_mean.shape} or non-finite values, expected {self.grid.length} finite "
                "values: a node sent a malformed vector"
            ), 0.0, 0.0
        mean, weight, why = self.grid.decode(np.rint(flower_mean * clients), clients, seed)
        return mean, why, 0.0, self.grid.norm_slack(clients, weight) if mean is not None and bound > 0 else 0.0


def secure_sum(run: RunConfig, dp: Mechanism, clients: int, numel: int) -> SecureSum:
    """The workflow's parameters for a round of ``clients`` sampled clients and updates of ``numel`` values."""
    grid = code_grid(run, dp, numel)
    if grid is None:
        f = secure_field(run, dp, clients)
        return SecureSum(f, None, f.modulus, clipping_range(run, dp), f.levels, max_weight(run, dp))
    return SecureSum(None, grid, 1 << grid.field_bits(clients), grid.flower_range, grid.flower_levels, 1.0)


@dataclass
class SecureResult:
    """What one secure round gave the server: the mean, never one client's update."""

    mean_update: np.ndarray | None  # the weighted mean of the clients' updates (None: the protocol halted)
    merged_nodes: list[int] = field(default_factory=list)  # whose update is in the mean
    seconds: dict[str, float] = field(default_factory=dict)  # the clients' reported seconds, summed
    error: str = ""  # the protocol failed
    refused: str = ""  # the unmasked sums cannot be the clients' (a node sent a malformed vector)
    value_range: float = 0.0  # the largest coordinate an honest mean has (0: checked already)
    norm_slack: float = 0.0  # how far the protocol's rounding may move the mean's norm


class MeteredGrid:
    """The Grid, with every message the workflow sends and receives put in the ledger, as it
    travelled; a masked vector then goes to the workflow as Flower's int64 (``modulus``: the
    round's field, whose log2 is the bits a packed value takes)."""

    def __init__(self, grid, ledger: Ledger, server_round: int, modulus: int) -> None:
        self._grid, self._ledger, self._round, self._modulus = grid, ledger, server_round, modulus

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        part = PROTOCOL
        for message in messages:
            stage = message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
            part = MODEL if stage == Stage.COLLECT_MASKED_VECTORS else PROTOCOL
            self._ledger.record(self._round, str(message.metadata.dst_node_id), DOWN, content_bytes(message.content), part)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self._ledger.record(self._round, str(reply.metadata.src_node_id), UP, content_bytes(reply.content), part)
                unpack_masked_vector(reply.content, self._modulus)
        return replies


@dataclass
class _Node:
    """What the workflow needs of a ClientProxy: the node id."""

    node_id: int


class _RoundStrategy(Strategy):
    """The legacy strategy the workflow asks: this round's nodes in, the unmasked aggregate out."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)
        self.results: list | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(node), FitIns(Parameters(tensors=[], tensor_type=""), {})) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ whose collect-stage message to each node is that node's FedMUD downlink."""

    def __init__(self, downlinks: Mapping[int, RecordDict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.downlinks = downlinks

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        # the workflow writes each node's stage config into its content: one RecordDict per node
        state.nid_to_fitins = {node: RecordDict(dict(self.downlinks[node])) for node in state.nid_to_fitins}
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:
        """Flower's stage, then: a node that did not share its keys (lost before or during this
        stage) is in no client's masks, so it leaves the round's sampled set and every neighbourhood.

        Flower 1.39 keeps it sampled: unmasking then asks its neighbours for key shares it never
        sent, every client fails, and one node lost between rounds costs the whole round. Nodes
        lost later (no masked vector, or no unmasking shares) are Flower's own dropout handling.
        """
        super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {node: neighbours & shared for node, neighbours in state.nid_to_neighbours.items()}
        return self._check_threshold(state)


class _Available(SimpleClientManager):
    """The workflow logs how many nodes it sampled from; the Grid's nodes are not registered here."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def num_available(self) -> int:
        return self.count


def secure_round(
    grid,
    ledger: Ledger,
    run: RunConfig,
    dp: Mechanism,
    server_round: int,
    downlinks: Mapping[int, RecordDict],
    population: int = 0,
    numel: int = 0,
    seed: int = 0,
    bound: float = 0.0,
) -> SecureResult:
    """One round of SecAgg+ over ``grid`` with each node's downlink; the ledger gets every message.
    ``numel``: the update's length; ``seed``: the round's; ``bound``: the norm every honest update keeps.

    Raises ValueError when the round samples more clients than a 64-bit sum can hold
    (:func:`fedmud.secagg.size_field`).
    """
    plan = secure_sum(run, dp, len(downlinks), numel)
    if plan.modulus.bit_length() - 1 > 32:
        log(WARNING, "round %d: %d clients need more than 32 bits a value: %s", server_round, len(downlinks), plan.describe())
    strategy = _RoundStrategy(sorted(downlinks))
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
        client_manager=_Available(population),
    )
    workflow = _Workflow(
        downlinks,
        num_shares=float(run.privacy.secagg_shares),
        reconstruction_threshold=float(run.privacy.secagg_threshold),
        max_weight=plan.max_weight,
        clipping_range=plan.clipping_range,
        quantization_range=plan.levels,
        modulus_range=plan.modulus,
        timeout=run.round_timeout,
    )
    started = time.monotonic()
    try:
        workflow(MeteredGrid(grid, ledger, server_round, plan.modulus), context)
    except Exception as err:  # a malformed masked vector (wrong shape) stops Flower's workflow mid-round
        log(WARNING, "round %d: secure aggregation failed: %s: %s", server_round, type(err).__name__, err)
        return SecureResult(None, error=f"{type(err).__name__}: {err}")
    if not strategy.results:
        return SecureResult(None, error="the protocol halted (too few nodes answered a stage)")
    seconds: dict[str, float] = {}
    for _, fitres in strategy.results:
        for key, value in secure_reply_seconds(fitres.metrics).items():
            seconds[key] = seconds.get(key, 0.0) + value
    nodes = sorted(proxy.node_id for proxy, _ in strategy.results)
    flower_mean = np.asarray(parameters_to_ndarrays(strategy.results[0][1].parameters)[0], dtype=np.float64)
    mean, refused, value_range, slack = plan.mean(flower_mean, len(nodes), seed, bound)
    log(
        INFO, "round %d: secure aggregation of %d clients in %.2f s, %s",
        server_round, len(nodes), time.monotonic() - started, plan.describe(),
    )
    return SecureResult(mean, nodes, seconds, refused=refused, value_range=value_range, norm_slack=slack)
