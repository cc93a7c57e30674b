"""Fine-tuning a pretrained model: init-weights as round 0, federated LoRA (lora, ffa-lora) and its
initialisations (Init[A], Init[AB], HRP), the classes filter of the fine-tuning task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmud.config import ConfigError, parse_run_config
from fedmud.data import splits
from fedmud.methods.lora import LoRAAdapter
from fedmud.rounds import ClientModel, ServerModel, SyncError, build_decomposed, simulate_in_process
from fedmud.sync import CHAIN, FULL, Downlink, state_digest

from .conftest import ROOT, finished_run, load_script


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def recurrent() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 24)
            self.rnn = nn.LSTM(24, 24, batch_first=True)
            self.head = nn.Linear(24, 4)

        def forward(self, x):
            return self.head(self.rnn(self.embed(x))[0][:, -1])

    return Net()


MODELS = {"mlp": mlp, "conv": conv_net, "lstm": recurrent}


def lora_run(method: str, **extra) -> object:
    return parse_run_config(
        {"method": method, "lora-rank": 4, "lora-alpha": 8.0, "downlink-codec": "float32", "seed": 3, **extra}
    )


def effective(model) -> dict[str, torch.Tensor]:
    return {n: model.effective_weight(n).detach().clone() for n in model.parametrised_names}


def aggregation_gap(method: str, factory) -> float:
    """Largest |merged weight − weighted mean of the clients' weights| over the adapted tensors,
    relative to the clients' spread, after three clients moved their trained factors apart."""
    run = lora_run(method, init="nonzero")
    server = ServerModel(run, model_fn=factory)
    uploads, weights, clients = [], [3.0, 1.0, 2.0], []
    for i, _ in enumerate(weights):
        client = build_decomposed(run, model_fn=factory)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in client.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        clients.append(effective(client))
        uploads.append((server.codec.layout.flatten(client.uploaded_state()), weights[i]))
    server.merge_round(1, 11, uploads)
    merged = effective(server.model)
    total = sum(weights)
    gap = spread = 0.0
    for name, value in merged.items():
        mean = sum(w * c[name] for w, c in zip(weights, clients)) / total
        gap = max(gap, (value - mean).abs().max().item())
        spread = max(spread, max((c[name] - mean).abs().max().item() for c in clients))
    return gap / spread


@pytest.mark.parametrize("factory", MODELS.values(), ids=MODELS.keys())
def test_ffa_lora_merges_to_the_weighted_mean_of_the_clients_models(factory):
    assert aggregation_gap("ffa-lora", factory) < 1e-5


@pytest.mark.parametrize("factory", MODELS.values(), ids=MODELS.keys())
def test_lora_averages_factors_so_its_merge_is_not_the_mean_of_the_clients_models(factory):
    """FedIT's mean(B)·mean(A) ≠ mean(B·A): the gap is a sizeable part of the clients' spread."""
    assert aggregation_gap("lora", factory) > 0.05


def test_adapters_train_and_upload_only_their_factors_the_pretrained_weight_stays():
    run = lora_run("lora")
    model = build_decomposed(run, model_fn=mlp)
    uploaded = set(model.uploaded_state())
    assert {"0.weight.A", "0.weight.B", "2.weight.A", "2.weight.B", "4.weight"} <= uploaded
    assert "0.weight" not in uploaded and "0.weight" in model.global_state()
    assert not model.base_weight("0.weight").requires_grad
    ffa = build_decomposed(lora_run("ffa-lora"), model_fn=mlp)
    assert "0.weight.A" not in ffa.uploaded_state() and "0.weight.A" in ffa.global_state()
    assert not ffa.parametrisations()["0.weight"].A.requires_grad


@pytest.mark.parametrize("init", ["zero", "nonzero"])
def test_init_a_starts_at_the_pretrained_weights_and_init_ab_keeps_a_small_initial_product(init):
    run = lora_run("lora", init=init, **{"lora-init-scale": 0.1})
    model = build_decomposed(run, model_fn=lambda: nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 4)))
    adapter = model.parametrisations()["0.weight"]
    delta = adapter.delta_weight()
    if init == "zero":
        assert adapter.A.abs().sum() > 0 and torch.count_nonzero(adapter.B) == 0 and torch.count_nonzero(delta) == 0
    else:  # (α/r)·B·A has lora-init-scale × the std of PyTorch's default init of W, 1/sqrt(3·fan_in)
        assert delta.std().item() == pytest.approx(0.1 / math.sqrt(3 * 256), rel=0.15)


