"""ServerApp: validate the config, build (or resume) the global model, run the rounds, report bytes.

:func:`run_server` is the whole server side for any model and data; a Flower app of
your own calls it from its ``@app.main()`` with its own model factory, held-out data
and task (see ``examples/custom-app``).
"""

from __future__ import annotations

import json
import math
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmud.checkpoint import load_checkpoint, new_run_dir, restore
from fedmud.config import BoundsConfig, ConfigError, parse_run_config
from fedmud.data import test_loader
from fedmud.ledger import DOWN, PROTOCOL, UP, Ledger
from fedmud.divergence import divergence
from fedmud.privacy import check_resume, mechanism
from fedmud.results import TIMED_AFTER_CHECKPOINT, RoundResult, read_results
from fedmud.rounds import ModelFactory, ServerModel, code_anchor
from fedmud.secagg import STEP
from fedmud.task import Task
from fedmud.sync import ANCHOR, CHAIN, FULL, STATELESS_BUDGET, Downlink, Link

from .strategy import FedMUD, server_seconds
from fedmud_wire import TIMINGS, content_bytes, downlink_record, upload_record

app = ServerApp()


def measure_message_sizes(server: ServerModel) -> tuple[int, int, int, int]:
    """Bytes as serialised and sent: (dense FedAvg upload, dense FedAvg downlink, this run's
    full-model downlink, one more chain link). The dense figures use the undecomposed model."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal(server.model.dense_reference_numel, dtype=np.float32)
    # a dense FedAvg reply carries the same metrics, the client's seconds included
    dense_up = content_bytes(upload_record(dense, 1, 0.0, 1, 0, dict.fromkeys(TIMINGS, 0.0)))
    digest = server.digest

    def full_downlink(like: dict[str, torch.Tensor]) -> int:
        # random values: Flower stores identical chunks once, and fresh weights (BatchNorm's ones
        # and zeros) would understate what a trained model costs
        state = {
            name: torch.from_numpy(rng.standard_normal(tuple(t.shape), dtype=np.float32))
            if t.is_floating_point()
            else torch.zeros(t.shape, dtype=t.dtype)
            for name, t in like.items()
        }
        return content_bytes(downlink_record(Downlink(FULL, 0).for_round(1, 1, digest, state)))

    full = full_downlink(server.global_state())
    dense_full = full_downlink(server.model.reference_state)
    residual = rng.standard_normal(server.codec.layout.numel, dtype=np.float32)
    parts = server.link_codec.pack(server.link_codec.encode(residual))
    no_link = content_bytes(downlink_record(Downlink(CHAIN, 0, 0, ()).for_round(1, 1, digest)))
    one_link = content_bytes(downlink_record(Downlink(CHAIN, 1, 0, (Link(1, 1, parts),)).for_round(1, 1, digest)))
    return dense_up, dense_full, full, one_link - no_link


def measure_stateless(server: ServerModel) -> tuple[int, int, int]:
    """Bytes as serialised and sent of (an anchor downlink without links beyond its anchor, a chain
    downlink without links, an anchor downlink of a Gaussian change without links): what a stateless
    client's download costs beyond its links and anchor, and what an anchor may cost ((0, 0, 0)
    without an anchor)."""
    codec = server.anchor_codec
    if codec is None:
        return 0, 0, 0
    change = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) for n, t in server.initial_state.items()
              if t.is_floating_point()}
    anchor = code_anchor(codec, 0, {**server.initial_state, **{n: server.initial_state[n] + c for n, c in change.items()}},
                         server.initial_state)
    with_anchor = content_bytes(downlink_record(Downlink(ANCHOR, 0, 0, (), anchor=anchor).for_round(1, 1, server.digest)))
    message = content_bytes(downlink_record(Downlink(CHAIN, 0, 0, ()).for_round(1, 1, server.digest)))
    return with_anchor - anchor.nbytes, message, with_anchor


def _start(run, server: ServerModel) -> tuple[Path, Ledger, list[RoundResult], int]:
    """(run directory, ledger, history, first round): a new run, or the one ``run.resume`` names."""
    dense_up, dense_down, full, link = measure_message_sizes(server)
    server.full_bytes, server.link_bytes = full, link
    server.anchor_framing, server.message_bytes, _ = measure_stateless(server)
    if run.resume:
        run_dir = Path(run.resume).expanduser()
        state = load_checkpoint(run_dir, run)
        ledger, rows = restore(state, server)
        try:
            history = [RoundResult.from_dict(row) for row in rows]
        except ValueError as err:
            raise ConfigError(f"resume={run.resume!r} is not allowed; its checkpoint's {err}") from None
        history = _with_round_timings(history, run_dir)
        log(INFO, "resuming %s after round %d", run_dir, server.round)
        if server.round == run.rounds:
            log(INFO, "round %d was its last: no round to run, its results are reported again", server.round)
        return run_dir, ledger, history, server.round + 1
    run_dir = new_run_dir(Path(run.run_dir).expanduser(), time.strftime("%Y%m%d-%H%M%S"))
    return run_dir, Ledger(dense_up_bytes=dense_up, dense_down_bytes=dense_down), [], 1


def _with_round_timings(history: list[RoundResult], run_dir: Path) -> list[RoundResult]:
    """``history`` as the checkpoint holds it, with the timings ``results.json`` holds for its rows.

    A round's checkpoint is written before the round is timed, and ``results.json`` after, so
    the checkpoint's last row lacks its timings (:data:`fedmud.results.TIMED_AFTER_CHECKPOINT`).
    They are taken from the ``results.json`` row of that round when every other field agrees
    (the same row, written later) and are finite seconds; otherwise the row stays untimed.
    """
    try:
        written = {row.round: row for row in read_results(run_dir / "results.json")}
    except (OSError, ValueError):
        return history
    out = []
    for row in history:
        later = written.get(row.round)
        if row.round_s is None and later is not None and _untimed(row) == _untimed(later):
            row = row.replace(**{name: getattr(later, name) for name in TIMED_AFTER_CHECKPOINT if _seconds(getattr(later, name))})
        out.append(row)
    return out


def _untimed(row: RoundResult) -> str:
    """``row`` without its timings, as ``results.json`` writes it (non-finite numbers as null)."""
    plain = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    return json.dumps({k: plain(v) for k, v in row.as_dict().items() if k not in TIMED_AFTER_CHECKPOINT}, sort_keys=True)


def _seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp. A run that stops on an error raises :class:`RunFailed`: Flower 1.39 then
    marks the run ``finished:failed`` with the reason as its status details (``flwr ls``) and the
    ServerApp's process exits non-zero. ``flwr run --stream`` itself exits 0 whatever the run's
    status; ``scripts/flwr-run.sh`` runs it and exits with the run's status."""
    run_server(grid, context.run_config)


