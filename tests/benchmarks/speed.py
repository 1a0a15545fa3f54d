"""Benchmark: model throughput of the expanded path vs distinct windows, fp32 and bf16.

Builds a store at the paper's dims (visual 768, audio 1024, text 4096) with the lengths the model
sees in practice (text ~25 tokens, faces ~35 frames, audio ~350 frames, so stored as 128 pooled
rows), reads every batch once, then times, on the same batches, with the same batch size and
threads, in alternating rounds (the best round of each row is printed):

* ``expanded, 32-true``: the path before distinct windows: each batch expanded to
  ``[B, 128, D]`` (``FeatureBatch.dense``) and fed to ``EMINetwork.forward_dense``
  (LayerNorm -> Linear per step, autograd's two-matmul backward);
* ``windows, 32-true``: ``EMINetwork(batch)``: each distinct pooling window projected once with
  the one-matmul backward (``norm_linear``), steps gathered after the projection;
* ``windows, bf16-mixed``: the same under ``torch.autocast("cpu", torch.bfloat16)``;
* ``matmul bound``: only the projector matmuls of the windows path, same shapes, no model
  (train: forward + the one backward matmul; eval: forward), in fp32 and bf16;
* the parts other teams won with, 32-true, each in the paper's final model otherwise:
  ``text_query`` and ``gated`` fusion, ``lstm`` pooling, modality dropout 0.1. ``text_query``
  and ``lstm`` need every clip's 128 projected steps, so they leave the distinct-window fast
  path in evaluation (training gathers the steps anyway); ``gated`` and modality dropout do not.

A training step is forward + EMILoss + backward + gradient clipping + AdamW step (fused, as
EMIModule steps it); an evaluation step is a forward under ``torch.no_grad`` in eval mode.
Prints clips/s, the ratio to the expanded path and the fraction of the matmul bound of the same
precision.

    python tests/benchmarks/speed.py --clips 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emimimic.contract import FeatureBatch
from emimimic.data import EMIDataModule
from emimimic.data.store import SplitSpec, StoreWriter
from emimimic.data.synth import PAPER_DIMS
from emimimic.models import EMINetwork
from emimimic.training import EMILoss
from emimimic.training.module import fast_adam

#: Mean raw length per modality (Poisson around it, at least 1).
LENGTHS = {"visual": 35, "audio": 350, "text": 25}


def build_store(path: Path, clips: int, seed: int = 0) -> Path:
    """Writes a random store of ``clips`` labelled clips at the paper's dims."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (clips, 6)) / 2
    ids = [f"{i:05d}" for i in range(clips)]
    writer = StoreWriter(path, [f"t{k}" for k in range(6)], PAPER_DIMS,
                         [SplitSpec("train", ids, labels)], {"benchmark": True})
    for _ in ids:
        arrays = {m: rng.standard_normal((max(1, rng.poisson(n)), PAPER_DIMS[m]),
                                         dtype=np.float32) for m, n in LENGTHS.items()}
        writer.add("train", arrays)
    return writer.finish()


def _present(b: FeatureBatch) -> dict[str, torch.Tensor]:
    return {m: b.present(m) for m in b.modalities}


