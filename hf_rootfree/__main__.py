"""Run an unmodified training script with hf_rootfree's ``--optim`` names registered.

Usage::

    python -m hf_rootfree path/to/script.py [script args ...]
    python -m hf_rootfree -m package.module [module args ...]
    accelerate launch -m hf_rootfree path/to/script.py [script args ...]

The script runs as ``__main__`` with ``sys.argv`` set to its own path and arguments, exactly as
``python path/to/script.py ...`` would run it, after :func:`hf_rootfree.register` and a check of
``--optim_args`` when ``--optim`` names one of ours (so a bad value stops the run at once, exit code
2, before the script loads any data).
"""

from __future__ import annotations

import os
import runpy
import sys


def usage() -> str:
    from .registry import OPTIMIZERS

    return (
        "usage: python -m hf_rootfree SCRIPT.py [ARGS ...]\n"
        "       python -m hf_rootfree -m MODULE [ARGS ...]\n"
        f"Registers the --optim names {', '.join(OPTIMIZERS)} with transformers, checks --optim_args "
        "for them, then runs the script (or module) as __main__ with its own arguments."
    )


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` (or its dashed alias) in a script's arguments."""
    value = None
    for flag in (f"--{name}", f"--{name.replace('_', '-')}"):
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg[len(flag) + 1 :]
    return value


def check_optim_args(script_args: list[str]) -> None:
    """Check ``--optim_args`` for one of our ``--optim`` names before the script runs (a typo then
    costs a second, not a dataset load and a traceback); exit 2 with the message, as argparse does."""
    from .registry import OPTIMIZERS, check_optimizer_kwargs, parse_optim_args

    name = _option(script_args, "optim")
    if name not in OPTIMIZERS:
        return  # not ours: transformers checks it
    try:
        check_optimizer_kwargs(name, parse_optim_args(name, _option(script_args, "optim_args")))
    except ValueError as error:
        print(f"hf_rootfree: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)

    from . import register

    register()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(usage(), file=sys.stderr)
            raise SystemExit(2)
        check_optim_args(argv[2:])
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.isfile(script):
        print(f"hf_rootfree: no such script: {script}\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    check_optim_args(argv[1:])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
