"""The EMI network: compact path = dense path, one-matmul projector, shapes, fusion, size."""

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emimimic.constants import MODALITIES, STEPS
from emimimic.contract import FeatureBatch
from emimimic.models import (
    AudioVADBranch,
    EMINetwork,
    ModalityBranch,
    norm_linear,
)
from emimimic.pooling import pool_reference

ODD_DIMS = {"visual": 7, "audio": 11, "text": 13}
VARIANTS = list(itertools.product(("concat", "average"), ("mean", "attention"), (False, True),
                                  (False, True)))
# the parts other teams won with: fusions over embeddings or steps, LSTM pooling
VARIANTS += [("gated", "mean", False, True), ("gated", "attention", False, False),
             ("text_query", "mean", False, True), ("text_query", "lstm", False, False),
             ("concat", "lstm", False, True), ("gated", "lstm", True, True)]
VARIANT_IDS = [f"{f}-{p}-{'temporal' if t else 'flat'}-{'vad' if v else 'novad'}"
               for f, p, t, v in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs these small models on one intra-op thread, restoring the count after.

    The GRU's 512 tiny sequential steps each end in an OpenMP barrier; on a loaded 2-core machine
    every barrier can wait for a time slice, which made single tests take 10-30 s instead of 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def net_of(dims, num_targets=6, **options) -> EMINetwork:
    return EMINetwork(dims, [f"target {k}" for k in range(num_targets)], **options)


def _batch(dims: dict[str, int], b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, STEPS, d, generator=g).half() for m, d in dims.items()}


@pytest.mark.parametrize(("fusion", "pooling", "temporal", "vad"), VARIANTS, ids=VARIANT_IDS)
def test_output_shapes_for_every_configuration(fusion, pooling, temporal, vad):
    torch.manual_seed(0)
    net = net_of(ODD_DIMS, num_targets=5, fusion=fusion, pooling=pooling, temporal=temporal,
                 vad=vad)
    out = net.forward_dense(_batch(ODD_DIMS))
    assert out.pred.shape == (3, 5)
    assert out.pred.dtype == torch.float32
    assert set(out.aux) == set(MODALITIES)
    assert all(a.shape == (3, 5) for a in out.aux.values())
    assert all(e.shape == (3, 256) for e in out.embeddings.values())
    assert ((out.pred >= 0) & (out.pred <= 1)).all()
    assert (out.weights is not None) == (fusion == "gated")
    if vad:
        assert out.vad.shape == (3, 3)
        assert isinstance(net.branches["audio"], AudioVADBranch)
    else:
        assert out.vad is None
        assert type(net.branches["audio"]) is ModalityBranch
    fused = net.head[0].normalized_shape[0]
    assert fused == (256 * 3 if fusion in ("concat", "text_query") else 256)


@pytest.mark.parametrize(
    "mods", [("text",), ("audio",), ("visual",), ("audio", "text"), ("visual", "audio", "text")]
)
def test_modality_subsets(mods):
    dims = {m: ODD_DIMS[m] for m in mods}
    net = net_of(dims, vad="audio" in mods)
    out = net.forward_dense(_batch(dims, b=2))
    assert out.pred.shape == (2, 6)
    assert set(out.aux) == set(mods) == set(out.embeddings)
    assert (out.vad is not None) == ("audio" in mods)
    assert net.head[1].in_features == 256 * len(mods)


def test_fusion_follows_fixed_modality_order_and_average():
    dims = {"text": 5, "visual": 9}  # deliberately not in MODALITIES order
    feats = _batch(dims)
    net = net_of(dims, fusion="concat", vad=False).eval()
    with torch.no_grad():
        out = net.forward_dense(feats)
        ref = net.head(torch.cat([out.embeddings["visual"], out.embeddings["text"]], dim=-1))
    assert net.modalities == ("visual", "text")
    torch.testing.assert_close(out.pred, ref)
    avg = net_of(dims, fusion="average", vad=False).eval()
    with torch.no_grad():
        out = avg.forward_dense(feats)
        ref = avg.head((out.embeddings["visual"] + out.embeddings["text"]) / 2)
    torch.testing.assert_close(out.pred, ref)


