"""Run a script on several processes, as users do: ``torchrun`` or ``accelerate launch``.

Each helper runs the launcher in a subprocess (one intra-op thread per process) and fails the
test with the end of its output when the launch does not succeed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def _run(command: list[str], cwd: Path, timeout: int) -> None:
    # the checkout's hf_rootfree (and the scripts' helpers next to them), installed or not
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])


def torchrun(script: Path, *args: str, cwd: Path, timeout: int = 300) -> None:
    """``torchrun --standalone --nproc_per_node 2 SCRIPT ARGS`` (a free port: no clash with other jobs)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*launch, str(script), *args], cwd, timeout)


def accelerate_launch(config: str, script: Path, *args: str, cwd: Path, timeout: int = 300) -> None:
    """``accelerate launch --config_file recipes/configs/CONFIG --mixed_precision no SCRIPT ARGS``.

    fp32 (the configs' bf16 is for GPUs) so that runs compare to fp32 tolerance, and a free port.
    """
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    _run([*launch, "--mixed_precision", "no", "--main_process_port", "0", str(script), *args], cwd, timeout)
