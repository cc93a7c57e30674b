"""``fedmud-bench``: run a suite of methods through Flower's simulation and compare what they cost.

    fedmud-bench                                      # = --suite default: full-iid, p10 and p1
    fedmud-bench --suite iid                          # 9 methods, ~11 min on 2 cores
    fedmud-bench --suite smoke --out /tmp/bench       # 2 methods, 2 clients, 2 rounds
    fedmud-bench --suite p10                          # 100 clients, 10 a round, 3 seeds
    fedmud-bench --suite full-iid --seeds 0,1,2,3,4   # the rivals, 5 seeds
    fedmud-bench --suite iid --methods fedavg,fedmud --rounds 3
    fedmud-bench --suite smoke --model vit            # every method on your choice of model
    fedmud-bench --model mypackage.models:build --dataset mypackage.data:load
    fedmud-bench --list                               # suites and methods

Every method runs once per seed. Writes OUT (default results/bench/<suite>/):
summary.md|json (mean ± std over seeds), runs/<method>/seed-<s>.csv|json,
accuracy_vs_mb_up.png, accuracy_vs_round.png, pareto_accuracy_vs_total_bytes.png,
label_distribution.png, tensorboard/<method>/seed-<s>/, logs/<method>/seed-<s>.log,
raw/<method>/seed-<s>/<timestamp>/.
Exit status: 0 if every run finished, 1 if any failed, 130 if interrupted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .runner import Outcome, Runner, duration, flwr_command, run_dir, shell_command
from .suites import GROUPS, METHODS, SUITES, Suite, resolve
from .superlink import TOKEN_VAR, PrivateSuperLink

# what a bench run owns in its output directory (cleared at the start of a run)
OWNED = ("runs", "raw", "logs", "tensorboard", "summary.md", "summary.json", "accuracy_vs_mb_up.png",
         "accuracy_vs_round.png", "pareto_accuracy_vs_total_bytes.png", "label_distribution.png")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedmud-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--suite", default="default", choices=sorted({*SUITES, *GROUPS}),
        help="a suite, or a group of suites run one after another into OUT/<suite> (default: "
        + ", ".join(GROUPS["default"]) + ")",
    )
    parser.add_argument("--list", action="store_true", help="print the suites and methods and exit")
    group = parser.add_argument_group("suite fields (override the suite's value)")
    group.add_argument("--methods", help=f"comma-separated, from: {', '.join(METHODS)}")
    group.add_argument("--rounds", type=int)
    group.add_argument("--supernodes", type=int, help="simulated clients (= partitions)")
    group.add_argument(
        "--fraction-train", type=float, help="fraction of the clients drawn each round (run-config fraction-train)"
    )
    group.add_argument(
        "--min-train-nodes", type=int, help="at least this many clients a round (run-config min-train-nodes)"
    )
    group.add_argument("--partition", help="iid, dirichlet, ... (as the run config allows)")
    group.add_argument("--alpha", type=float, help="Dirichlet concentration")
    group.add_argument("--dataset", help="a built-in dataset (mnist5k, cifar10, ...) or 'package.module:factory'")
    group.add_argument(
        "--model",
        help="every method's model: a built-in (cnn-mnist, resnet18, vit, ...) or 'package.module:factory' "
        "(default: the run config's 'auto', the paper's CNN for the dataset)",
    )
    group.add_argument("--target", type=float, help="target accuracy for bytes/time to target")
    group.add_argument("--local-epochs", type=int)
    group.add_argument("--lr", type=float)
    group.add_argument("--batch-size", type=int)
    group.add_argument(
        "--seeds", type=seed_list, help="comma-separated run seeds, e.g. 0,1,2: each method runs once per seed"
    )
    group.add_argument("--seed", type=int, help="one run seed (the same as --seeds SEED)")
    group.add_argument("--data-seed", type=int, help="the split and partition, the same for every seed (default 42)")
    group.add_argument("--up-mbps", type=float, help="uplink per client, Mbit/s (default 5)")
    group.add_argument("--down-mbps", type=float, help="downlink per client, Mbit/s (default 20)")
    group.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
        help="a run-config key for every method, VALUE as in TOML (repeatable), e.g. "
        "--set 'init-weights=\"/abs/cnn.pt\"' --set 'classes=\"5-9\"'",
    )
    parser.add_argument("--out", type=Path, help="results directory (default results/bench/<suite>)")
    parser.add_argument("--app", type=Path, help="the Flower app (repository root); default: this checkout")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one run may take (default 1800)")
    return parser.parse_args(argv)


def seed_list(text: str) -> tuple[int, ...]:
    """``0,1,2`` -> (0, 1, 2)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1,2") from None


