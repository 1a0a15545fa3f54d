"""The network's parts: fusions, LSTM pooling, modality dropout, and the network as a part."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats
from support.reference import REPO

from emimimic.constants import STEPS
from emimimic.errors import ConfigError
from emimimic.models import EMINetwork, FusionInput, build_network, drop_modalities
from emimimic.models.branches import LSTMPooling
from emimimic.models.fusion import available_fusions, fusion_class
from emimimic.models.fusion.gated import GatedFusion
from emimimic.models.fusion.text_query import TextQueryFusion

TARGETS = [f"t{k}" for k in range(5)]
DIMS = {"visual": 7, "audio": 11, "text": 13}


def _steps(batch: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, STEPS, hidden, generator=g) for m in DIMS}


def _present(batch: int) -> dict[str, torch.Tensor]:
    """Every combination of absent modalities across the clips (never all three absent)."""
    rows = [(v, a, t) for v in (0, 1) for a in (0, 1) for t in (0, 1) if v or a or t]
    rows = (rows * batch)[:batch]
    mask = torch.tensor(rows, dtype=torch.bool)
    return {m: mask[:, i] for i, m in enumerate(DIMS)}


def test_fusions_are_found_by_name_and_by_class_path():
    assert available_fusions() == ["average", "concat", "gated", "text_query"]
    assert fusion_class("gated") is GatedFusion
    assert fusion_class("emimimic.models.fusion.text_query.TextQueryFusion") is TextQueryFusion
    with pytest.raises(ConfigError, match="not a built-in fusion"):
        fusion_class("sum")
    with pytest.raises(ConfigError, match="cannot import"):
        fusion_class("no_such_package.Fusion")
    with pytest.raises(ConfigError, match="not a subclass"):
        fusion_class("torch.nn.Linear")
    with pytest.raises(ConfigError, match="heads"):
        EMINetwork(DIMS, TARGETS, fusion="text_query", fusion_args={"heds": 2})


def test_text_query_equals_a_per_clip_loop_over_multihead_attention():
    torch.manual_seed(0)
    hidden, batch = 16, 7
    fusion = TextQueryFusion(list(DIMS), hidden, len(TARGETS), dropout=0.0, heads=4).eval()
    steps = _steps(batch, hidden, seed=1)
    present = _present(batch)
    embeddings = {m: torch.randn(batch, hidden) for m in DIMS}
    with torch.no_grad():
        got = fusion(FusionInput(embeddings, present, steps)).fused
    assert got.shape == (batch, hidden * 3)
    for b in range(batch):
        query = steps["text"][b] if present["text"][b] else (
            fusion.tokens["text"].detach().expand(STEPS, -1))
        parts = [embeddings["text"][b]]
        for m in ("visual", "audio"):
            # the same weights in a plain MultiheadAttention, one clip at a time, no masks
            attention = torch.nn.MultiheadAttention(hidden, 4, batch_first=True)
            attention.load_state_dict(fusion.attention[m].state_dict())
            keys = steps[m][b] if present[m][b] else fusion.tokens[m].detach()[None]
            with torch.no_grad():
                out, _ = attention(query[None], keys[None], keys[None])
                parts.append(fusion.norm[m](query[None] + out).mean(dim=1)[0])
        torch.testing.assert_close(got[b], torch.cat(parts), atol=1e-5, rtol=1e-5)


def test_text_query_needs_text_and_another_modality():
    with pytest.raises(ConfigError, match="needs text"):
        EMINetwork({"audio": 5, "visual": 4}, TARGETS, fusion="text_query", vad=False)
    with pytest.raises(ConfigError, match="needs text"):
        EMINetwork({"text": 5}, TARGETS, fusion="text_query", vad=False)
    with pytest.raises(ConfigError, match="divide"):
        EMINetwork(DIMS, TARGETS, fusion="text_query", fusion_args={"heads": 3}, hidden=32)


def test_gated_weights_are_a_distribution_over_the_present_modalities():
    torch.manual_seed(1)
    hidden, batch = 16, 11
    fusion = GatedFusion(list(DIMS), hidden, len(TARGETS), dropout=0.0)
    present = _present(batch)
    present["text"][-1] = present["audio"][-1] = present["visual"][-1] = False  # none at all
    embeddings = {m: torch.randn(batch, hidden) * 3 for m in DIMS}
    out = fusion(FusionInput(embeddings, present))
    weights = torch.stack([out.weights[m] for m in DIMS], dim=-1)  # [B, K, M]
    assert weights.shape == (batch, len(TARGETS), 3)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, len(TARGETS)))
    mask = torch.stack([present[m] for m in DIMS], dim=-1)
    has_any = mask.any(-1)
    # a modality a clip lacks gets exactly no weight, the others some
    assert (weights[has_any][~mask[has_any][:, None, :].expand(-1, len(TARGETS), -1)] == 0).all()
    assert (weights[has_any][mask[has_any][:, None, :].expand(-1, len(TARGETS), -1)] > 0).all()
    # the fused input of target k is the weighted sum of the embeddings
    z = torch.stack([embeddings[m] for m in DIMS], dim=1)
    torch.testing.assert_close(out.fused, torch.einsum("bkm,bmh->bkh", weights, z))
    # a clip with none of the modalities weighs all of them (their learned embeddings)
    assert (weights[-1] > 0).all()


def test_gated_network_returns_per_target_weights_and_predictions():
    torch.manual_seed(2)
    net = EMINetwork(DIMS, TARGETS, fusion="gated", hidden=16).eval()
    features = {m: torch.randn(5, STEPS, d).half() for m, d in DIMS.items()}
    present = _present(5)
    with torch.no_grad():
        out = net.forward_dense(features, present)
        z = torch.stack([out.embeddings[m] for m in DIMS], dim=1)
        w = torch.stack([out.weights[m] for m in DIMS], dim=-1)
        head = net.head(torch.einsum("bkm,bmh->bkh", w, z))  # [B, K, K]
    assert out.pred.shape == (5, len(TARGETS)) and out.pred.is_contiguous()
    torch.testing.assert_close(out.pred, head.diagonal(dim1=1, dim2=2))


def test_lstm_pooling_is_the_last_state_of_a_two_layer_lstm():
    torch.manual_seed(3)
    pool = LSTMPooling(8, dropout=0.0).eval()
    seq = torch.randn(4, 20, 8)
    reference = torch.nn.LSTM(8, 8, num_layers=2, batch_first=True)
    reference.load_state_dict(pool.lstm.state_dict())
    out, _ = reference(seq)
    torch.testing.assert_close(pool(seq), out[:, -1])


# --- modality dropout --------------------------------------------------------------------------


def _all_present(n: int, names=("visual", "audio", "text")) -> dict[str, torch.Tensor]:
    return {m: torch.ones(n, dtype=torch.bool) for m in names}


def _binomial_ok(successes: int, trials: int, p: float) -> bool:
    """Whether ``successes`` lies in the two-sided 99.9% interval of Binomial(trials, p)."""
    low, high = stats.binom.interval(0.999, trials, p)
    return low <= successes <= high


def test_modality_dropout_never_drops_every_modality_of_a_clip():
    g = torch.Generator().manual_seed(0)
    present = _present(4000)
    kept = drop_modalities(present, dict.fromkeys(DIMS, 0.9), generator=g)
    has = torch.stack([present[m] for m in DIMS], 1)
    left = torch.stack([kept[m] for m in DIMS], 1)
    assert left.any(1).all()  # every clip keeps one
    assert not (left & ~has).any()  # and never gains one it lacks
    assert (left.sum(1) < has.sum(1)).float().mean() > 0.5  # yet drops plenty


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_modality_dropout_drops_at_its_rate(p):
    n = 20000
    kept = drop_modalities(_all_present(n), dict.fromkeys(DIMS, p),
                           generator=torch.Generator().manual_seed(1))
    # a clip that drew all three keeps one of them: the rate is p - p^3 / 3
    expected = p - p ** 3 / 3
    for m in DIMS:
        dropped = int((~kept[m]).sum())
        assert _binomial_ok(dropped, n, expected), (m, dropped / n, expected)
    # and with one modality that is never dropped, the others drop at exactly p
    rates = {"visual": p, "audio": p, "text": 0.0}
    kept = drop_modalities(_all_present(n), rates, generator=torch.Generator().manual_seed(2))
    assert kept["text"].all()
    for m in ("visual", "audio"):
        assert _binomial_ok(int((~kept[m]).sum()), n, p), m


def test_modality_dropout_acts_in_training_only_and_through_the_missing_path():
    torch.manual_seed(4)
    net = EMINetwork(DIMS, TARGETS, hidden=16, modality_dropout={"audio": 0.5, "visual": 0.5})
    features = {m: torch.randn(64, STEPS, d).half() for m, d in DIMS.items()}
    net.eval()
    with torch.no_grad():
        a, b = net.forward_dense(features), net.forward_dense(features)
    torch.testing.assert_close(a.pred, b.pred)  # no dropout in eval
    assert all(p.all() for p in a.present.values())
    net.train()
    out = net.forward_dense(features)
    assert out.present["text"].all()  # rate 0 for text
    for m in ("visual", "audio"):
        dropped = ~out.present[m]
        assert 10 < int(dropped.sum()) < 54
        # a dropped clip gets the branch's learned missing embedding, as an absent one
        missing = net.branches[m].missing_embedding.expand(int(dropped.sum()), -1)
        torch.testing.assert_close(out.embeddings[m][dropped], missing)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        EMINetwork(DIMS, TARGETS, modality_dropout=1.0)
    with pytest.raises(ConfigError, match="modalities"):
        EMINetwork({"text": 4}, TARGETS, vad=False, modality_dropout={"audio": 0.1})


# --- the network as a part ---------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """A network of the contract's shape, outside EMINetwork."""

    def __init__(self, dims, targets, width: int = 4, names: list[str] | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(sum(dims.values()), len(targets))
        self.width, self.names = width, names


def test_build_network_records_a_spec_that_rebuilds_the_same_network():
    dims = {"text": 6, "audio": 3}
    for factory in (EMINetwork, functools.partial(EMINetwork, fusion="gated", pooling="lstm"),
                    {"class_path": "emimimic.models.EMINetwork",
                     "init_args": {"fusion": "gated", "pooling": "lstm"}}):
        net, spec = build_network(factory, dims, TARGETS)
        assert spec["class_path"] == "emimimic.models.network.EMINetwork"
        # every option, defaults filled in, so a later default change cannot alter the model
        assert set(spec["init_args"]) == {"fusion", "fusion_args", "pooling", "temporal", "vad",
                                          "hidden", "dropout", "modality_dropout",
                                          "compile_windows"}
        again, spec2 = build_network(spec, dims, TARGETS)
        assert spec2 == spec
        assert {k: v.shape for k, v in again.state_dict().items()} == {
            k: v.shape for k, v in net.state_dict().items()}
    net, spec = build_network(functools.partial(TinyNet, width=9, names=["a"]), dims, TARGETS)
    assert spec == {"class_path": f"{__name__}.TinyNet",
                    "init_args": {"width": 9, "names": ["a"]}}
    with pytest.raises(ConfigError, match="plain values"):
        build_network(functools.partial(TinyNet, names=[object()]), dims, TARGETS)
    with pytest.raises(ConfigError, match="not a built module"):
        build_network(TinyNet(dims, TARGETS), dims, TARGETS)
    with pytest.raises(ConfigError, match="PYTHONPATH"):
        build_network({"class_path": "nowhere.Net"}, dims, TARGETS)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_network({"class_path": f"{__name__}.TinyNet", "init_args": {"depth": 2}}, dims,
                      TARGETS)


def test_models_import_neither_lightning_nor_the_data_package():
    offenders = []
    for path in (REPO / "emimimic" / "models").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(from|import)\s+(lightning|pytorch_lightning|emimimic\.data)\b",
                        line):
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert offenders == []
    contract = (REPO / "emimimic" / "contract.py").read_text()
    assert "lightning" not in contract and "emimimic.data" not in contract


