"""Plain ``nn.Module`` networks for EMI estimation (usable without Lightning)."""

from emimimic.models.branches import (
    POOLINGS,
    AttentionPooling,
    AudioVADBranch,
    BranchOutput,
    MeanPooling,
    ModalityBranch,
    TemporalEnhancer,
)
from emimimic.models.network import FUSIONS, EMINetwork, EMIOutput

__all__ = [
    "FUSIONS",
    "POOLINGS",
    "AttentionPooling",
    "AudioVADBranch",
    "BranchOutput",
    "EMINetwork",
    "EMIOutput",
    "MeanPooling",
    "ModalityBranch",
    "TemporalEnhancer",
]
