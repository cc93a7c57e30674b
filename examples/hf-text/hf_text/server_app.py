"""ServerApp: the whole FedMUD server side, built from the run config alone."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.app import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The model, the data and the task come from the config (pyproject.toml): model names this
    # app's factory, dataset the stdlib docstrings, tokenizer this app's word-level tokenizer, task
    # sequence-classification. run_server validates it, tokenises the held-out texts, builds the
    # global model under the run seed and runs every round.
    run_server(grid, context.run_config)
