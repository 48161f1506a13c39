"""SIRFShampoo with the paper's update (``lr_units="paper"``) as its default.

The SIRFShampoo tests are written against the paper's equations (the float64 oracle and the
reference package ``sirfshampoo==0.0.1``), so they keep testing that mode after the package's
default moved to ``lr_units="adamw"``; ``test_sirfshampoo_math.py`` tests the default on its own.
"""

from __future__ import annotations

from typing import Any

from hf_rootfree import SIRFShampoo as _SIRFShampoo


class SIRFShampoo(_SIRFShampoo):
    def __init__(self, *args: Any, lr_units: str = "paper", **kwargs: Any) -> None:
        super().__init__(*args, lr_units=lr_units, **kwargs)