def test_vad_latent_in_unit_interval_and_feeds_the_sequence():
    torch.manual_seed(1)
    net = net_of({"audio": 11}, vad=True).eval()
    feats = {"audio": (torch.randn(4, STEPS, 11) * 100).half()}
    out = net.forward_dense(feats)
    assert out.vad.shape == (4, 3)
    assert ((out.vad >= 0) & (out.vad <= 1)).all()
    # The latent must actually condition the sequence: perturbing its fuse weights on the VAD
    # inputs (last three columns) changes the prediction.
    branch = net.branches["audio"]
    with torch.no_grad():
        before = net.forward_dense(feats).pred.clone()
        branch.vad_fuse[1].weight[:, -3:] += 1.0
        after = net.forward_dense(feats).pred
    assert not torch.allclose(before, after)


def test_fp16_input_equals_float32_input_and_autocast_works():
    net = net_of(ODD_DIMS, temporal=True, pooling="attention").eval()
    feats = _batch(ODD_DIMS)
    with torch.no_grad():
        half = net.forward_dense(feats).pred
        full = net.forward_dense({m: x.float() for m, x in feats.items()}).pred
        torch.testing.assert_close(half, full)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = net.forward_dense(feats)
    assert torch.isfinite(auto.pred).all()
    torch.testing.assert_close(auto.pred.float(), full, atol=5e-2, rtol=0)


def test_missing_modality_uses_learned_embedding_not_zero_rows():
    torch.manual_seed(2)
    net = net_of(ODD_DIMS, pooling="attention", vad=True).eval()
    feats = _batch(ODD_DIMS, b=3)
    feats["visual"][1] = 0
    feats["audio"][2] = 0
    present = {m: torch.ones(3, dtype=torch.bool) for m in MODALITIES}
    present["visual"][1] = False
    present["audio"][2] = False
    out = net.forward_dense(feats, present)
    # Garbage in the absent rows must not change anything.
    changed = {m: x.clone() for m, x in feats.items()}
    changed["visual"][1] = torch.randn(STEPS, 7).half() * 5
    changed["audio"][2] = torch.randn(STEPS, 11).half() * 5
    out2 = net.forward_dense(changed, present)
    torch.testing.assert_close(out.pred, out2.pred)
    torch.testing.assert_close(
        out.embeddings["visual"][1], net.branches["visual"].missing_embedding
    )
    torch.testing.assert_close(out.embeddings["audio"][2], net.branches["audio"].missing_embedding)
    # Without the mask the zero rows would be used as real data and give another prediction.
    unmasked = net.forward_dense(feats)
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
        net_of({"text": 8}, vad=True)
    with pytest.raises(ValueError, match="average, concat, gated, text_query"):
        net_of({"text": 8}, fusion="sum", vad=False)
    with pytest.raises(ValueError, match="mean.*attention.*lstm"):
        net_of({"text": 8}, pooling="max", vad=False)
    with pytest.raises(ValueError, match="depth"):
        net_of({"depth": 8}, vad=False)
    net = net_of({"text": 8}, vad=False)
    with pytest.raises(ValueError, match=r"'text'.*\[B, T, 8\]"):
        net.forward_dense({"text": torch.zeros(2, STEPS, 9)})
    rows = torch.zeros(3, 9, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"'text'.*\[R, 8\]"):
        net(FeatureBatch(rows={"text": rows}, lengths={"text": torch.tensor([3])}, target=None,
                         ids=["a"]))
    with pytest.raises(ValueError, match=r"lack modalities \['text'\]"):
        net(FeatureBatch(rows={}, lengths={}, target=None, ids=["a"]))


