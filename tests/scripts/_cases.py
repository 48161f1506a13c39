"""The optimizers the two-process scripts train: every registered one, with settings that move a
tiny model in a few steps."""

from __future__ import annotations

import hf_rootfree  # the repository's: the scripts put it first on sys.path before importing this

#: keyword arguments besides the parameters and batch_size (a name not listed trains with lr 0.01)
SETTINGS = {
    "rootfree_adamw": {"lr": 0.05, "weight_decay": 0.01},
    "rootfree_rmsprop": {"lr": 0.01, "momentum": 0.9},
    "adax": {"lr": 0.01},
    "rootfree_adax": {"lr": 0.05},
    "sirfshampoo": {"lr": 0.01, "update_freq": 2, "precond_lr": 0.1},
}

#: name -> (optimizer class, keyword arguments besides the parameters and batch_size)
CASES = {name: (spec.cls, SETTINGS.get(name, {"lr": 0.01})) for name, spec in hf_rootfree.OPTIMIZERS.items()}