def test_pearson_has_one_definition():
    """Only training/correlation.py turns moments into r; the rest accumulate moments."""
    pattern = re.compile(r"corrcoef|pearsonr|cov\s*/|/\s*denom|sqrt\(var")
    found = []
    for path in (REPO / "emimimic").rglob("*.py"):
        if path.name == "correlation.py":
            continue
        found += [f"{path.relative_to(REPO)}:{n}" for n, line in
                  enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


@pytest.mark.parametrize("fusion", ["text_query", "gated"])
@pytest.mark.parametrize("pooling", ["mean", "lstm"])
def test_new_parts_train_and_score_on_a_real_batch(fusion, pooling):
    """One optimizer step on every part combination moves the loss (no dead parameters)."""
    from emimimic.training.losses import EMILoss

    torch.manual_seed(5)
    net = EMINetwork(DIMS, TARGETS, fusion=fusion, pooling=pooling, hidden=16,
                     modality_dropout=0.2)
    features = {m: torch.randn(16, STEPS, d).half() for m, d in DIMS.items()}
    target = torch.rand(16, len(TARGETS))
    out = net.forward_dense(features)
    loss = EMILoss()(out, target)["loss"]
    loss.backward()
    stuck = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    # only the missing tokens/embeddings of modalities nobody lacked may lack a gradient
    assert all("missing" in n or "tokens" in n for n in stuck), stuck
    assert math.isfinite(float(loss))
    assert np.isfinite(out.pred.detach().numpy()).all()
