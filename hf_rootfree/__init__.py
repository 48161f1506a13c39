"""hf_rootfree: square-root-free adaptive optimizers for the Hugging Face stack.

Optimizers from Lin et al., "Can We Remove the Square-Root in Adaptive Gradient Methods? A
Second-Order Perspective" (ICML 2024) and AdaX (Li et al., 2020), as plain PyTorch optimizers.

Importing the package registers the ``--optim`` names of :data:`OPTIMIZERS` with transformers:
{names}. :func:`register` is the explicit, idempotent form. If transformers' internals are not
what we expect, the import only warns, so the optimizers stay usable; :func:`register` raises with
the reason and the fallback :func:`optimizer_cls_and_kwargs`.

The version (``__version__``) follows PEP 440: ``MAJOR.MINOR.PATCH`` for releases and the next
release plus ``.devN`` between them.
"""

import warnings

from .optim import AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo
from .registry import OPTIMIZERS, optimizer_cls_and_kwargs, parse_optim_args

if __doc__:  # (None under python -OO) one list of names: the registry's
    __doc__ = __doc__.format(names=", ".join(f"``{name}``" for name in OPTIMIZERS))
__version__ = "0.1.0.dev0"

__all__ = [
    "OPTIMIZERS",
    "AdaX",
    "RootFreeAdaX",
    "RootFreeAdamW",
    "RootFreeRMSprop",
    "SIRFShampoo",
    "__version__",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "register",
]


def register() -> None:
    """Register the ``--optim`` names with transformers (idempotent).

    Raises:
        hf_rootfree.integrations.transformers.IntegrationError: transformers' internals changed;
            the message names the fallback :func:`optimizer_cls_and_kwargs`.
    """
    from .integrations.transformers import register as _register

    _register()


try:
    register()
except Exception as _error:  # keep the optimizers importable whatever transformers does
    warnings.warn(f"hf_rootfree: --optim names not registered: {_error}", RuntimeWarning, stacklevel=2)
