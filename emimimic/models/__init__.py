"""Plain ``nn.Module`` networks for EMI estimation (usable without a Trainer or the data package).

Everything here needs torch and :mod:`emimimic.contract` only. A network of your own follows the
contract and is given to ``EMIModule`` by class path; parts of :class:`EMINetwork` (fusions,
pooling, modality dropout) are chosen by its options.
"""

from emimimic.contract import EMIOutput, FeatureBatch
from emimimic.models.branches import (
    AttentionPooling,
    AudioVADBranch,
    BranchOutput,
    LSTMPooling,
    MeanPooling,
    ModalityBranch,
    TemporalEnhancer,
)
from emimimic.models.dropout import Dropout, drop_modalities, keep_counts
from emimimic.models.fusion import Fusion, FusionInput, FusionOutput, available_fusions
from emimimic.models.network import EMINetwork
from emimimic.models.projector import norm_linear
from emimimic.models.spec import NetworkFactory, build_network

__all__ = [
    "AttentionPooling",
    "AudioVADBranch",
    "BranchOutput",
    "Dropout",
    "EMINetwork",
    "EMIOutput",
    "FeatureBatch",
    "Fusion",
    "FusionInput",
    "FusionOutput",
    "LSTMPooling",
    "MeanPooling",
    "ModalityBranch",
    "NetworkFactory",
    "TemporalEnhancer",
    "available_fusions",
    "build_network",
    "drop_modalities",
    "keep_counts",
    "norm_linear",
]
