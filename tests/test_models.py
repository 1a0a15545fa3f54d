"""Tests of the EMI network: shapes, fusion, pooling, VAD latent, missing modalities, size."""

import itertools

import pytest
import torch

from emimimic.constants import MODALITIES, STEPS
from emimimic.models import AudioVADBranch, EMINetwork, ModalityBranch

ODD_DIMS = {"visual": 7, "audio": 11, "text": 13}


def _batch(dims: dict[str, int], b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, STEPS, d, generator=g).half() for m, d in dims.items()}


@pytest.mark.parametrize(
    ("fusion", "temporal", "pooling", "vad"),
    list(
        itertools.product(
            ("concat", "average"), (False, True), ("mean", "attention"), (False, True)
        )
    ),
)
def test_output_shapes_for_every_configuration(fusion, temporal, pooling, vad):
    torch.manual_seed(0)
    net = EMINetwork(
        ODD_DIMS, num_targets=5, fusion=fusion, pooling=pooling, temporal=temporal, vad=vad
    )
    out = net(_batch(ODD_DIMS))
    assert out.pred.shape == (3, 5)
    assert out.pred.dtype == torch.float32
    assert set(out.aux) == set(MODALITIES)
    assert all(a.shape == (3, 5) for a in out.aux.values())
    assert all(e.shape == (3, 256) for e in out.embeddings.values())
    assert ((out.pred >= 0) & (out.pred <= 1)).all()
    if vad:
        assert out.vad.shape == (3, 3)
        assert isinstance(net.branches["audio"], AudioVADBranch)
    else:
        assert out.vad is None
        assert type(net.branches["audio"]) is ModalityBranch
    fused = net.head[0].normalized_shape[0]
    assert fused == (256 * 3 if fusion == "concat" else 256)


@pytest.mark.parametrize(
    "mods", [("text",), ("audio",), ("visual",), ("audio", "text"), ("visual", "audio", "text")]
)
def test_modality_subsets(mods):
    dims = {m: ODD_DIMS[m] for m in mods}
    net = EMINetwork(dims, num_targets=6, vad="audio" in mods)
    out = net(_batch(dims, b=2))
    assert out.pred.shape == (2, 6)
    assert set(out.aux) == set(mods) == set(out.embeddings)
    assert (out.vad is not None) == ("audio" in mods)
    assert net.head[1].in_features == 256 * len(mods)


def test_fusion_follows_fixed_modality_order_and_average():
    dims = {"text": 5, "visual": 9}  # deliberately not in MODALITIES order
    feats = _batch(dims)
    net = EMINetwork(dims, fusion="concat", vad=False).eval()
    with torch.no_grad():
        out = net(feats)
        ref = net.head(torch.cat([out.embeddings["visual"], out.embeddings["text"]], dim=-1))
    assert net.modalities == ("visual", "text")
    torch.testing.assert_close(out.pred, ref)
    avg = EMINetwork(dims, fusion="average", vad=False).eval()
    with torch.no_grad():
        out = avg(feats)
        ref = avg.head((out.embeddings["visual"] + out.embeddings["text"]) / 2)
    torch.testing.assert_close(out.pred, ref)


def test_vad_latent_in_unit_interval_and_feeds_the_sequence():
    torch.manual_seed(1)
    net = EMINetwork({"audio": 11}, vad=True).eval()
    feats = {"audio": (torch.randn(4, STEPS, 11) * 100).half()}
    out = net(feats)
    assert out.vad.shape == (4, 3)
    assert ((out.vad >= 0) & (out.vad <= 1)).all()
    # The latent must actually condition the sequence: perturbing its fuse weights on the VAD
    # inputs (last three columns) changes the prediction.
    branch = net.branches["audio"]
    with torch.no_grad():
        before = net(feats).pred.clone()
        branch.vad_fuse[1].weight[:, -3:] += 1.0
        after = net(feats).pred
    assert not torch.allclose(before, after)


def test_fp16_input_equals_float32_input_and_autocast_works():
    net = EMINetwork(ODD_DIMS, temporal=True, pooling="attention").eval()
    feats = _batch(ODD_DIMS)
    with torch.no_grad():
        half = net(feats).pred
        full = net({m: x.float() for m, x in feats.items()}).pred
        torch.testing.assert_close(half, full)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = net(feats)
    assert torch.isfinite(auto.pred).all()
    torch.testing.assert_close(auto.pred.float(), full, atol=5e-2, rtol=0)