def _linear(i: int, o: int) -> int:
    return i * o + o


def _norm(d: int) -> int:
    return 2 * d


def test_parameter_count_of_the_papers_final_model():
    dims = {"visual": 768, "audio": 1024, "text": 4096}
    h, k = 256, 6
    net = net_of(dims, num_targets=k, fusion="concat", pooling="mean", temporal=False, vad=True)
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
    plain = net_of({"text": 13}, vad=False, temporal=False)
    temporal = net_of({"text": 13}, vad=False, temporal=True)
    conv = 2 * (h * h * 3 + h) + _norm(h)
    # Two bidirectional layers of hidden h/2 per direction; both layers see h inputs.
    gru = 2 * 2 * 3 * ((h // 2) * h + (h // 2) * (h // 2) + 2 * (h // 2))
    extra = sum(p.numel() for p in temporal.parameters()) - sum(
        p.numel() for p in plain.parameters()
    )
    assert extra == conv + gru


# --- the compact path (distinct windows) equals the dense path --------------------------------


def f16_raw(rng: np.random.Generator, t: int, d: int) -> np.ndarray:
    """A raw [T, D] float32 clip of float16-representable values (what a store holds)."""
    return (rng.standard_normal((t, d)) * 2).astype(np.float16).astype(np.float32) + 0.0


def clip_lengths(shift: int) -> list[int]:
    """Raw lengths: every stored length 1..128, lengths > 128 and absent clips, rotated."""
    lengths = [*range(1, STEPS + 1), 129, 300, 1000, 0, 0]
    return lengths[shift:] + lengths[:shift]


def compact_batch(dims: dict[str, int], seed: int = 0) -> FeatureBatch:
    """A batch built by hand as the store holds it: raw rows for T <= 128, else 128 pooled rows."""
    rng = np.random.default_rng(seed)
    rows, lengths = {}, {}
    for j, (m, d) in enumerate(dims.items()):
        stored = []
        raw_lengths = clip_lengths(37 * j)
        for t in raw_lengths:
            if t:
                raw = f16_raw(rng, t, d)
                stored.append(raw.astype(np.float16) if t <= STEPS else pool_reference(raw))
        rows[m] = torch.from_numpy(np.concatenate(stored))
        lengths[m] = torch.tensor([min(t, STEPS) for t in raw_lengths])
    b = len(lengths[next(iter(dims))])
    return FeatureBatch(rows=rows, lengths=lengths, target=torch.rand(b, 6),
                        ids=[f"{i:05d}" for i in range(b)])


def dense_inputs(batch: FeatureBatch) -> tuple[dict, dict]:
    return ({m: batch.dense(m) for m in batch.modalities},
            {m: batch.present(m) for m in batch.modalities})


def assert_outputs_close(a, b, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.pred, b.pred, atol=atol, rtol=0)
    assert a.aux.keys() == b.aux.keys() == a.embeddings.keys() == b.embeddings.keys()
    for m in a.aux:
        torch.testing.assert_close(a.aux[m], b.aux[m], atol=atol, rtol=0)
        torch.testing.assert_close(a.embeddings[m], b.embeddings[m], atol=atol, rtol=0)
    assert (a.vad is None) == (b.vad is None)
    if a.vad is not None:
        torch.testing.assert_close(a.vad, b.vad, atol=atol, rtol=0)
    assert (a.weights is None) == (b.weights is None)
    for m in a.weights or {}:
        torch.testing.assert_close(a.weights[m], b.weights[m], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def odd_batch() -> FeatureBatch:
    batch = compact_batch(ODD_DIMS)
    for m in ODD_DIMS:  # the batch covers what the acceptance test asks for
        stored = set(batch.lengths[m].tolist())
        assert stored == set(range(STEPS + 1))
        assert int((batch.lengths[m] == STEPS).sum()) == 4  # T = 128, 129, 300, 1000
    return batch


@pytest.mark.parametrize(("fusion", "pooling", "temporal", "vad"), VARIANTS, ids=VARIANT_IDS)
def test_compact_eval_outputs_equal_the_dense_path(odd_batch, fusion, pooling, temporal, vad):
    torch.manual_seed(0)
    net = net_of(ODD_DIMS, fusion=fusion, pooling=pooling, temporal=temporal, vad=vad,
                 hidden=32).eval()
    with torch.no_grad():
        compact = net(odd_batch)
        dense = net.forward_dense(*dense_inputs(odd_batch))
    assert_outputs_close(compact, dense)
    absent = ~odd_batch.present("text")
    torch.testing.assert_close(compact.embeddings["text"][absent],
                               net.branches["text"].missing_embedding.expand(2, -1))


def gradients(net: EMINetwork, out) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    # batch means, as the loss takes them: gradients O(1), so 1e-5 is a tight bound on them
    loss = out.pred.square().mean() + sum(a.mean() for a in out.aux.values())
    if out.vad is not None:
        loss = loss + out.vad.mean()
    loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in net.named_parameters()}


@pytest.mark.parametrize(("fusion", "pooling", "temporal", "vad"), VARIANTS, ids=VARIANT_IDS)
def test_compact_training_gradients_equal_the_dense_path(odd_batch, fusion, pooling, temporal,
                                                         vad, monkeypatch):
    # per-step masks in both paths (the per-window draw: test_dropout.py)
    monkeypatch.setattr(ModalityBranch, "window_dropout", False)
    torch.manual_seed(1)
    net = net_of(ODD_DIMS, fusion=fusion, pooling=pooling, temporal=temporal, vad=vad,
                 hidden=32).train()
    features, present = dense_inputs(odd_batch)
    torch.manual_seed(2)  # the same dropout masks: same calls, same shapes, same order
    compact = net(odd_batch)
    got = gradients(net, compact)
    torch.manual_seed(2)
    dense = net.forward_dense(features, present)
    expected = gradients(net, dense)
    assert_outputs_close(compact, dense)
    assert any(g.abs().sum() > 0 for n, g in got.items() if "projector" in n)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("window_dropout", [False, True])
def test_different_dropout_masks_give_different_gradients(odd_batch, window_dropout,
                                                         monkeypatch):
    # the equality above depends on the seed: without it the two paths would differ
    monkeypatch.setattr(ModalityBranch, "window_dropout", window_dropout)
    net = net_of(ODD_DIMS, hidden=32).train()
    torch.manual_seed(3)
    a = gradients(net, net(odd_batch))
    torch.manual_seed(4)
    b = gradients(net, net(odd_batch))
    assert not torch.allclose(a["branches.text.projector.1.weight"],
                              b["branches.text.projector.1.weight"], atol=1e-5)


# --- norm_linear: LayerNorm + Linear with a one-matmul backward -------------------------------


def projector_layers(d: int, h: int, seed: int) -> tuple[torch.nn.LayerNorm, torch.nn.Linear]:
    torch.manual_seed(seed)
    norm, linear = torch.nn.LayerNorm(d), torch.nn.Linear(d, h)
    with torch.no_grad():  # affine parameters away from their 1 / 0 start
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm, linear


def reference_grads(x, norm, linear, gy, dtype=torch.float64):
    """Autograd's ``linear(norm(x))`` and its parameter gradients, in ``dtype``."""
    params = [p.detach().to(dtype).requires_grad_() for p in
              (norm.weight, norm.bias, linear.weight, linear.bias)]
    y = F.linear(F.layer_norm(x.to(dtype), (x.shape[1],), params[0], params[1], norm.eps),
                 params[2], params[3])
    y.backward(gy.to(dtype))
    return y, [p.grad for p in params]


def our_grads(x, norm, linear, gy, overwrite=False):
    for p in (norm.weight, norm.bias, linear.weight, linear.bias):
        p.grad = None
    y = norm_linear(x, norm, linear, overwrite=overwrite)
    y.backward(gy.to(y.dtype))
    return y, [p.grad for p in (norm.weight, norm.bias, linear.weight, linear.bias)]


@pytest.mark.parametrize("overwrite", [False, True], ids=["layer_norm", "centred-in-place"])
@pytest.mark.parametrize(("rows", "d", "h"), [(1, 3, 2), (7, 5, 4), (300, 64, 32),
                                              (1000, 513, 256)])
def test_norm_linear_equals_autograd(rows: int, d: int, h: int, overwrite: bool) -> None:
    norm, linear = projector_layers(d, h, seed=rows)
    g = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=g) * 3 + 1
    gy = torch.randn(rows, h, generator=g)
    given = x.clone()
    y, grads = our_grads(given, norm, linear, gy, overwrite)
    if not overwrite:
        assert torch.equal(given, x)  # the caller's rows are left as they were
    ref_y, ref_grads = reference_grads(x, norm, linear, gy)
    assert y.dtype == torch.float32 and y.shape == (rows, h)
    scale = max(1.0, rows ** 0.5)  # fp32 sums over rows grow like sqrt(rows)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
    for name, got, ref in zip(("norm.weight", "norm.bias", "linear.weight", "linear.bias"),
                              grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=2e-6 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("overwrite", [False, True], ids=["layer_norm", "centred-in-place"])
def test_norm_linear_is_as_exact_as_the_float32_modules_far_from_zero(overwrite: bool) -> None:
    # rows whose mean is 40 times their spread: E[x^2] - E[x]^2 in float32 would lose the
    # variance; a two-pass (centred) LayerNorm keeps it
    norm, linear = projector_layers(1024, 64, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 1024, generator=g) + 40.0
    gy = torch.randn(300, 64, generator=g)
    y, grads = our_grads(x.clone(), norm, linear, gy, overwrite)
    ref_y, ref_grads = reference_grads(x, norm, linear, gy)
    mod_y, mod_grads = reference_grads(x, norm, linear, gy, dtype=torch.float32)
    for name, got, mod, ref in zip(("y", "norm.weight", "norm.bias", "linear.weight",
                                    "linear.bias"), [y, *grads], [mod_y, *mod_grads],
                                   [ref_y, *ref_grads], strict=True):
        ours = float((got.detach().double() - ref).abs().max())
        theirs = float((mod.detach().double() - ref).abs().max())
        assert ours <= 1.5 * theirs + 1e-6, f"{name}: {ours:.2e} vs float32 modules {theirs:.2e}"


def test_norm_linear_under_bf16_autocast_is_within_bf16_tolerance() -> None:
    norm, linear = projector_layers(256, 64, seed=5)
    g = torch.Generator().manual_seed(5)
    x, gy = torch.randn(200, 256, generator=g), torch.randn(200, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = our_grads(x, norm, linear, gy)
        auto = linear(norm(x))
    assert y.dtype == auto.dtype == torch.bfloat16
    ref_y, ref_grads = reference_grads(x, norm, linear, gy)
    torch.testing.assert_close(y.double(), ref_y, atol=0.05, rtol=0.02)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        err = (got.double() - ref).norm() / ref.norm()
        assert err < 0.02, float(err)


def test_norm_linear_refuses_an_input_that_requires_grad() -> None:
    norm, linear = projector_layers(4, 3, seed=0)
    with pytest.raises(ValueError, match="must not require"):
        norm_linear(torch.randn(2, 4, requires_grad=True), norm, linear)
    with pytest.raises(ValueError, match=r"expected x \[R, 4\]"):
        norm_linear(torch.randn(2, 5), norm, linear)


def _full_batch(dims: dict[str, int], clips: int = 4, seed: int = 3) -> FeatureBatch:
    """Every clip with 128 stored rows: the windows are the rows (the audio case)."""
    g = torch.Generator().manual_seed(seed)
    # far from zero (mean 200, std 2): a one-pass variance would lose digits here
    rows = {m: (torch.randn(clips * STEPS, d, generator=g) * 2 + 200).half()
            for m, d in dims.items()}
    return FeatureBatch(rows=rows, lengths={m: torch.full((clips,), STEPS) for m in dims},
                        target=torch.rand(clips, 6, generator=g),
                        ids=[f"{i:05d}" for i in range(clips)])


@pytest.mark.slow  # torch.compile: tens of seconds on two cores, once per process
def test_compiled_windows_equal_the_eager_path(odd_batch):
    from emimimic.models import projector

    torch.manual_seed(1)
    eager = net_of(ODD_DIMS, hidden=32)
    fused = net_of(ODD_DIMS, hidden=32, compile_windows=True)
    fused.load_state_dict(eager.state_dict())
    assert all(b.compile_windows for b in fused.branches.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fused.eval()(odd_batch)
    if projector._COMPILED.get("failed"):  # else the comparisons below would be eager vs eager
        pytest.skip("torch.compile does not work here (no C++ compiler for Inductor?)")
    assert "prepare" in projector._COMPILED
    for batch in (odd_batch, _full_batch(ODD_DIMS)):
        # evaluation: within 1e-5 (absent clips, one- and two-row windows, 128-row clips)
        with torch.no_grad():
            assert_outputs_close(fused.eval()(batch), eager.eval()(batch))
        # training: the same masks (the kernel draws nothing), the same gradients
        outs, grads = [], []
        for net in (eager, fused):
            torch.manual_seed(2)
            outs.append(net.train()(batch))
            grads.append(gradients(net, outs[-1]))
        assert_outputs_close(outs[1], outs[0])
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-5, msg=name)
        # bf16-mixed: x̂ rounded to bfloat16 once, as the eager path's within bf16 tolerance
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = fused.eval()(batch), eager.eval()(batch)
        torch.testing.assert_close(a.pred.float(), b.pred.float(), atol=2e-2, rtol=0)


def test_compiled_windows_fall_back_to_eager_with_a_warning(odd_batch, monkeypatch):
    from emimimic.models import projector

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(projector, "_COMPILED", {"prepare": broken})
    torch.manual_seed(1)
    eager = net_of(ODD_DIMS, hidden=32).eval()
    fused = net_of(ODD_DIMS, hidden=32, compile_windows=True).eval()
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no C.. compiler found.*eagerly"):
        got = fused(odd_batch)
    with torch.no_grad():
        assert_outputs_close(got, eager(odd_batch), atol=0)
    assert projector._COMPILED.get("failed")


def test_compiled_windows_take_only_the_stores_float16_rows(odd_batch, monkeypatch):
    from emimimic.models import projector

    monkeypatch.setattr(projector, "_COMPILED", {})  # nothing compiled in this test
    torch.manual_seed(1)
    eager = net_of(ODD_DIMS, hidden=32).eval()
    fused = net_of(ODD_DIMS, hidden=32, compile_windows=True).eval()
    fused.load_state_dict(eager.state_dict())
    # float32 rows: a one-row window is the row itself, not its float16 rounding -> eager path
    wide = FeatureBatch(rows={m: r.float() for m, r in odd_batch.rows.items()},
                        lengths=odd_batch.lengths, target=odd_batch.target, ids=odd_batch.ids)
    with torch.no_grad():
        assert_outputs_close(fused(wide), eager(wide), atol=0)
    assert projector._COMPILED == {}
    branch = fused.branches["text"]
    rows = odd_batch.rows["text"].clone().float().requires_grad_()
    with pytest.raises(ValueError, match="rows must not require"):
        projector.norm_linear_windows(rows, odd_batch.window("text"), *branch.projector[:2])
