"""Plain ``nn.Module`` networks for EMI estimation (usable without a Trainer)."""

from emimimic.models.branches import (
    AttentionPooling,
    AudioVADBranch,
    BranchOutput,
    MeanPooling,
    ModalityBranch,
    TemporalEnhancer,
)
from emimimic.models.network import EMINetwork, EMIOutput, NetworkOptions
from emimimic.models.projector import norm_linear

__all__ = [
    "AttentionPooling",
    "AudioVADBranch",
    "BranchOutput",
    "EMINetwork",
    "EMIOutput",
    "MeanPooling",
    "ModalityBranch",
    "NetworkOptions",
    "TemporalEnhancer",
    "norm_linear",
]
