"""examples/custom-app: a Flower app with its own model and data, run for real through Flower's simulation."""

import io
import zipfile

import pytest

from fedmud.config import parse_run_config

from .conftest import ROOT, app_config, assert_uploads_within_ratio, finished_run

pytestmark = pytest.mark.integration

APP = ROOT / "examples" / "custom-app"


@pytest.fixture(scope="module")
def example_run(simulation_superlink, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("example-runs")
    return finished_run(simulation_superlink, run_dir, "num-server-rounds=2", app=str(APP.relative_to(ROOT)))


def test_example_trains_its_own_model_on_its_own_data(example_run):
    rows = example_run["results"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == 3 and r["rejected"] == 0 for r in rows[1:])
    # 10 classes: chance is 0.1. Two rounds of one local epoch measured 0.92-0.94 (seeds 0-2).
    assert rows[-1]["accuracy"] > 0.6
    assert example_run["summary"]["final_accuracy"] == rows[-1]["accuracy"]
    assert example_run["summary"]["rounds"] == 2
    assert "FINAL accuracy" in example_run["output"]
    assert example_run["summary"]["model"] == "custom_app.task:make_model"  # the app's own, not the config's


def test_example_uploads_are_within_the_ratio_bound(example_run):
    assert_uploads_within_ratio(APP, example_run["ledger"], uploads=3 * 2)  # clients x rounds


def test_example_config_is_valid_and_leaves_out_the_data_and_model_keys():
    config = app_config(APP)
    parse_run_config(config)  # raises ConfigError on a bad value
    assert not {"model", "dataset", "task"} & set(config)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec and click, inside Flower
def test_example_builds_into_a_fab_of_only_its_sources():
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import is_valid_name

    assert is_valid_name(APP.name)[0]  # `flwr build` refuses other directory names
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(APP))).namelist())
    sources = {"pyproject.toml", "README.md", *(f"custom_app/{p.name}" for p in (APP / "custom_app").glob("*.py"))}
    assert names - {".info/CONTENT"} == sources
