"""The engine every stage runs on: ``Trainer.predict`` over groups of clips.

A stage is a LightningModule (the encoder, on the device) plus a preparer (decoding and
preprocessing, in DataLoader workers). Clips are cut into fixed groups of ``batch_size`` in split
order; a group is one batch. A group is skipped when all its clips are done, and otherwise
recomputed whole, so a resumed run batches every clip exactly as an uninterrupted one would (and
writes identical results). Results are written by a prediction writer as each batch ends, one
file per clip (see :mod:`emimimic.extract.work`), so nothing accumulates in memory.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning.pytorch as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset

from emimimic.errors import UserError
from emimimic.extract.media import EXPECTED_REASONS, BadClip, Failure
from emimimic.extract.work import Clip, WorkFolder
from emimimic.hardware import auto_precision
from emimimic.noise import quiet_dependencies

#: ``bad_input``: record a bad clip as missing and go on, or stop with an error naming it.
BadInput = Literal["record", "error"]


@dataclass
class ClipBatch:
    """The clips of one group: those with inputs (``ids``, in order) and those that failed.

    Subclasses add the model inputs of ``ids``; a stage's ``predict_step`` returns
    ``{clip id: result}`` for every id.
    """

    ids: list[str]
    failures: dict[str, Failure]


class Preparer(Protocol):
    """Decodes clips and builds batches; runs in DataLoader workers, so it must pickle."""

    def prepare(self, clip: Clip) -> Any:
        """Returns one clip's model inputs; raises :class:`BadClip` when it has none."""

    def collate(self, ids: list[str], items: list[Any], failures: dict[str, Failure]
                ) -> ClipBatch:
        """Returns the batch of a group from the prepared items of ``ids``."""


@dataclass
class Stage:
    """One extraction stage: its name, encoder, preparer and provenance record."""

    name: str
    module: L.LightningModule
    preparer: Preparer
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineOptions:
    """How stages run (``--engine.*``): clips per batch, decoding workers, the Trainer's devices.

    Attributes:
        batch_size: clips per batch; a resumed run batches the clips as the first run did.
        num_workers: DataLoader workers that decode clips.
        accelerator: Lightning accelerator (auto, cpu, gpu).
        devices: devices to use (auto, a count, or a list of indices).
        num_nodes: machines.
        strategy: Lightning strategy, e.g. ddp for several GPUs.
        precision: auto (bf16-mixed on a GPU with bf16, else 16-mixed; 32-true on a CPU), or any
            Trainer precision (16-mixed, bf16-true, ...).
        progress: show progress bars.
    """

    batch_size: PositiveInt = 8
    num_workers: NonNegativeInt = 2
    accelerator: str = "auto"
    devices: str | int | list[int] = "auto"
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    precision: str = "auto"
    progress: bool = True

    def resolved_precision(self) -> str:
        """Returns the Trainer precision: ``auto`` is training's choice on a GPU
        (:func:`emimimic.hardware.auto_precision`), and 32-true on a CPU, where the stored
        features stay exact float32 encodings."""
        if self.precision != "auto":
            return self.precision
        if self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            return auto_precision(self.accelerator)[0]
        return "32-true"


class GroupDataset(Dataset):
    """Item ``g`` is the prepared batch of clip group ``g`` (decoding happens here, in workers)."""

    def __init__(self, groups: Sequence[Sequence[Clip]], preparer: Preparer) -> None:
        self.groups = [list(g) for g in groups]
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> ClipBatch:
        ids: list[str] = []
        items: list[Any] = []
        failures: dict[str, Failure] = {}
        for clip in self.groups[g]:
            try:
                items.append(self.preparer.prepare(clip))
            except BadClip as bad:
                failures[clip.id] = bad.failure
                continue
            ids.append(clip.id)
        return self.preparer.collate(ids, items, failures)


