"""Mutation self-check: plant realistic bugs in a copy of the package and require the tests to fail.

Not collected by pytest (the name does not start with ``test_``). Run from the repository root::

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py batched    # only those whose name contains "batched"

For each mutation it copies the checked-in files (``git ls-files``) to a temporary directory,
replaces one snippet in one file, runs the tests that should catch it and fails if they pass.
Exit status 0 when every planted bug was caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    #: pytest arguments (relative to the repository root) that must fail
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(  # mixes same-shape blocks in one batched factor update
        "batched-factor-update-mixes-blocks",
        "hf_rootfree/optim/sirfshampoo.py",
        "trace_stack[a + 1 :]]).prod(dim=0)",
        "trace_stack[a + 1 :]]).prod()",
        ("tests/test_sirfshampoo_math.py", "-k", "batched"),
    ),
    Mutation(  # the Trainer-built SIRFShampoo no longer sees the model: no weight + bias sharing
        "trainer-model-dropped",
        "hf_rootfree/registry.py",
        'kwargs["trainer_model"] = model',
        "pass",
        ("tests/test_trainer.py", "-k", "expected_structures"),
    ),
    Mutation(  # the checkpoint's B replaces the run's on resume
        "checkpoint-batch-size-restored",
        "hf_rootfree/optim/_checkpoint.py",
        'new["batch_size"] = g["batch_size"]',
        "pass",
        ("tests/test_resume.py",),
    ),
    Mutation(  # factor updates one step late
        "update-freq-off-by-one",
        "hf_rootfree/optim/sirfshampoo.py",
        '% group["update_freq"] == 0',
        '% group["update_freq"] == 1',
        ("tests/test_sirfshampoo_math.py", "-k", "float64_oracle and dense"),
    ),
    Mutation(  # the element-wise step counter advances twice
        "elementwise-step-counts-twice",
        "hf_rootfree/optim/elementwise.py",
        "torch._foreach_add_(steps, 1.0)",
        "torch._foreach_add_(steps, 2.0)",
        ("tests/test_elementwise.py", "-k", "oracle and single_tensor"),
    ),
    Mutation(  # the optimizer claims to handle inf itself: the GradScaler then always calls step()
        "claims-amp-scaling",
        "hf_rootfree/optim/elementwise.py",
        "    _heavy_ball: bool = False\n",
        "    _heavy_ball: bool = False\n    _step_supports_amp_scaling = True\n",
        ("tests/test_mixed_precision.py", "-k", "grad_scaler"),
    ),
    Mutation(  # a host read of a device value inside step()
        "host-read-in-step",
        "hf_rootfree/optim/elementwise.py",
        "            params, grads, bufs, seconds = (\n",
        "            grads[0].abs().max().tolist()\n            params, grads, bufs, seconds = (\n",
        ("tests/test_elementwise.py", "-k", "never_reads and rootfree_adamw"),
    ),
]


def _copy(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def check(mutation: Mutation) -> tuple[bool, float, str]:
    """Plant ``mutation`` in a fresh copy and run its tests; returns (caught, seconds, detail)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_rootfree_mutant_") as tmp:
        copy = Path(tmp)
        _copy(copy)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return False, 0.0, f"the snippet occurs {text.count(mutation.old)} times in {mutation.path}"
        target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".ci" / "cache" / "torch_extensions"))
        where = subprocess.run(
            [sys.executable, "-c", "import hf_rootfree; print(hf_rootfree.__file__)"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(copy)):
            return False, 0.0, f"the copy imports hf_rootfree from {where}, not from itself"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
    seconds = time.perf_counter() - start
    last = (done.stdout.strip().splitlines() or [""])[-1]
    # exit 1: tests failed (caught); 0: all passed (missed); anything else: no tests ran or an error
    return done.returncode == 1, seconds, last


def main(argv: list[str]) -> int:
    selected = [m for m in MUTATIONS if not argv or any(word in m.name for word in argv)]
    missed = []
    total = time.perf_counter()
    for mutation in selected:
        caught, seconds, detail = check(mutation)
        print(
            f"{'caught' if caught else 'MISSED'}  {mutation.name:38s} {seconds:6.1f} s  {detail}", flush=True
        )
        if not caught:
            missed.append(mutation.name)
    caught = len(selected) - len(missed)
    print(f"{caught}/{len(selected)} planted bugs caught in {time.perf_counter() - total:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
