"""notrainer: one readable training loop for Hugging Face models on Accelerate."""

from .errors import UsageError
from .loop import Loop, make_accelerator

__all__ = ["Loop", "make_accelerator", "UsageError"]
__version__ = "0.1.0"
