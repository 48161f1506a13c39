"""Optimizers of hf_rootfree: one module per algorithm family."""

from .elementwise import AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop
from .sirfshampoo import SIRFShampoo

__all__ = ["AdaX", "RootFreeAdaX", "RootFreeAdamW", "RootFreeRMSprop", "SIRFShampoo"]