def test_missing_modality_uses_learned_embedding_not_zero_rows():
    torch.manual_seed(2)
    net = EMINetwork(ODD_DIMS, pooling="attention", vad=True).eval()
    feats = _batch(ODD_DIMS, b=3)
    feats["visual"][1] = 0
    feats["audio"][2] = 0
    present = {m: torch.ones(3, dtype=torch.bool) for m in MODALITIES}
    present["visual"][1] = False
    present["audio"][2] = False
    out = net(feats, present)
    # Garbage in the absent rows must not change anything.
    changed = {m: x.clone() for m, x in feats.items()}
    changed["visual"][1] = torch.randn(STEPS, 7).half() * 5
    changed["audio"][2] = torch.randn(STEPS, 11).half() * 5
    out2 = net(changed, present)
    torch.testing.assert_close(out.pred, out2.pred)
    torch.testing.assert_close(
        out.embeddings["visual"][1], net.branches["visual"].missing_embedding
    )
    torch.testing.assert_close(out.embeddings["audio"][2], net.branches["audio"].missing_embedding)
    # Without the mask the zero rows would be used as real data and give another prediction.
    unmasked = net(feats)
    assert not torch.allclose(unmasked.pred[1], out.pred[1])
    # The gradient of the absent clip's prediction reaches the embedding and not the projector.
    out.pred[1].sum().backward()
    visual = net.branches["visual"]
    assert visual.missing_embedding.grad is not None
    assert visual.missing_embedding.grad.abs().sum() > 0
    assert visual.projector[1].weight.grad is None or not visual.projector[1].weight.grad.any()
    assert net.branches["text"].missing_embedding.grad is None or not (
        net.branches["text"].missing_embedding.grad.any()
    )


def test_attention_pooling_weights_sum_to_one_and_pool():
    torch.manual_seed(3)
    branch = ModalityBranch(9, num_targets=6, pooling="attention")
    seq = torch.randn(4, STEPS, 256)
    w = branch.pool.weights(seq)
    assert w.shape == (4, STEPS)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4))
    assert (w >= 0).all()
    scores = seq @ branch.pool.score.weight[0] + branch.pool.score.bias
    ref_w = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
    ref_w = ref_w / ref_w.sum(dim=1, keepdim=True)
    torch.testing.assert_close(branch.pool(seq), (ref_w[..., None] * seq).sum(dim=1))


def test_invalid_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="audio"):
        EMINetwork({"text": 8}, vad=True)
    with pytest.raises(ValueError, match="concat.*average"):
        EMINetwork({"text": 8}, fusion="sum", vad=False)
    with pytest.raises(ValueError, match="mean.*attention"):
        EMINetwork({"text": 8}, pooling="max", vad=False)
    with pytest.raises(ValueError, match="depth"):
        EMINetwork({"depth": 8}, vad=False)
    net = EMINetwork({"text": 8}, vad=False)
    with pytest.raises(ValueError, match=r"'text'.*\[B, T, 8\]"):
        net({"text": torch.zeros(2, STEPS, 9)})


def _linear(i: int, o: int) -> int:
    return i * o + o


def _norm(d: int) -> int:
    return 2 * d


def test_parameter_count_of_the_papers_final_model():
    dims = {"visual": 768, "audio": 1024, "text": 4096}
    h, k = 256, 6
    net = EMINetwork(dims, num_targets=k, fusion="concat", pooling="mean", temporal=False, vad=True)
    branch_common = (
        _norm(h)
        + _linear(h, h)  # feature layer
        + _norm(h)
        + _linear(h, h)
        + _linear(h, k)  # auxiliary regressor
        + h  # missing-modality embedding
    )
    expected = sum(_norm(d) + _linear(d, h) + branch_common for d in dims.values())
    expected += _norm(h) + _linear(h, h // 2) + _linear(h // 2, 3)  # VAD head
    expected += _norm(h + 3) + _linear(h + 3, h)  # VAD fuse back to h
    expected += _norm(3 * h) + _linear(3 * h, h) + _linear(h, k)  # shared head
    count = sum(p.numel() for p in net.parameters())
    print(f"paper final model parameters: {count}")
    assert count == expected


def test_temporal_block_size_matches_its_layers():
    h = 256
    plain = EMINetwork({"text": 13}, vad=False, temporal=False)
    temporal = EMINetwork({"text": 13}, vad=False, temporal=True)
    conv = 2 * (h * h * 3 + h) + _norm(h)
    # Two bidirectional layers of hidden h/2 per direction; both layers see h inputs.
    gru = 2 * 2 * 3 * ((h // 2) * h + (h // 2) * (h // 2) + 2 * (h // 2))
    extra = sum(p.numel() for p in temporal.parameters()) - sum(
        p.numel() for p in plain.parameters()
    )
    assert extra == conv + gru
