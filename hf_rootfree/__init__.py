"""hf_rootfree: square-root-free adaptive optimizers for the Hugging Face stack.

Optimizers from Lin et al., "Can We Remove the Square-Root in Adaptive Gradient Methods? A
Second-Order Perspective" (ICML 2024) and AdaX (Li et al., 2020), as plain PyTorch optimizers.
"""

from .optim import AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop

__version__ = "0.1.0.dev0"

__all__ = ["AdaX", "RootFreeAdaX", "RootFreeAdamW", "RootFreeRMSprop", "__version__"]