# --- pretrained weights as round 0 -------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two different 'pretrained' CNN state_dicts (weights far from the seed's init)."""
    from fedmud.models import build_model

    paths = []
    for i in range(2):
        torch.manual_seed(50 + i)
        model = build_model("cnn-mnist")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.01)
        path = tmp_path_factory.mktemp("weights") / f"cnn-{i}.pt"
        torch.save(model.state_dict(), path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("method", ["fedmud", "lora", "ffa-lora", "fedavg"])
def test_every_party_starts_from_the_pretrained_weights_and_agrees_on_the_digest(pretrained, method):
    run = parse_run_config({"method": method, "init-weights": str(pretrained[0])})
    server, client = ServerModel(run), ClientModel(run, torch.device("cpu"))
    file = torch.load(pretrained[0], weights_only=True)
    assert torch.equal(server.global_state()["classifier.weight"], file["classifier.weight"])
    assert torch.equal(server.global_state()["features.4.weight"], file["features.4.weight"])
    assert state_digest(client.initial_state) == server.digest
    assert server.digest != ServerModel(parse_run_config({"method": method})).digest
    client.sync(None, Downlink(CHAIN, 0, 0, digest=server.digest))  # round 0 from its own file: the digest holds


def test_a_client_whose_file_differs_fails_the_digest_and_syncs_with_the_full_model(pretrained):
    server = ServerModel(parse_run_config({"method": "lora", "init-weights": str(pretrained[0])}))
    other = ClientModel(parse_run_config({"method": "lora", "init-weights": str(pretrained[1])}), torch.device("cpu"))
    with pytest.raises(SyncError, match="digest"):
        other.sync(None, Downlink(CHAIN, 0, 0, digest=server.digest))
    state = other.sync(None, server.downlink(Downlink(FULL, 0), 1))
    assert state_digest(state) == server.digest


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("features.8.weight"), "'features.8.weight' is missing from the file"),
        (lambda s: s.__setitem__("features.4.weight", torch.zeros(64, 32, 5, 5)), "'features.4.weight' has shape (64, 32, 5, 5)"),
        (lambda s: s.__setitem__("head.weight", torch.zeros(3)), "'head.weight' is in the file but not in the model"),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_a_mismatched_init_weights_file_stops_naming_the_file_and_the_first_mismatching_tensor(
    pretrained, tmp_path, change, named
):
    state = torch.load(pretrained[0], weights_only=True)
    change(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        ServerModel(parse_run_config({"method": "lora", "init-weights": str(path)}))
    assert str(err.value).startswith(f"init-weights={str(path)!r} does not match the model: {named}")


def test_a_missing_or_unreadable_init_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"init-weights='.*nowhere\.pt' is not allowed: no such file"):
        ServerModel(parse_run_config({"init-weights": str(tmp_path / "nowhere.pt")}))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt' is not allowed: it is not a state_dict torch\.load can read"):
        ServerModel(parse_run_config({"init-weights": str(junk)}))


# --- high-rank preheating for LoRA ---------------------------------------------------------------


