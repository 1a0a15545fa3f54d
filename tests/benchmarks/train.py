"""Benchmark: one training epoch through ``Trainer.fit`` vs. a bare PyTorch loop.

Both run the same EMINetwork, EMILoss, AdamW, gradient clipping at 1.0 and an EMA update per
step, over the same EMIDataModule train loader and batch size, in one process, one after the
other (each after a warm-up epoch that fills the page cache). Prints samples/s of both and their
ratio (target: Lightning >= 0.9 of the bare loop).

    python tests/benchmarks/train.py --clips 2000          # paper dims (768/1024/4096)
    python tests/benchmarks/train.py --clips 300 --small   # quick check with demo dims
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.optim.swa_utils import AveragedModel

from emimimic.data.datamodule import EMIDataModule
from emimimic.data.synth import DEMO_DIMS, PAPER_DIMS, synth
from emimimic.models import EMINetwork
from emimimic.training import EMA, EMILoss, EMIModule
from emimimic.training.callbacks import _EMADecay
from emimimic.training.module import fast_adam


class EpochTimer(Callback):
    """Wall time of each training epoch, data loading included."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


def bare_epoch(data: EMIDataModule, epochs: int) -> list[float]:
    """Times ``epochs`` epochs of a hand-written loop doing the same work as EMIModule."""
    seed_everything(0)
    net = EMINetwork(dims=data.dims, targets=data.targets)
    criterion = EMILoss()
    # the implementation EMIModule steps (fast_adam: the fused kernels)
    optimizer = fast_adam(torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4))
    ema = AveragedModel(net, multi_avg_fn=_EMADecay(0.999, warmup=False), use_buffers=True)
    loader = data.train_dataloader()
    times = []
    for epoch in range(epochs):
        net.train()
        start = time.perf_counter()
        for plan in loader:
            batch = data.prepare_batch(plan)  # what Lightning's batch-transfer hook does
            present = {m: batch.present(m) for m in batch.modalities}
            loss = criterion(net(batch), batch.target, present, epoch=epoch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            ema.update_parameters(net)
        times.append(time.perf_counter() - start)
    return times


def lightning_epoch(data: EMIDataModule, epochs: int) -> list[float]:
    """Times ``epochs`` epochs of ``Trainer.fit`` on EMIModule (no validation, no checkpoints)."""
    seed_everything(0)
    model = EMIModule(dims=data.dims, targets=data.targets,
                      optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4))
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        callbacks=[EMA(decay=0.999), timer],
    )
    trainer.fit(model, datamodule=data)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000, help="training clips")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="demo dims instead of the paper's")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dims = DEMO_DIMS if args.small else PAPER_DIMS
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        t0 = time.perf_counter()
        synth(store, seed=0, counts={"train": args.clips}, dims=dims, progress=True)
        print(f"store: {args.clips} clips, dims {dims}, built in {time.perf_counter() - t0:.1f}s")
        # no validation split: validation is off (limit_val_batches=0), it only has to exist
        data = EMIDataModule(str(store), batch_size=args.batch_size, num_workers=args.workers,
                             val_split="train")
        data.setup("fit")
        bare, light = [], []
        # Alternate the two so drift on a shared machine hits both; the first epoch of each
        # call warms caches and is dropped.
        for _ in range(args.rounds):
            bare.append(min(bare_epoch(data, 2)[1:]))
            light.append(min(lightning_epoch(data, 2)[1:]))
        n = args.clips
        b, lt = min(bare), min(light)
        print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, workers {args.workers}")
        for name, t, runs in (("bare PyTorch loop", b, bare), ("Lightning fit", lt, light)):
            epochs = [round(x, 2) for x in runs]
            print(f"{name:18s}: {n / t:8.1f} samples/s  (best epoch {t:.2f}s; all {epochs})")
        print(f"ratio Lightning / bare: {b / lt:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