def settings(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as run-config entries; VALUE is read as TOML (a bare word as a string)."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: give KEY=VALUE, e.g. --set 'classes=\"5-9\"'")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def app_root(given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "pyproject.toml").is_file() and (candidate / "server" / "app.py").is_file():
            return candidate
    sys.exit("fedmud-bench: cannot find the Flower app; run from the repository root or pass --app")


def invocation(argv: list[str]) -> str:
    prog = "python -m bench" if Path(sys.argv[0]).name == "__main__.py" else "fedmud-bench"
    return " ".join([prog, shlex.join(argv)]).strip()


def config_problem(suite: Suite, method: str, app_dir: Path) -> str:
    """Why Flower or the apps would refuse this method's run config, or "" (checked before a 20 s start-up).

    Besides the keys and values, builds the method's model as the apps will (``model`` and
    ``dataset`` factories imported with the app directory on ``sys.path``, as Flower puts it
    there), so a factory that does not import, or a model that cannot reach the ratio,
    is reported here.
    """
    import tomllib

    from fedmud.config import ConfigError, parse_run_config
    from fedmud.rounds import build_decomposed

    config = suite.run_config(method)
    declared = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    missing = [key for key in config if key not in declared]
    if missing:
        return f"run-config key(s) {', '.join(missing)} not in pyproject.toml [tool.flwr.app.config]"
    try:
        run = parse_run_config({**declared, **config})
        with _on_sys_path(app_dir):
            build_decomposed(run)  # imports the factories, builds the model, plans it at the ratio
    except ConfigError as err:
        return f"configuration error: {err}"
    except Exception as err:  # noqa: BLE001 - the apps would fail the same way; say so now
        return f"building the model failed: {type(err).__name__}: {err}"
    return ""


@contextmanager
def _on_sys_path(directory: Path):
    """``directory`` first on ``sys.path`` for the duration (as Flower loads the app), then as it was."""
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _interrupt(signum, frame):  # SIGTERM/SIGHUP: clean up as on Ctrl-C
    raise KeyboardInterrupt(signal.Signals(signum).name)


@dataclass
class Results:
    """What a bench invocation produced, method by method."""

    outcomes: list[Outcome] = field(default_factory=list)
    runs: dict[str, dict[int, dict]] = field(default_factory=dict)  # method -> seed -> finished run's rows, summary
    interrupted: bool = False
    reason: str = ""  # why the methods not run did not run (when not interrupted)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list:
        return list_suites()
    if args.suite in GROUPS:
        return run_group(args, argv)
    return run_one(args, argv)


def run_group(args: argparse.Namespace, argv: list[str]) -> int:
    """Each suite of the group with the same flags, into OUT/<suite>; the worst exit status."""
    base = args.out or Path("results") / "bench" / args.suite
    status = 0
    for name in GROUPS[args.suite]:
        print(f"== suite {name} ({args.suite}: {', '.join(GROUPS[args.suite])})", flush=True)
        status = max(status, run_one(argparse.Namespace(**{**vars(args), "suite": name, "out": base / name}), argv))
    return status


