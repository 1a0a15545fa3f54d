"""emimimic: Emotional Mimicry Intensity estimation with PyTorch Lightning."""

from emimimic.constants import EMOTIONS, MODALITIES, STEPS

__version__ = "0.1.0"
__all__ = ["EMOTIONS", "MODALITIES", "STEPS", "__version__"]
