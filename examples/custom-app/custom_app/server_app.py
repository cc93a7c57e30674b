"""ServerApp: the whole FedMUD server side, on this app's model and held-out data."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmud.task import CLASSIFICATION
from server.app import run_server

from .task import make_model, test_loader

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # run_server validates the run config, builds the global model from make_model
    # (under the run seed), runs every round and returns the summary it also writes
    # to <run-dir>/<timestamp>/summary.json.
    run_server(grid, context.run_config, model_fn=make_model, test_data=test_loader(), task=CLASSIFICATION)