def test_hrp_truncation_recovers_the_top_r_subspace_of_a_known_update():
    torch.manual_seed(0)
    m, n, big, r = 40, 30, 12, 4
    config = lora_run("lora", init="hrp", **{"hrp-rank": big}).decomposition
    adapter = LoRAAdapter((m, n), big, config, torch.device("cpu"))
    u, _ = torch.linalg.qr(torch.randn(m, big, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, big, dtype=torch.float64))
    sigma = torch.tensor([5.0, 4.0, 3.0, 2.5, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    delta = u @ torch.diag(sigma) @ v.T
    with torch.no_grad():  # any factorisation whose product is the known update
        adapter.B.copy_((u * sigma / adapter.scale).float())
        adapter.A.copy_(v.T.float())
    adapter.truncate()
    assert adapter.rank == r and adapter.A.shape == (r, n) and adapter.B.shape == (m, r)
    best = u[:, :r] @ torch.diag(sigma[:r]) @ v[:, :r].T  # Eckart–Young
    assert torch.allclose(adapter.delta_weight().double(), best, atol=1e-5)
    got_u = torch.linalg.qr(adapter.B.detach().double())[0]
    got_v = torch.linalg.qr(adapter.A.detach().double().T)[0]
    # the principal angles between the recovered and the true top-r subspaces are ~0
    assert torch.linalg.svdvals(u[:, :r].T @ got_u).min() > 1 - 1e-6
    assert torch.linalg.svdvals(v[:, :r].T @ got_v).min() > 1 - 1e-6
    assert (delta - adapter.delta_weight().double()).norm() == pytest.approx(sigma[r:].norm().item(), rel=1e-4)


def test_hrp_lora_switches_rank_after_the_preheat_and_a_client_that_missed_it_syncs_by_chain():
    run = parse_run_config(
        {"method": "lora", "init": "hrp", "hrp-rounds": 1, "hrp-rank": 16, "lora-rank": 4, "num-partitions": 2,
         "local-epochs": 1, "num-server-rounds": 3, "classes": "5-9", "test-fraction": 0.1}
    )
    server, history, uploaded, _ = simulate_in_process(run)
    assert uploaded[0] > uploaded[1] == uploaded[2]  # the preheat's rank-16 adapters, then rank 4
    assert all(a.rank == a.final_rank for a in server.model.parametrisations().values())
    late = ClientModel(run, torch.device("cpu"))  # holds round 0: the chain crosses the switch
    server.link_bytes, server.full_bytes = 1, 10**9  # chains are cheaper than the full model
    plan = server.plan("never-seen")
    assert plan.kind == CHAIN and len(plan.links) == 3 and plan.links[0].basis is not None
    state = late.sync(None, server.downlink(plan, server.round + 1))
    assert state_digest(state) == server.digest
    resumed = ServerModel(run)
    resumed.load_state_dict(server.state_dict())  # a checkpoint after the switch
    assert resumed.digest == server.digest and 2 * resumed.codec.payload_nbytes == uploaded[-1]
    assert history[-1] > 0.5


# --- configuration and the fine-tuning task ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "lora", "init": "nonzero-compensated"}, "init='nonzero-compensated' is not allowed with method='lora'; choose one of auto, zero, nonzero, hrp"),
        ({"method": "ffa-lora", "init": "hrp"}, "init='hrp' is not allowed with method='ffa-lora'; choose one of auto, zero, nonzero"),
        ({"method": "lora", "init": "hrp", "hrp-rank": 8}, "hrp-rank=8 is not allowed with lora-rank=8"),
        ({"method": "lora", "lora-rank": 0}, "lora-rank=0 is not allowed; it must be an integer >= 1"),
        ({"method": "lora", "lora-alpha": 0}, "lora-alpha=0 is not allowed; it must be a number >= 0.001"),
        ({"classes": "9-5"}, "classes='9-5' is not allowed"),
        ({"classes": "a"}, "classes='a' is not allowed"),
    ],
)
def test_bad_fine_tuning_keys_are_refused_naming_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        parse_run_config(overrides)
    assert message in str(err.value)


def test_init_auto_is_init_a_for_the_lora_methods_and_fedmuds_default_for_fedmud():
    assert parse_run_config({"method": "lora", "init": "auto"}).decomposition.init == "zero"
    assert parse_run_config({"method": "lora"}).decomposition.init == "zero"
    assert parse_run_config({"method": "ffa-lora", "init": "auto"}).decomposition.init == "zero"
    assert parse_run_config({"method": "fedmud", "init": "auto"}).decomposition.init == "nonzero-compensated"


def test_classes_keep_only_those_labels_in_train_and_test():
    train, test = splits(parse_run_config({"classes": "5-7,9"}).data)
    assert set(np.unique(train.labels)) == {5, 6, 7, 9} == set(np.unique(test.labels))
    full_train, _ = splits(parse_run_config({}).data)
    assert len(train.labels) == int(np.isin(full_train.labels, [5, 6, 7, 9]).sum())
    with pytest.raises(ConfigError, match="classes='12' is not allowed with dataset='mnist5k': its labels are 0-9"):
        splits(parse_run_config({"classes": "12"}).data)


@pytest.mark.integration
@pytest.mark.parametrize("init, rank", [("nonzero", 4), ("hrp", 16)])
def test_lora_fine_tunes_a_pretrained_model_through_the_flower_simulation(
    simulation_superlink, tmp_path, pretrained, init, rank
):
    """The real apps: init-weights on every party, rank-4 adapters (hrp: rank 16 in round 1, then
    the top-4 SVD rides on round 1's link), digits 5-9 only."""
    run = finished_run(
        simulation_superlink,
        tmp_path,
        f'method="lora" lora-rank=4 hrp-rank=16 init="{init}" init-weights="{pretrained[0]}" classes="5-9" '
        'num-server-rounds=3 local-epochs=1 lr=0.05',
    )
    assert f"features.8.weight (128, 64, 3, 3): lora rank {rank}, trains B 384x{rank}, A {rank}x192" in run["output"]
    rows = run["results"]
    assert all(r["accepted"] == 3 and r["resync"] == 0 for r in rows[1:])  # every client reached the digest
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    uploads = {}
    for record in run["ledger"]["records"]:
        if record["direction"] == "up":
            uploads.setdefault(record["round"], set()).add(record["bytes"])
    assert max(max(b) for b in uploads.values()) < run["ledger"]["dense_up_bytes"] / 10
    if init == "hrp":  # the preheat's rank-16 uploads, then rank 4
        assert min(uploads[1]) > 2 * max(uploads[3])


