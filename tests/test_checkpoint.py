"""What a resume refuses: a checkpoint that would run code, is damaged, or holds non-finite weights;
pretrained weights that are not finite; and a new run never writes into another run's directory."""

import os
import time
from datetime import datetime, timedelta

import pytest
import torch

from fedmud.checkpoint import CHECKPOINT, content_digest, load_checkpoint, save_checkpoint
from fedmud.config import ConfigError, parse_run_config
from fedmud.ledger import Ledger
from fedmud.models import build_model
from fedmud.rounds import ServerModel

RUN = parse_run_config({})


@pytest.fixture(scope="module")
def server():
    return ServerModel(RUN)


@pytest.fixture
def checkpoint(tmp_path, server):
    """An intact checkpoint of a fresh run in ``tmp_path``; returns its path."""
    return save_checkpoint(tmp_path, server, Ledger(), [{"round": 0, "accuracy": 0.1, "loss": 2.3, "wall_s": 1.0}])


def _refused(run_dir, what: str) -> str:
    """The message a resume from ``run_dir`` is refused with; it names the file, then ``what``."""
    with pytest.raises(ConfigError) as err:
        load_checkpoint(run_dir, RUN)
    message = str(err.value)
    assert message.startswith(f"resume={str(run_dir)!r} is not allowed; its checkpoint {str(run_dir / CHECKPOINT)!r} {what}")
    return message


def _rewrite(path, change) -> None:
    """``change`` the checkpoint just written and save it again (without a new digest)."""
    state = torch.load(path, weights_only=False)  # this test's own file
    change(state)
    torch.save(state, path)


class _Planted:
    """What an attacker plants: unpickling it creates the directory ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "the-planted-code-ran"
    _rewrite(checkpoint, lambda state: state["history"].append(_Planted(marker)))
    message = _refused(tmp_path, "refers to posix.mkdir, which a checkpoint never holds")
    assert "nothing in it was run" in message
    assert not marker.exists()


def test_a_flipped_byte_in_a_checkpoints_weights_is_refused(checkpoint, server, tmp_path):
    data = bytearray(checkpoint.read_bytes())
    weight = server.global_state()["features.0.weight"]
    at = bytes(data).find(weight.numpy().tobytes()[:64])
    assert at > 0
    data[at + 5] ^= 0x01  # one bit of one weight
    checkpoint.write_bytes(bytes(data))
    _refused(tmp_path, "does not match its digest: it was changed or damaged after it was written")


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor_even_with_a_matching_digest(checkpoint, tmp_path):
    def poison(state):
        state["server"]["global_state"]["features.4.weight"].view(-1)[7] = float("nan")
        state["digest"] = content_digest({k: v for k, v in state.items() if k != "digest"})

    _rewrite(checkpoint, poison)
    _refused(tmp_path, "holds non-finite values in global_state['features.4.weight']")


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda path: path.write_bytes(b""), "is empty"),
        (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
         "cannot be read: it is truncated or not a checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive"),
        (lambda path: path.write_bytes(b"not a checkpoint at all\n" * 10),
         "cannot be read: it is truncated or not a checkpoint (UnpicklingError: Unsupported operand"),
        (lambda path: _rewrite(path, lambda state: state.pop("rng")), "lacks 'rng'"),
        (lambda path: _rewrite(path, lambda state: state["server"].pop("global_state")), "lacks 'server.global_state'"),
    ],
    ids=["empty", "truncated", "garbage", "missing-key", "missing-weights"],
)
def test_a_damaged_checkpoint_is_refused_with_one_message_naming_the_file_and_what_is_wrong(
    checkpoint, tmp_path, damage, what
):
    damage(checkpoint)
    message = _refused(tmp_path, what)
    assert message.endswith("Resume from an intact checkpoint, or start a new run")


def test_a_new_run_never_writes_into_another_runs_directory_started_in_the_same_second(server, tmp_path):
    from server.app import _start

    # another run holds the directory of this second and of the next ones
    now = datetime.now()
    taken = [tmp_path / (now + timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S") for s in range(30)]
    for other in taken:
        other.mkdir()
        (other / CHECKPOINT).write_bytes(b"another run's")
    started = time.monotonic()
    run_dir, *_ = _start(parse_run_config({"run-dir": str(tmp_path)}), server)
    assert time.monotonic() - started < 30  # it started within the seconds taken
    assert run_dir.parent == tmp_path and run_dir.name in {f"{other.name}-1" for other in taken}
    assert list(run_dir.iterdir()) == []
    assert all((other / CHECKPOINT).read_bytes() == b"another run's" for other in taken)


# ------------------------------------------------------------------------- pretrained weights
@pytest.mark.parametrize(
    ("poison", "nan"),
    [
        (lambda t: t.view(-1).__setitem__(3, float("nan")), "1 NaN"),
        (lambda t: t.view(-1).__setitem__(3, float("-inf")), "0 NaN"),
        (lambda t: t.view(-1).__setitem__(3, 1e300), "0 NaN"),
    ],
    ids=["nan", "inf", "float64-1e300"],
)
def test_pretrained_weights_that_are_not_finite_in_the_models_dtype_are_refused_naming_the_tensor(
    tmp_path, poison, nan
):
    state = build_model("cnn-mnist").state_dict()
    state["features.4.weight"] = state["features.4.weight"].double()  # in the file 1e300 is finite
    poison(state["features.4.weight"])
    path = tmp_path / "pretrained.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        ServerModel(parse_run_config({"init-weights": str(path)}))
    assert str(err.value) == (
        f"init-weights={str(path)!r} is not allowed: 'features.4.weight' holds 1 non-finite of its "
        f"{state['features.4.weight'].numel()} values ({nan}) as torch.float32, the model's dtype; allowed: finite weights"
    )
