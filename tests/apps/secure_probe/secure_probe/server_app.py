"""FedMUD's ServerApp, with a probe: what every reply that reached the server carried, and what
reached aggregation, written to ``probe.json`` beside the run's summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import server.secure as secure
from server.app import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    seen: dict[str, list] = {"replies": [], "aggregate_fit": []}
    send = secure.MeteredGrid.send_and_receive
    aggregate = secure._RoundStrategy.aggregate_fit

    def probe_send(self, messages, *, timeout=None):
        replies = send(self, messages, timeout=timeout)
        for reply in replies:
            if not reply.has_error():
                arrays = {name: sum(len(a.data) for a in record.values()) for name, record in reply.content.array_records.items()}
                seen["replies"].append({"node": reply.metadata.src_node_id, "array_bytes": arrays})
        return replies

    def probe_aggregate(self, server_round, results, failures):
        seen["aggregate_fit"].append(
            {
                "results": len(results),
                "failures": len(failures),
                "distinct_parameters": len({id(fitres.parameters) for _, fitres in results}),
                "digests": sorted({hashlib.sha256(b"".join(fitres.parameters.tensors)).hexdigest() for _, fitres in results}),
                "num_examples": [fitres.num_examples for _, fitres in results],
            }
        )
        return aggregate(self, server_round, results, failures)

    secure.MeteredGrid.send_and_receive = probe_send
    secure._RoundStrategy.aggregate_fit = probe_aggregate
    summary = run_server(grid, context.run_config)  # the probe's own keys are dotted: FedMUD leaves them
    (Path(summary["run_dir"]) / "probe.json").write_text(json.dumps(seen))