class RunFailed(RuntimeError):
    """The run stopped on an error; the message is the reason its ``summary.json`` gives.

    An ``Exception``, not ``SystemExit``: Flower's simulation catches only ``Exception`` from the
    ServerApp's thread, and recorded a run that raised ``SystemExit`` as ``finished:completed``."""


def run_server(
    grid: Grid,
    run_config: dict,
    model_fn: ModelFactory | None = None,
    test_data: DataLoader | None = None,
    task: Task | None = None,
) -> dict:
    """Run a whole FedMUD federation from the ServerApp's side; returns the summary.

    ``run_config``: the flat Flower run config (validated here). ``model_fn``: builds
    the undecomposed model (default: the config's ``model``); ``test_data``: the
    held-out loader the global model is evaluated on (default: the config's
    ``dataset``); ``task``: loss and metric (default: the config's ``task``). Every
    configuration error, the user's factories' included, stops the run here, before
    any round, with one message naming the key, the value and what is allowed.

    A run that stops on an error, before or during the rounds, writes ``summary.json`` with
    ``"status": "failed"`` and the reason (in a new run directory when it had none yet) and
    raises :class:`RunFailed`.
    """
    attempt = _Attempt(run_config)
    try:
        return _run_server(attempt, grid, run_config, model_fn, test_data, task)
    except Exception as err:
        raise attempt.failed(err) from (None if isinstance(err, ConfigError) else err)


class _Attempt:
    """What a failed run's summary needs: the run config, and the run's directory once it has one."""

    def __init__(self, run_config: dict) -> None:
        self.run_config = run_config
        self.run_dir: Path | None = None

    def failed(self, err: Exception) -> RunFailed:
        """Log why the run stopped, write its ``summary.json`` (``"status": "failed"``, the reason,
        the last round in ``results.json``) and return the error to raise."""
        reason = f"configuration error: {err}" if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        log(ERROR, "%s", reason)
        run_dir = self.run_dir or _failure_dir(self.run_config.get("run-dir"))
        if run_dir is None:
            return RunFailed(reason)
        try:  # nothing here may hide the error being reported
            results = run_dir / "results.json"
            rows = read_results(results) if results.exists() else []
            summary = {
                "status": "failed",
                "error": reason,
                "last_round": rows[-1].round if rows else None,
                "rounds": self.run_config.get("num-server-rounds"),
                "run_dir": str(run_dir),
            }
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            log(ERROR, "FAILED: summary in %s", run_dir / "summary.json")
        except (OSError, ValueError, LookupError, TypeError) as write_err:
            log(ERROR, "FAILED: could not write %s: %s", run_dir / "summary.json", write_err)
        return RunFailed(reason)


