"""Benchmark: the training step end to end through the CLI, against the matmul bound, by phase.

On a store at the paper's dims (visual 768, audio 1024, text 4096) with realistic lengths (the
same as ``speed.py``), batch 32, the paper's final model, 32-true (or ``--precision``):

* ``end to end``: ``emimimic fit`` (the CLI with its loader, logging, EMA and clipping;
  checkpointing off) timed per epoch by a callback; training clips/s from the epochs after the
  first, evaluation clips/s from ``emimimic validate`` over the same clips;
* ``matmul bound``: only the projector matmuls of those batches (as in ``speed.py``), in the
  same process and run, so the ratios compare like with like; its GFLOP/s is printed so that
  another machine's figures can be compared;
* ``floor``: float16 -> float32 copies of the same batches' windows into buffers made
  beforehand, the least memory traffic of any path that feeds a library float32 GEMM from the
  store's float16 rows (no LayerNorm statistics, no loader, no other layer); ``bound / (bound +
  floor)`` is then the highest ratio such a path can reach on this machine;
* ``by phase``: one ``Trainer.fit`` in this process with Lightning's ``SimpleProfiler``, the
  projector's forward and backward and ``log_dict`` timed on top: loader, transfer, the
  projector matmuls, the rest of the forward, backward, optimizer, EMA, logging (ms per step).

``--compile-windows`` runs the model with ``compile_windows: true`` (the windows' gather and
LayerNorm statistics in one compiled kernel; the compile is warmed up before any timing, and it
then counts under "rest of the forward", the projector rows holding only the matmuls).

    python tests/benchmarks/speed_e2e.py --clips 1024 [--compile-windows]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import LENGTHS, MatmulBound, build_store, time_epoch  # noqa: E402


class EpochTimer(Callback):
    """Writes each training epoch's wall seconds and clips, and validation's from its second
    batch on (the first of a ``validate`` process loads any compiled kernel), to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start: dict[str, float] = {}
        self.clips = {"train": 0, "val": 0}  # validation runs inside fit's last training epoch

    def _write(self, stage: str, trainer) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "epoch": trainer.current_epoch,
                                "clips": self.clips[stage],
                                "seconds": time.perf_counter() - self.start[stage]}) + "\n")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start["train"], self.clips["train"] = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clips["train"] += len(batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write("train", trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        if batch_idx == 1:
            self.start["val"], self.clips["val"] = time.perf_counter(), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if batch_idx >= 1:
            self.clips["val"] += len(batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write("val", trainer)


class WindowFloor:
    """Float16 -> float32 copies of each batch's ``[W, D]`` windows into buffers made beforehand
    (random values: a copy's time does not depend on them)."""

    def __init__(self, batches: list, dims: dict[str, int]) -> None:
        self.pairs = [{m: (torch.randn(b.window(m).first.shape[0], d).half(),
                           torch.empty(b.window(m).first.shape[0], d)) for m, d in dims.items()}
                      for b in batches]
        self.batches = {id(b): i for i, b in enumerate(batches)}

    def copy(self, b) -> None:
        for src, dst in self.pairs[self.batches[id(b)]].values():
            dst.copy_(src)


def cli_rows(store: Path, root: Path, epochs: int, precision: str, threads: int,
             extra: list[str]) -> dict:
    """Returns end-to-end clips/s of training and evaluation through the CLI."""
    timings = root / "timings.jsonl"
    timings.unlink(missing_ok=True)
    common = ["-c", str(REPO / "configs" / "paper" / "base.yaml"), "-c",
              str(REPO / "configs" / "paper" / "final.yaml"), "--data.store", str(store),
              "--data.val_split", "train", "--trainer.accelerator", "cpu",
              "--trainer.precision", precision, "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
              "--data.num_workers", "0", "--checkpoint", "null", "--last_checkpoint", "null",
              "--trainer.enable_checkpointing", "false",
              "--trainer.callbacks+=" + json.dumps({"class_path": "speed_e2e.EpochTimer",
                                                    "init_args": {"path": str(timings)}}),
              *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent),
           "OMP_NUM_THREADS": str(threads)}
    for args in (["fit", "--trainer.max_epochs", str(epochs), "--trainer.num_sanity_val_steps",
                  "0", "--trainer.check_val_every_n_epoch", str(epochs)],
                 ["validate", "--allow_untrained", "true"]):
        done = subprocess.run([sys.executable, "-m", "emimimic", args[0], *common, *args[1:]],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(line) for line in timings.read_text().splitlines()]
    train = [r["clips"] / r["seconds"] for r in rows if r["stage"] == "train"][1:]  # warm-up
    val = [r["clips"] / r["seconds"] for r in rows if r["stage"] == "val"]
    return {"train": max(train), "eval": max(val)}


def phases(store: Path, root: Path, steps: int, precision: str,
           compile_windows: bool) -> dict[str, float]:
    """Returns milliseconds per training step and per evaluation step, by phase."""
    from functools import partial

    from lightning.pytorch import Trainer
    from lightning.pytorch.profilers import SimpleProfiler

    from emimimic.data import EMIDataModule
    from emimimic.models import EMINetwork, projector
    from emimimic.training import EMA, EMIModule, default_callbacks

    spent: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name].append(time.perf_counter() - start)
            return out
        return wrapper

    fwd, bwd = projector._NormLinear.forward, projector._NormLinear.backward
    projector._NormLinear.forward = staticmethod(timed("projector forward", fwd))
    projector._NormLinear.backward = staticmethod(timed("projector backward", bwd))
    log_dict = EMIModule.log_dict
    EMIModule.log_dict = timed("logging", log_dict)
    try:
        data = EMIDataModule(str(store), batch_size=32, val_split="train")
        model = EMIModule(dims=data.dims, targets=data.targets,
                          network=partial(EMINetwork, compile_windows=compile_windows),
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=1e-4))
        if compile_windows:  # compiled before the profile: a training and an inference pass
            data.setup("fit")
            batch = data.prepare_batch(next(iter(data.val_dataloader())))
            model.train()(batch)
            with torch.inference_mode():
                model.eval()(batch)
        profiler = SimpleProfiler(dirpath=str(root), filename="profile")  # its report to a file
        trainer = Trainer(accelerator="cpu", precision=precision, max_epochs=1,
                          limit_train_batches=steps, limit_val_batches=steps,
                          num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          gradient_clip_val=1.0, profiler=profiler,
                          use_distributed_sampler=False, default_root_dir=str(root),
                          callbacks=default_callbacks(root, ema=EMA(0.999), checkpoint=None,
                                                      last_checkpoint=None, lr_monitor=None))
        trainer.fit(model, datamodule=data)
    finally:
        projector._NormLinear.forward, projector._NormLinear.backward = fwd, bwd
        EMIModule.log_dict = log_dict
    total = {k: float(np.sum(v)) for k, v in profiler.recorded_durations.items()}

    def ms(*keys: str) -> float:
        return 1000 * sum(total.get(k, 0.0) for k in keys) / steps

    train_steps = len(spent["projector backward"]) // 3 or steps
    fwd_train = 1000 * sum(spent["projector forward"][:3 * train_steps]) / steps
    fwd_eval = 1000 * sum(spent["projector forward"][3 * train_steps:]) / steps
    out = {
        "loader (plan)": ms("[_TrainingEpochLoop].train_dataloader_next"),
        "loader (read rows)": ms("[LightningDataModule]EMIDataModule.on_before_batch_transfer"),
        "host -> model transfer": ms("[Strategy]SingleDeviceStrategy.batch_to_device"),
        "projector matmuls (forward)": fwd_train,
        "rest of the forward, loss": ms("[Strategy]SingleDeviceStrategy.training_step")
        - fwd_train - 1000 * sum(spent["logging"]) / steps,
        "projector matmuls (backward)": 1000 * sum(spent["projector backward"]) / steps,
        "rest of the backward": ms("[Strategy]SingleDeviceStrategy.backward")
        - 1000 * sum(spent["projector backward"]) / steps,
        "optimizer (and clipping)": ms("[LightningModule]EMIModule.optimizer_step")
        - ms("[Strategy]SingleDeviceStrategy.training_step",
             "[Strategy]SingleDeviceStrategy.backward"),
        "EMA": ms("[Callback]EMA.on_train_batch_end"),
        "logging": 1000 * sum(spent["logging"]) / steps,
        "training step, all": ms("run_training_batch",
                                 "[_TrainingEpochLoop].train_dataloader_next",
                                 "[LightningDataModule]EMIDataModule.on_before_batch_transfer",
                                 "[Strategy]SingleDeviceStrategy.batch_to_device"),
        "eval: projector (forward)": fwd_eval,
        "eval: step, all": ms("[Strategy]SingleDeviceStrategy.validation_step",
                              "[_EvaluationLoop].val_next",
                              "[LightningDataModule]EMIDataModule.on_before_batch_transfer"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile-windows", action="store_true",
                        help="the model with compile_windows: true")
    args = parser.parse_args()
    extra = ["--model.network.compile_windows", "true"] if args.compile_windows else []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", args.clips)
        from emimimic.data import EMIDataModule
        from emimimic.data.synth import PAPER_DIMS
        from emimimic.models import EMINetwork

        data = EMIDataModule(str(store), batch_size=32, val_split="train")
        batches = [data.prepare_batch(p) for p in data.val_dataloader()]
        net = EMINetwork(PAPER_DIMS)
        dtype = torch.bfloat16 if "bf16" in args.precision else torch.float32
        bound = MatmulBound(net, batches, dtype)
        bound_train = min(time_epoch(bound.train, batches) for _ in range(3))
        bound_eval = min(time_epoch(bound.eval, batches) for _ in range(3))
        floor = WindowFloor(batches, PAPER_DIMS)
        floor_copy = min(time_epoch(floor.copy, batches) for _ in range(3))
        del floor
        flops = sum(2 * b.window(m).first.shape[0] * PAPER_DIMS[m] * 256
                    for b in batches for m in PAPER_DIMS)
        e2e = cli_rows(store, Path(tmp) / "cli", args.epochs, args.precision, threads, extra)
        profile = phases(store, Path(tmp) / "profile", args.steps, args.precision,
                         args.compile_windows)
    n = args.clips
    print(f"{n} clips, paper dims {PAPER_DIMS}, lengths ~{LENGTHS}, batch 32, {args.precision}, "
          f"{threads} threads{', compile_windows' * args.compile_windows}; matmul bound"
          f" at {flops / bound_eval / 1e9:.1f} GFLOP/s "
          f"(forward) and {2 * flops / bound_train / 1e9:.1f} GFLOP/s (forward + backward)")
    print("\n| row | train clips/s | eval clips/s | train / matmul bound | eval / matmul bound |")
    print("|---|---|---|---|---|")
    print(f"| matmul bound | {n / bound_train:.1f} | {n / bound_eval:.1f} | 1.00 | 1.00 |")
    print(f"| end to end through the CLI | {e2e['train']:.1f} | {e2e['eval']:.1f} | "
          f"{e2e['train'] * bound_train / n:.2f} | {e2e['eval'] * bound_eval / n:.2f} |")
    per = 1000 / len(batches)
    print(f"\nfloat16 -> float32 windows alone: {per * floor_copy:.1f} ms per batch (bound: "
          f"{per * bound_train:.1f} train, {per * bound_eval:.1f} eval); the highest ratio a path "
          f"through a float32 library GEMM can reach here: train "
          f"{bound_train / (bound_train + floor_copy):.2f}, eval "
          f"{bound_eval / (bound_eval + floor_copy):.2f}")
    print("\n| phase | ms per step |\n|---|---|")
    for name, value in profile.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