def run_one(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        suite = suite_from_args(args)
    except ValueError as err:
        print(f"fedmud-bench: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # flwr-datasets' plot helper reports an event
    app_dir = app_root(args.app)
    out = prepare_out(args.out, suite)
    command = invocation(argv)
    print(f"{command}: {len(suite.runs)} runs ({', '.join(suite.methods)} x seeds "
          f"{', '.join(map(str, suite.seeds))}) -> {out}", flush=True)
    print(f"suite: {suite.to_dict()}", flush=True)
    started = time.monotonic()
    results = run_suite(suite, app_dir, out, args.run_timeout)
    account_for_unrun(results, suite, out)
    return report(results, suite, command, out, time.monotonic() - started)


def list_suites() -> int:
    for name, members in GROUPS.items():
        print(f"{name}: the suites {', '.join(members)}, one after another")
    for name, suite in SUITES.items():
        print(f"{name}: {suite.to_dict()}")
    for name, overrides in METHODS.items():
        print(f"  {name}: {overrides}")
    return 0


def suite_from_args(args: argparse.Namespace) -> Suite:
    """The suite named by ``--suite`` with the flags given; ValueError for a value the bench cannot run."""
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give --seeds or --seed, not both")
    suite = resolve(
        args.suite,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None,
        rounds=args.rounds,
        supernodes=args.supernodes,
        fraction_train=args.fraction_train,
        min_train_nodes=args.min_train_nodes,
        partition=args.partition,
        alpha=args.alpha,
        dataset=args.dataset,
        model=args.model,
        target=args.target,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seeds=(args.seed,) if args.seed is not None else args.seeds,
        data_seed=args.data_seed,
        up_mbps=args.up_mbps,
        down_mbps=args.down_mbps,
        extra={**SUITES[args.suite].extra, **settings(args.settings)} if args.settings and args.suite in SUITES else None,
    )
    if suite.up_mbps <= 0 or suite.down_mbps <= 0 or suite.rounds < 1 or suite.supernodes < 2:
        raise ValueError("bandwidths must be > 0, rounds >= 1, supernodes >= 2")
    return suite


def prepare_out(given: Path | None, suite: Suite) -> Path:
    """The results directory, cleared of what an earlier invocation of the bench wrote there."""
    out = (given or Path("results") / "bench" / suite.name).resolve()
    for name in OWNED:  # the directory describes one invocation
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_suite(suite: Suite, app_dir: Path, out: Path, run_timeout: float) -> Results:
    """Start the private SuperLink, run every (method, seed) on it, stop it (also on Ctrl-C, SIGTERM, SIGHUP)."""
    results = Results()
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    superlink = PrivateSuperLink(app_dir, out / "logs" / "superlink.log")
    runner = Runner(suite, superlink, app_dir, out, run_timeout)
    problems: dict[str, str] = {}  # method -> why its config is refused, checked once for all seeds
    try:
        superlink.start()
        print(f"SuperLink pid {superlink.pid} (logs/superlink.log); every process the bench starts carries "
              f"{TOKEN_VAR}={superlink.token} and is stopped at the end", flush=True)
        for index, (method, seed) in enumerate(suite.runs):
            if method not in problems:
                problems[method] = config_problem(suite, method, app_dir)
            run_method(runner, index, method, seed, problems[method], results)
    except KeyboardInterrupt:
        results.interrupted = True
        runner.stop_current()
        print("\ninterrupted: stopping the runs", flush=True)
    except Exception as err:  # noqa: BLE001 - e.g. the SuperLink did not start; report what there is
        print(f"fedmud-bench: {err!r}", file=sys.stderr, flush=True)
        results.reason = repr(err)
    finally:
        superlink.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return results


def run_method(runner: Runner, index: int, method: str, seed: int, problem: str, results: Results) -> None:
    """Run one method with one seed unless its config has a ``problem``, read its results; the
    outcome is added to ``results``."""
    from .report import load_run, write_run  # imports torch

    suite, out = runner.suite, runner.out
    if problem:
        run_command = shell_command(flwr_command(suite, method, seed, run_dir(out, method, seed)))
        results.outcomes.append(Outcome(method, seed, run_command, "failed", error=f"not run: {problem}"))
        runner.status(index, method, seed, f"FAILED before starting: {problem}", 0.0)
        return
    outcome = runner.run(index, method, seed)
    results.outcomes.append(outcome)
    if outcome.status == "ok":
        try:
            run = load_run(outcome, suite)
            write_run(run, out)
            results.runs.setdefault(method, {})[seed] = run
        except (OSError, KeyError, ValueError) as err:
            outcome.status, outcome.error = "failed", f"unreadable results in {outcome.run_dir}: {err!r}"


def account_for_unrun(results: Results, suite: Suite, out: Path) -> None:
    """An outcome for every run that did not get to run (interrupted, or the SuperLink failed)."""
    done = {(o.method, o.seed) for o in results.outcomes}
    for method, seed in suite.runs:
        if (method, seed) not in done:
            status = "interrupted" if results.interrupted else "failed"
            error = "interrupted" if results.interrupted else f"not run: {results.reason}"
            command = shell_command(flwr_command(suite, method, seed, run_dir(out, method, seed)))
            results.outcomes.append(Outcome(method, seed, command, status, error=error))


def report(results: Results, suite: Suite, command: str, out: Path, seconds: float) -> int:
    """Write the summary, plots and TensorBoard logs, print the tables; the exit status."""
    from .report import plot_curves, plot_pareto, plot_partition, summarise, table, write_tensorboard

    summary = summarise(suite, results.runs, results.outcomes, command, out)
    if results.runs:
        plot_curves(results.runs, suite, out)
        plot_pareto(summary, suite, out)
        write_tensorboard(results.runs, out)
    try:
        plot_partition(suite, out)
    except Exception as err:  # noqa: BLE001 - a plot must not lose the results
        print(f"fedmud-bench: label distribution plot failed: {err!r}", file=sys.stderr)

    print()
    print("\n".join(table(summary)), flush=True)
    failed = [o for o in results.outcomes if o.status != "ok"]
    for o in failed:
        print(f"{o.status.upper()}: {o.method} seed={o.seed}: {o.error}", flush=True)
    finished = sum(len(by_seed) for by_seed in results.runs.values())
    print(f"{finished}/{len(suite.runs)} runs finished in {duration(seconds)}; "
          f"results in {out} (summary.md)", flush=True)
    if results.interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
