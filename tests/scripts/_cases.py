"""The optimizers the two-process scripts train, with settings that move a tiny model in a few steps."""

from __future__ import annotations

import hf_rootfree  # the repository's: the scripts put it first on sys.path before importing this

#: name -> (optimizer class, keyword arguments besides the parameters and batch_size)
CASES = {
    "rootfree_adamw": (hf_rootfree.RootFreeAdamW, {"lr": 0.05, "weight_decay": 0.01}),
    "rootfree_rmsprop": (hf_rootfree.RootFreeRMSprop, {"lr": 0.01, "momentum": 0.9}),
    "adax": (hf_rootfree.AdaX, {"lr": 0.01}),
    "rootfree_adax": (hf_rootfree.RootFreeAdaX, {"lr": 0.05}),
    "sirfshampoo": (hf_rootfree.SIRFShampoo, {"lr": 0.01, "update_freq": 2, "precond_lr": 0.1}),
}