class Rows:
    """One benchmark row: a training step and an evaluation step on a batch."""

    def __init__(self, net: EMINetwork, dense: bool, bf16: bool) -> None:
        self.net, self.dense, self.bf16 = net, dense, bf16
        self.loss = EMILoss()
        # the optimizer EMIModule steps (fast_adam: torch's fused kernels)
        self.opt = fast_adam(torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4))

    def _forward(self, b: FeatureBatch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.dense:
                return self.net.forward_dense({m: b.dense(m) for m in b.modalities}, _present(b))
            return self.net(b)

    def train(self, b: FeatureBatch) -> None:
        out = self._forward(b)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(out, b.target, _present(b))["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()

    def eval(self, b: FeatureBatch) -> None:
        with torch.no_grad():
            self._forward(b)


class MatmulBound:
    """The windows path's projector matmuls alone, on the same shapes."""

    def __init__(self, net: EMINetwork, batches: list[FeatureBatch], dtype: torch.dtype) -> None:
        self.net = net
        self.weights = {m: net.branches[m].projector[1].weight.detach().to(dtype)
                        for m in net.modalities}
        hidden = next(iter(self.weights.values())).shape[0]
        self.inputs = [{m: (torch.randn(b.window(m).first.shape[0], w.shape[1], dtype=dtype),
                            torch.randn(b.window(m).first.shape[0], hidden, dtype=dtype))
                        for m, w in self.weights.items()} for b in batches]
        self.batches = {id(b): i for i, b in enumerate(batches)}

    def train(self, b: FeatureBatch) -> None:
        for m, (x, gy) in self.inputs[self.batches[id(b)]].items():
            x @ self.weights[m].t()
            gy.t() @ x

    def eval(self, b: FeatureBatch) -> None:
        for m, (x, _) in self.inputs[self.batches[id(b)]].items():
            x @ self.weights[m].t()


def time_epoch(step, batches: list[FeatureBatch]) -> float:
    """Returns the seconds ``step`` takes over all batches (after one warm-up batch)."""
    step(batches[0])
    start = time.perf_counter()
    for b in batches:
        step(b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-parts", action="store_true",
                        help="leave out the rows of the other teams' parts")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", args.clips)
        data = EMIDataModule(str(store), batch_size=args.batch_size, val_split="train")
        batches = [data.prepare_batch(p) for p in data.val_dataloader()]
    mean_len = {m: float(np.mean([b.lengths[m].float().mean() for b in batches]))
                for m in PAPER_DIMS}
    windows = {m: float(np.mean([b.window(m).first.shape[0] / len(b) for b in batches]))
               for m in PAPER_DIMS}
    print(f"{args.clips} clips, dims {PAPER_DIMS}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")
    print("stored rows per clip " + ", ".join(f"{m} {v:.1f}" for m, v in mean_len.items())
          + "; distinct windows per clip " + ", ".join(f"{m} {v:.1f}" for m, v in windows.items()))
    net = EMINetwork(PAPER_DIMS)
    rows = {
        "expanded, 32-true": Rows(net, dense=True, bf16=False),
        "windows, 32-true": Rows(net, dense=False, bf16=False),
        "windows, bf16-mixed": Rows(net, dense=False, bf16=True),
        "matmul bound, fp32": MatmulBound(net, batches, torch.float32),
        "matmul bound, bf16": MatmulBound(net, batches, torch.bfloat16),
    }
    parts = {"fusion text_query": {"fusion": "text_query"}, "fusion gated": {"fusion": "gated"},
             "pooling lstm": {"pooling": "lstm"}, "modality dropout 0.1": {"modality_dropout": 0.1}}
    if not args.no_parts:
        rows.update({f"{name}, 32-true": Rows(EMINetwork(PAPER_DIMS, **options), dense=False,
                                              bf16=False) for name, options in parts.items()})
    best = {name: [np.inf, np.inf] for name in rows}
    for _ in range(args.rounds):
        for name, row in rows.items():
            row.net.train()
            best[name][0] = min(best[name][0], time_epoch(row.train, batches))
            row.net.eval()
            best[name][1] = min(best[name][1], time_epoch(row.eval, batches))
    n = sum(len(b) for b in batches)
    base = best["expanded, 32-true"]
    print("\n| row | train clips/s | eval clips/s | train vs expanded | eval vs expanded "
          "| train / bound | eval / bound |")
    print("|---|---|---|---|---|---|---|")
    for name, (tt, te) in best.items():
        bound = best["matmul bound, bf16" if "bf16" in name else "matmul bound, fp32"]
        print(f"| {name} | {n / tt:.1f} | {n / te:.1f} | {base[0] / tt:.2f}x | "
              f"{base[1] / te:.2f}x | {bound[0] / tt:.2f} | {bound[1] / te:.2f} |")


if __name__ == "__main__":
    main()