def _failure_dir(base) -> Path | None:
    """A new directory under ``run-dir`` for a run that failed before it had one (None if there
    is no usable ``run-dir``): never another run's directory."""
    if not isinstance(base, str) or not base:
        return None
    try:
        return new_run_dir(Path(base).expanduser(), time.strftime("%Y%m%d-%H%M%S"))
    except OSError:
        return None


def _run_server(
    attempt: _Attempt,
    grid: Grid,
    run_config: dict,
    model_fn: ModelFactory | None,
    test_data: DataLoader | None,
    task: Task | None,
) -> dict:
    """:func:`run_server`'s work; ``attempt.run_dir`` is set as soon as the run has a directory."""
    run = parse_run_config(run_config)
    server = ServerModel(run, model_fn=model_fn, task=task)
    held_out = test_data if test_data is not None else test_loader(run.data)
    run_dir, ledger, history, first_round = _start(run, server)
    check_resume(run, history)  # a resumed DP run states the ε of what ran, and keeps to its dp-epsilon
    attempt.run_dir = run_dir

    for line in server.model.summary():
        log(INFO, "%s", line)
    if server.dp.on:
        log(INFO, "%s", server.dp.describe())
        too_noisy = server.dp.noise_warning(run.data.num_partitions)  # one node per partition
        if too_noisy:
            log(WARNING, "%s", too_noisy)
    if run.privacy.secure_aggregation:
        log(INFO, "secure aggregation: Flower's SecAgg+, shares %g, threshold %g of them", run.privacy.secagg_shares, run.privacy.secagg_threshold)
        if not server.dp.on and run.bounds.max_examples == BoundsConfig().max_examples:
            log(
                WARNING,
                "secure aggregation quantises weight/max-examples · update, and max-examples is the default %d: a "
                "client of E examples is carried within %.2g × %d/E a coordinate; set max-examples near your "
                "largest partition", run.bounds.max_examples, STEP, run.bounds.max_examples,
            )
    log(INFO, "downlink: full model %d B, one chain link %d B", server.full_bytes, server.link_bytes)
    if server.anchor_codec is not None:
        budget, anchor_estimate = STATELESS_BUDGET * server.full_bytes, measure_stateless(server)[2]
        log(INFO, "stateless clients: anchor ~%d B (%s, deflated; of a Gaussian change), refreshed before anchor + chain "
            "exceed %d B (1/%g of the full model)", anchor_estimate, run.anchor_codec, budget, 1 / STATELESS_BUDGET)
        if anchor_estimate + server.link_bytes > budget:
            log(WARNING, "anchor-codec=%s: an anchor and one link (~%d B) exceed 1/%g of the full model; the anchor is "
                "refreshed every round and a download is the anchor alone, ~%.3f of the full model; choose a code of "
                "fewer bits (int4, int2)", run.anchor_codec, anchor_estimate + server.link_bytes, 1 / STATELESS_BUDGET,
                anchor_estimate / server.full_bytes)
    strategy = FedMUD(
        run,
        server,
        ledger,
        run_dir,
        held_out,
        history=history,
    )
    strategy.run_rounds(grid, first_round)
    strategy.writer.close()
    plan = server.model.plan
    names = {
        "model": run.model if model_fn is None else _qualified(model_fn),
        "dataset": run.data.dataset if test_data is None else _qualified(test_data),
        # values uploaded per client and round, against dense FedAvg of the whole model (full
        # fine-tuning) and of the tensors that train (frozen ones left out)
        "values": {"upload": plan.upload, "dense": plan.dense_reference, "trained": plan.trained_reference},
    }
    return report(run, ledger, strategy.history, run_dir, server.task.metric_name, names)


def _qualified(obj) -> str:
    """``module:name`` of a user's function or object, for the summary (their own model and data)."""
    target = obj if callable(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(obj).__name__)}"


