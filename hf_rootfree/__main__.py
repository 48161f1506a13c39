"""Run an unmodified training script with hf_rootfree's ``--optim`` names registered.

Usage::

    python -m hf_rootfree path/to/script.py [script args ...]
    python -m hf_rootfree -m package.module [module args ...]
    accelerate launch -m hf_rootfree path/to/script.py [script args ...]

The script runs as ``__main__`` with ``sys.argv`` set to its own path and arguments, exactly as
``python path/to/script.py ...`` would run it, after :func:`hf_rootfree.register`.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = (
    "usage: python -m hf_rootfree SCRIPT.py [ARGS ...]\n"
    "       python -m hf_rootfree -m MODULE [ARGS ...]\n"
    "Registers the --optim names rootfree_adamw, rootfree_rmsprop, adax, rootfree_adax, sirfshampoo "
    "with transformers, then runs the script (or module) as __main__ with its own arguments."
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)

    from . import register

    register()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.isfile(script):
        print(f"hf_rootfree: no such script: {script}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
