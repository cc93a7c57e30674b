"""Communication-cost benchmark suite: ``fedmud-bench`` (suites in bench/suites.py).

Runs a grid of methods on identical data, partition and seeds through the same
ServerApp/ClientApp in Flower's simulation (one ``flwr run`` each, against a
private SuperLink the bench starts and stops), and writes per-run CSV/JSON, a
markdown summary, plots and TensorBoard logs. See README.md, "Benchmarks".
"""