def report(
    run, ledger: Ledger, history: list[RoundResult], run_dir: Path, metric_name: str = "accuracy", names: dict | None = None
) -> dict:
    totals, dense, protocol = ledger.totals(), ledger.dense_equivalent(), ledger.totals(PROTOCOL)
    final = history[-1]
    uploads = sum(1 for r in ledger.records if r[2] == UP)
    summary = {
        "status": "completed",
        "method": run.decomposition.method,
        "kind": run.decomposition.kind,
        "pattern": run.decomposition.pattern,
        "downlink": run.downlink,
        "rounds": run.rounds,
        "model": run.model,
        "dataset": run.data.dataset,
        **(names or {}),
        "metric": metric_name,
        "final_accuracy": final.accuracy,
        "up_bytes": totals[UP],
        "down_bytes": totals[DOWN],
        "dense_up_bytes": dense[UP],
        "dense_down_bytes": dense[DOWN],
        "up_ratio_vs_dense": totals[UP] / dense[UP] if dense[UP] else None,
        "down_ratio_vs_dense": totals[DOWN] / dense[DOWN] if dense[DOWN] else None,
        "up_bytes_per_client_round": totals[UP] / uploads if uploads else None,
        "dense_up_bytes_per_client_round": ledger.dense_up_bytes,
        "privacy": privacy_summary(run, history),
        "diverged": divergence(history),
        "secagg_protocol_up_bytes": protocol[UP],
        "secagg_protocol_down_bytes": protocol[DOWN],
        "wall_s": final.wall_s,
        "seconds": time_split(history),
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(INFO, "FINAL %s %.4f after %d rounds", metric_name, final.accuracy, run.rounds)
    log(
        INFO,
        "FINAL uploaded %.3f MB (dense FedAvg %.3f MB, 1/%.1f); downloaded %.3f MB (dense FedAvg %.3f MB, 1/%.1f)",
        totals[UP] / 1e6,
        dense[UP] / 1e6,
        dense[UP] / max(totals[UP], 1),
        totals[DOWN] / 1e6,
        dense[DOWN] / 1e6,
        dense[DOWN] / max(totals[DOWN], 1),
    )
    if summary["privacy"]["dp"] != "off":
        p = summary["privacy"]
        log(INFO, "FINAL privacy: ε = %.4g at δ = %g after %d rounds (σ = %.4g, clip %g, sampling rate %g)",
            p["epsilon"], p["delta"], run.rounds, p["noise_multiplier"], p["clip"], p["sampling_rate"])
    if summary["diverged"]:
        log(WARNING, "FINAL the model diverged: %s", summary["diverged"]["reason"])
    split = summary["seconds"]
    log(
        INFO,
        "FINAL time %.1f s in %d rounds: clients %.1f s (their training %.1f s, summed), evaluation %.1f s, "
        "server %.1f s; start-up %.1f s",
        split["rounds"], split["timed_rounds"], split["clients"], split["client_training_summed"],
        split["evaluation"], split["server"], split["start_up"],
    )
    log(INFO, "FINAL results in %s", run_dir)
    return summary


def privacy_summary(run, history: list[RoundResult]) -> dict:
    """Secure aggregation and DP as the run had them; under DP, ε composed over the rounds that ran
    (:meth:`fedmud.privacy.Mechanism.report`: across resumes, each at its own σ and q)."""
    out = {"secure_aggregation": run.privacy.secure_aggregation, "dp": run.privacy.dp}
    if run.privacy.dp != "off":
        out.update(mechanism(run).report(history))
    return out


def time_split(history: list[RoundResult]) -> dict:
    """Where the run's time went, summed over the timed rounds of ``history`` (seconds).

    ``clients``: from sending a round's messages to the last reply (the clients' work,
    the transport and Flower's scheduling); ``client_training_summed`` and
    ``client_round_summed``: what the replies report (local training; the whole client
    round), summed over clients, so with W clients training in parallel the round's
    training takes about ``client_training_summed / W``; ``server``: planning the
    downlinks, aggregating, checkpointing; ``start_up``: before the first round.
    """
    timed = [row for row in history if row.round_s is not None]
    total = lambda name: sum(getattr(row, name) or 0.0 for row in timed)  # noqa: E731
    first = timed[0] if timed else None
    return {
        "timed_rounds": len(timed),
        "rounds": total("round_s"),
        "clients": total("clients_s"),
        "evaluation": total("evaluate_s"),
        "server": sum(server_seconds(row) for row in timed),
        "client_training_summed": total("client_train_s"),
        "client_round_summed": total("client_s"),
        "start_up": (first.wall_s - first.round_s) if first else 0.0,
    }