class ClipDataModule(L.LightningDataModule):
    """Serves the groups of a stage for ``predict``, one prepared batch per group."""

    def __init__(self, dataset: GroupDataset, num_workers: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        """Returns a loader that yields the dataset's batches as they are (no re-batching)."""
        return DataLoader(self.dataset, batch_size=None, shuffle=False,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())


class ClipWriter(BasePredictionWriter):
    """Writes each clip's result (or failure) into the work folder as its batch ends."""

    def __init__(self, work: WorkFolder, stage: str, bad_input: BadInput) -> None:
        super().__init__(write_interval="batch")
        self.work = work
        self.stage = stage
        self.bad_input = bad_input

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           prediction: Any, batch_indices: Sequence[int] | None, batch: Any,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        """Saves the batch's results and failures; under ``--bad-input error`` a failure stops."""
        for clip, failure in batch.failures.items():
            if self.bad_input == "error" and failure.reason not in EXPECTED_REASONS:
                raise UserError(f"clip {clip} ({self.stage}): {failure.reason}: {failure.detail}; "
                                "use --bad_input record to record such clips as missing")
            self.work.save_failure(self.stage, clip, failure)
        for clip, result in prediction.items():
            if isinstance(result, str):
                self.work.save_transcript(clip, result)
            else:
                self.work.save_features(self.stage, clip, result)


class StageProgressBar(TQDMProgressBar):
    """The predict progress bar, titled with the stage's name."""

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title

    @property
    def predict_description(self) -> str:
        """The bar's title."""
        return self.title


class LayerEncoder(L.LightningModule):
    """A Hugging Face encoder run by ``Trainer.predict`` that returns one chosen layer.

    Subclasses define ``predict_step`` (returning ``{clip id: float32 [frames, D]}``).

    Args:
        model: the Hugging Face model (put in eval mode).
        name: its name or path, for messages.
        layer: index into ``hidden_states``, or None for ``last_hidden_state``.
    """

    def __init__(self, model: torch.nn.Module, name: str, layer: int | None) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.layer = layer


def groups_of(clips: Sequence[Clip], size: int) -> list[list[Clip]]:
    """Returns ``clips`` cut into consecutive groups of ``size`` (the last may be shorter)."""
    return [list(clips[i:i + size]) for i in range(0, len(clips), size)]


def run_stage(stage: Stage, clips: Sequence[Clip], work: WorkFolder, options: EngineOptions,
              bad_input: BadInput) -> int:
    """Runs a stage over the clips not done yet; returns how many groups it computed."""
    pending = [g for g in groups_of(clips, options.batch_size)
               if not all(work.done(stage.name, c.id) for c in g)]
    if not pending:
        return 0
    quiet_dependencies()
    trainer = L.Trainer(
        accelerator=options.accelerator, devices=options.devices, num_nodes=options.num_nodes,
        strategy=options.strategy, precision=options.resolved_precision(), logger=False,
        enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=options.progress,
        callbacks=[ClipWriter(work, stage.name, bad_input),
                   *([StageProgressBar(f"{stage.name} ({len(pending)} batches)")]
                     if options.progress else [])])
    with warnings.catch_warnings():
        # the writer has no use for batch indices, which a DataLoader of whole groups lacks
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(stage.module,
                        datamodule=ClipDataModule(GroupDataset(pending, stage.preparer),
                                                  options.num_workers),
                        return_predictions=False)
    trainer.strategy.barrier()
    return len(pending)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the encoders
# ----------------------------------------------------------------------------------------------


def provenance_of(options: Any) -> dict[str, Any]:
    """Returns a stage's options as its provenance record: every field that can change results.

    Fields whose ``metadata`` says ``{"provenance": False}`` (batching, memory) are left out, so
    changing them does not make earlier results look as if made by other settings.
    """
    return {f.name: (str(v) if isinstance(v := getattr(options, f.name), Path) else v)
            for f in fields(options) if f.metadata.get("provenance", True)}


def weights_sha256(model: torch.nn.Module) -> str:
    """Returns a SHA-256 over the model's parameters and buffers (names, dtypes, shapes, bytes).

    It identifies the weights whatever their file format or where they were loaded from.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parse_layer(text: str, option: str = "layer") -> int | None:
    """Returns the layer option as an index into ``hidden_states``, or None for ``last``.

    Raises:
        UserError: neither ``last`` nor an integer (naming ``option``, e.g. ``--text.layer``).
    """
    if text == "last":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{option} {text!r}: expected 'last' or an integer index into the "
                        "model's hidden states (0 = embeddings, -1 = last layer)") from None


def hidden_state_count(config: Any) -> tuple[int, str] | None:
    """Returns how many hidden states the model's config says it returns, and why; None when
    the config does not say.

    Transformers return the embeddings plus one state per layer: ``num_hidden_layers`` + 1
    (ViT, WavLM, Llama...; GPT-2's ``n_layer`` is mapped onto it), or for stage-wise models that
    do not set it (ResNet, RegNet) ``len(depths)`` + 1. A few models return fewer than their
    config says (EfficientNet, PoolFormer): the count is then an upper bound, never a refusal of
    a layer the model has, and :func:`select_layer` checks the rest when the model runs.
    """
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        return layers + 1, f"num_hidden_layers {layers} + the embeddings"
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and depths:
        return len(depths) + 1, f"{len(depths)} stages in depths + the embeddings"
    return None


def check_layer(option: str, layer: int | None, config: Any, model_name: str) -> None:
    """Checks a parsed layer option (:func:`parse_layer`) against the model's config, so that a
    layer the model lacks fails when the model is loaded, not on the first batch.

    Raises:
        UserError: naming the option, the model and the indices it has.
    """
    counted = hidden_state_count(config)
    if layer is None or counted is None:
        return
    count, why = counted
    if not -count <= layer < count:
        raise UserError(f"{option} {layer}: model {model_name} has {count} hidden states "
                        f"({why}); use last or an index from {-count} to {count - 1}")


def select_layer(output: Any, layer: int | None, model_name: str) -> torch.Tensor:
    """Returns ``last_hidden_state`` (layer None) or ``hidden_states[layer]`` of a model output.

    Raises:
        UserError: the layer index is out of range for the model.
    """
    if layer is None:
        return output.last_hidden_state
    states = output.hidden_states
    if not -len(states) <= layer < len(states):
        raise UserError(f"{model_name}: layer {layer} out of range; the model has "
                        f"{len(states)} hidden states (indices {-len(states)}..{len(states) - 1})")
    return states[layer]


def load_pretrained(loader: Any, name: str, revision: str | None, option: str,
                    **kwargs: Any) -> Any:
    """Returns ``loader.from_pretrained(name, revision=...)``, any failure as a UserError.

    Loading is quiet (transformers' per-tensor progress bar and load report are for notebooks;
    e.g. a causal LM's unused ``lm_head`` is expected here).
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(name, revision=revision, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{option} {name!r}: cannot load it with {loader.__name__} ({err})"
                        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Returns a float32 numpy copy of a tensor on the CPU."""
    return t.detach().float().cpu().numpy()