def test_a_checkpoint_from_before_the_fine_tuning_keys_resumes_and_another_init_weights_does_not():
    from dataclasses import asdict

    from fedmud.checkpoint import config_differences

    now = asdict(parse_run_config({}))
    old = asdict(parse_run_config({}))
    del old["init_weights"], old["data"]["classes"], old["decomposition"]["lora_rank"]
    assert config_differences(old, now) == []
    old["task"] = old["data"].pop("task")  # made when the task key was not in the data section
    assert config_differences(old, now) == []
    old["task"] = "regression"
    assert config_differences(old, now) == ["task='regression' (this run: 'classification')"]
    other = asdict(parse_run_config({"init-weights": "/models/a.pt"}))
    assert config_differences(other, now) == ["init-weights='/models/a.pt' (this run: '')"]


def test_adam_trains_the_adapters_and_an_unknown_optimizer_is_refused():
    from fedmud.training import train_local

    run = lora_run("lora", optimizer="adam", lr=0.01, **{"local-epochs": 1})
    model = build_decomposed(run, model_fn=mlp)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = torch.utils.data.TensorDataset(torch.randn(32, 20), torch.randint(0, 4, (32,)))
    train_local(model, torch.utils.data.DataLoader(data, batch_size=8), run.train, torch.device("cpu"))
    # Adam's first steps move every trained tensor by about lr, B = 0 included
    assert all((p.detach() - before[n]).abs().max() > 1e-3 for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="optimizer='adamw' is not allowed; choose one of sgd, adam"):
        parse_run_config({"optimizer": "adamw"})


def test_a_diverged_client_is_left_out_of_an_in_process_round_as_the_strategy_leaves_it_out():
    run = parse_run_config(
        {"method": "fedavg", "lr": 1e6, "num-partitions": 2, "local-epochs": 1, "classes": "5-9", "num-server-rounds": 2}
    )
    server, history, uploaded, _ = simulate_in_process(run)  # every reply is non-finite: both rounds are skipped
    assert server.round == 2 and history[0] == history[1] == history[2]
    assert uploaded == [2 * server.codec.payload_nbytes] * 2  # refused replies still crossed the network


def test_lora_adapts_a_head_tied_to_the_token_embedding_and_keeps_an_untied_head_dense():
    transformers = pytest.importorskip("transformers")
    from fedmud.mud import decompose

    def gpt2(tied: bool):
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=32, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=tied,
        )
        return transformers.GPT2LMHeadModel(config)

    tied = decompose(gpt2(True), lora_run("lora").decomposition)
    assert "transformer.wte.weight" in tied.parametrised_names  # the head is this embedding: adapted
    assert not [t for t in tied.plan.tensors if t.reason.startswith("dense-layers")]
    untied = decompose(gpt2(False), lora_run("lora").decomposition)
    reasons = {t.name: t.reason for t in untied.plan.tensors}
    assert reasons["lm_head.weight"] == "dense-layers: last"  # a head of its own is trained in full


@pytest.mark.parametrize("arm", ["cnn-mnist", "vit", "cnn-mnist-adam", "lm", "lm-codecs", "cnn-codecs"])
def test_every_run_of_the_fine_tuning_study_is_a_valid_run_config(arm, monkeypatch):
    """scripts/finetune_study.py's methods over each arm's keys parse (a key renamed or a value refused
    fails here, not half an hour into the study)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    study = load_script("scripts/finetune_study.py")
    arm_spec = study.ARMS[arm]
    for method in arm_spec["methods"]:
        job = {
            "arm": arm, "model": arm_spec["model"], "optimizer": arm_spec["optimizer"], "method": method,
            "partition": arm_spec["partitions"][0], "lr": arm_spec["lrs"][0], "seed": 0, "rounds": arm_spec["rounds"],
            "weights": "pretrained.pt", **{k: arm_spec[k] for k in ("config", "metric") if k in arm_spec},
        }
        run = parse_run_config(study.run_config(job))
        assert run.decomposition.method == study.METHODS[method]["method"]
