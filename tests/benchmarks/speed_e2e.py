"""Benchmark: the training step end to end through the CLI, against the matmul bound, by phase.

On a store at the paper's dims (visual 768, audio 1024, text 4096) with realistic lengths (the
same as ``speed.py``), batch 32, the paper's final model, 32-true (or ``--precision``):

* ``end to end``: ``emimimic fit`` (the CLI with its loader, logging, EMA and clipping;
  checkpointing off) timed per epoch by a callback; training clips/s from the epochs after the
  first, evaluation clips/s from ``emimimic validate`` over the same clips;
* ``matmul bound``: only the projector matmuls of those batches (as in ``speed.py``), in the
  same process and run, so the ratios compare like with like; its GFLOP/s is printed so that
  another machine's figures can be compared;
* ``floor``: float16 -> float32 copies of the same batches' windows and the audio VAD layer's
  matmuls, into buffers made beforehand: the least that any path feeding torch's float32 GEMM
  from the store's float16 rows does beyond the bound (32-true; no LayerNorm statistics, no
  loader, no other layer); ``bound / (bound + floor)`` is then the highest ratio such a path
  can reach on this machine;
* ``by phase``: one ``Trainer.fit`` in this process with Lightning's ``SimpleProfiler``, the
  projector's forward and backward and ``log_dict`` timed on top: loader, transfer, the
  projector matmuls, the rest of the forward, backward, optimizer, EMA, logging (ms per step);
  the loader's reads of training and validation batches apart; "step, all" is the wall time of
  the training steps and of the validation batches after the first, per batch (every hook and
  the loop included).

``--compile-windows`` runs the model with ``compile_windows: true`` (the windows' gather and
LayerNorm statistics in one compiled kernel; the compile is warmed up before any timing, and it
then counts under "rest of the forward", the projector rows holding only the matmuls).

    python tests/benchmarks/speed_e2e.py --clips 1024 [--compile-windows]
    python tests/benchmarks/speed_e2e.py --clips 1024 --compare --rounds 4

``--compare`` measures both models in every round, the first going second in the next round;
``--rounds N`` then prints medians: on a shared machine whose speed drifts, only rows measured
side by side, each against its own bound, separate effects of 10 %.
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
    """Records each training epoch's wall seconds, clips and batches (a validation inside the
    epoch left out), and validation's from its second batch on (the first of a ``validate``
    process loads any compiled kernel): in :attr:`rows`, and as JSON lines in ``path`` if given
    (for a CLI run in another process). Every hook, callback and the loop itself count."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.rows: list[dict] = []
        self.start: dict[str, float] = {}
        self.clips = {"train": 0, "val": 0}
        self.batches = {"train": 0, "val": 0}
        self.paused: float | None = None

    def _record(self, stage: str, trainer) -> None:
        row = {"stage": stage, "epoch": trainer.current_epoch, "clips": self.clips[stage],
               "batches": self.batches[stage],
               "seconds": time.perf_counter() - self.start[stage]}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _count(self, stage: str, batch) -> None:
        self.clips[stage] += len(batch)
        self.batches[stage] += 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start["train"], self.clips["train"], self.batches["train"] = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count("train", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record("train", trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if "train" in self.start and self.paused is not None:  # not the training's time
            self.start["train"] += time.perf_counter() - self.paused

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        if batch_idx == 1:
            self.start["val"], self.clips["val"], self.batches["val"] = time.perf_counter(), 0, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if batch_idx >= 1:
            self._count("val", batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record("val", trainer)


class WindowFloor:
    """What a path through torch's float32 GEMM does beyond the bound, on each batch's own
    shapes, in buffers made beforehand (random values: the times do not depend on them): the
    float16 -> float32 copies of the ``[W, D]`` windows, and the audio VAD layer's matmul
    ``[W, H + 3] x [H + 3, H]`` (in training also its two backward matmuls: the projector's
    output below it needs a gradient)."""

    def __init__(self, batches: list, dims: dict[str, int], hidden: int = 256) -> None:
        self.pairs = [{m: (torch.randn(b.window(m).first.shape[0], d).half(),
                           torch.empty(b.window(m).first.shape[0], d)) for m, d in dims.items()}
                      for b in batches]
        self.vad = [(torch.randn(b.window("audio").first.shape[0], hidden + 3),
                     torch.randn(hidden, hidden + 3),
                     torch.randn(b.window("audio").first.shape[0], hidden)) for b in batches]
        self.batches = {id(b): i for i, b in enumerate(batches)}

    def copy(self, b) -> None:
        for src, dst in self.pairs[self.batches[id(b)]].values():
            dst.copy_(src)

    def eval(self, b) -> None:
        self.copy(b)
        x, w, _ = self.vad[self.batches[id(b)]]
        x @ w.t()

    def train(self, b) -> None:
        self.copy(b)
        x, w, gy = self.vad[self.batches[id(b)]]
        x @ w.t()
        gy @ w
        gy.t() @ x


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
        wall = EpochTimer()
        profiler = SimpleProfiler(dirpath=str(root), filename="profile")  # its report to a file
        trainer = Trainer(accelerator="cpu", precision=precision, max_epochs=1,
                          limit_train_batches=steps, limit_val_batches=steps,
                          num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          gradient_clip_val=1.0, profiler=profiler,
                          use_distributed_sampler=False, default_root_dir=str(root),
                          callbacks=[wall, *default_callbacks(root, ema=EMA(0.999), checkpoint=None,
                                                              last_checkpoint=None,
                                                              lr_monitor=None)])
        trainer.fit(model, datamodule=data)
    finally:
        projector._NormLinear.forward, projector._NormLinear.backward = fwd, bwd
        EMIModule.log_dict = log_dict
    durations = dict(profiler.recorded_durations)
    # the loader's reads and the transfers of both loops share their names: the training
    # batches' come first (the one validation runs after the epoch's training steps)
    for key, name in (("[LightningDataModule]EMIDataModule.on_before_batch_transfer", "reads"),
                      ("[Strategy]SingleDeviceStrategy.batch_to_device", "transfer")):
        both = durations.pop(key)
        if len(both) != 2 * steps:
            raise SystemExit(f"{key}: expected {steps} training and {steps} validation calls, "
                             f"got {len(both)} in all (fewer batches than --steps?)")
        durations[f"{name} (train)"], durations[f"{name} (eval)"] = both[:steps], both[steps:]
    total = {k: float(np.sum(v)) for k, v in durations.items()}

    def per_batch_ms(stage: str) -> float:  # the wall clock, every hook included
        row = next(r for r in wall.rows if r["stage"] == stage)
        return 1000 * row["seconds"] / row["batches"]

    def ms(*keys: str) -> float:
        return 1000 * sum(total.get(k, 0.0) for k in keys) / steps

    train_steps = len(spent["projector backward"]) // 3 or steps
    fwd_train = 1000 * sum(spent["projector forward"][:3 * train_steps]) / steps
    fwd_eval = 1000 * sum(spent["projector forward"][3 * train_steps:]) / steps
    out = {
        "loader (plan)": ms("[_TrainingEpochLoop].train_dataloader_next"),
        "loader (read rows)": ms("reads (train)"),
        "host -> model transfer": ms("transfer (train)"),
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
        "training step, all": per_batch_ms("train"),
        "eval: projector (forward)": fwd_eval,
        "eval: loader (read rows)": ms("reads (eval)"),
        "eval: step, all": per_batch_ms("val"),
    }
    return out


def measure(store: Path, root: Path, batches: list, args: argparse.Namespace,
            compiled: bool) -> dict:
    """Returns one measurement of a model variant: its bound, floor, CLI rows and phases."""
    from emimimic.data.synth import PAPER_DIMS
    from emimimic.models import EMINetwork

    dtype = torch.bfloat16 if "bf16" in args.precision else torch.float32
    bound = MatmulBound(EMINetwork(PAPER_DIMS), batches, dtype)
    bound_train = min(time_epoch(bound.train, batches) for _ in range(3))
    bound_eval = min(time_epoch(bound.eval, batches) for _ in range(3))
    del bound
    floor = WindowFloor(batches, PAPER_DIMS)
    copies = min(time_epoch(floor.copy, batches) for _ in range(3))
    floor_train = min(time_epoch(floor.train, batches) for _ in range(3))
    floor_eval = min(time_epoch(floor.eval, batches) for _ in range(3))
    del floor
    extra = ["--model.network.compile_windows", "true"] if compiled else []
    e2e = cli_rows(store, root / "cli", args.epochs, args.precision, torch.get_num_threads(),
                   extra)
    profile = phases(store, root / "profile", args.steps, args.precision, compiled)
    flops = sum(2 * b.window(m).first.shape[0] * PAPER_DIMS[m] * 256
                for b in batches for m in PAPER_DIMS)
    n, per = args.clips, 1000 / len(batches)
    return {"gflops": flops / bound_eval / 1e9, "gflops_train": 2 * flops / bound_train / 1e9,
            "bound train": n / bound_train, "bound eval": n / bound_eval,
            "train": e2e["train"], "eval": e2e["eval"],
            "train / bound": e2e["train"] * bound_train / n,
            "eval / bound": e2e["eval"] * bound_eval / n,
            "copies ms": per * copies, "floor train ms": per * floor_train,
            "floor eval ms": per * floor_eval,
            "highest train": bound_train / (bound_train + floor_train),
            "highest eval": bound_eval / (bound_eval + floor_eval), "phases": profile}


def _row(label: str, r: dict) -> str:
    return (f"| {label} | {r['gflops']:.1f} | {r['bound train']:.1f} / {r['bound eval']:.1f} | "
            f"{r['train']:.1f} / {r['eval']:.1f} | {r['train / bound']:.2f} | "
            f"{r['eval / bound']:.2f} | {r['copies ms']:.1f} | {r['floor train ms']:.1f} / "
            f"{r['floor eval ms']:.1f} | "
            f"{r['highest train']:.2f} / {r['highest eval']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile-windows", action="store_true",
                        help="the model with compile_windows: true")
    parser.add_argument("--compare", action="store_true",
                        help="both models, eager and compile_windows, alternating in each round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every model this many times; medians at the end")
    args = parser.parse_args()
    variants = [False, True] if args.compare else [args.compile_windows]
    name = {False: "eager", True: "compile_windows"}
    results: dict[bool, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", args.clips)
        from emimimic.data import EMIDataModule
        from emimimic.data.synth import PAPER_DIMS

        data = EMIDataModule(str(store), batch_size=32, val_split="train")
        batches = [data.prepare_batch(p) for p in data.val_dataloader()]
        print(f"{args.clips} clips, paper dims {PAPER_DIMS}, lengths ~{LENGTHS}, batch 32, "
              f"{args.precision}, {torch.get_num_threads()} threads; bound: the projector "
              "matmuls alone (GFLOP/s of the forward); copies: float16 -> float32 windows "
              "alone; floor: the copies and the VAD layer's matmuls, the least a path through "
              "torch's float32 GEMM does beyond the bound; highest: the ratio to the bound "
              "such a path reaches if all else is free", flush=True)
        for k in range(args.rounds):
            order = variants if k % 2 == 0 else variants[::-1]  # alternate who goes first
            for compiled in order:
                folder = Path(tmp) / f"round{k}-{name[compiled]}"
                results[compiled].append(measure(store, folder, batches, args, compiled))
                print(f"round {k + 1} {name[compiled]}: "
                      + _row("", results[compiled][-1]).strip("| "), flush=True)
    print("\n| round | model | bound GFLOP/s (fwd) | bound train / eval clips/s | end to end "
          "train / eval clips/s | train / bound | eval / bound | copies, ms per batch | floor "
          "train / eval, ms per batch | highest train / eval |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in range(args.rounds):
        order = variants if k % 2 == 0 else variants[::-1]
        for compiled in order:
            print(_row(f"{k + 1} | {name[compiled]}", results[compiled][k]))
    if args.rounds > 1:
        for compiled in variants:
            runs = results[compiled]
            median = {key: float(np.median([r[key] for r in runs]))
                      for key in runs[0] if key != "phases"}
            print(_row(f"median of {args.rounds} | **{name[compiled]}**", median))
    steps = list(results[variants[0]][0]["phases"])
    print("\n| phase (ms per step) | " + " | ".join(
        name[v] + (f": median of {args.rounds} (range)" if args.rounds > 1 else "")
        for v in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for step in steps:
        cells = []
        for compiled in variants:
            values = [r["phases"][step] for r in results[compiled]]
            cells.append(f"{np.median(values):.1f}" if len(values) == 1 else
                         f"{np.median(values):.1f} ({min(values):.1f}–{max(values):.1f})")
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
