"""Two CPU processes (gloo): DDP and FSDP2 with every optimizer, through a plain loop and the Trainer.

Each test launches a script from ``tests/scripts/`` with ``torchrun --nproc_per_node 2`` and
checks the JSON report its rank 0 writes. Each test name is a claim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from optim_db import NAMES

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def torchrun(script: str, *args: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free port: no clash with other jobs on the machine
        "--nproc_per_node",
        "2",
        str(SCRIPTS / script),
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])


@pytest.fixture(scope="module")
def ddp_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_equality.py", str(out / "report.json"), tmp_path=out)
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("case", [*NAMES, "sirfshampoo-not-split", "sirfshampoo-bf16"], ids=lambda case: case)
def test_ddp_ranks_hold_bitwise_equal_state_equal_to_one_process_on_the_global_batch(ddp_report, case):
    entry = ddp_report[case]
    assert entry["ranks_bitwise_equal"]
    assert entry["same_layout"]
    assert entry["moved"] > 1e-3  # training moved the parameters: the comparison is not vacuous
    # fp32 tolerance: DDP averages the two half-batch gradients, one process takes the mean directly
    assert entry["max_abs_error"] <= 1e-6 * max(1.0, entry["max_abs_value"]), entry


def test_ddp_split_factor_work_gives_the_same_result_as_every_rank_doing_all_of_it(ddp_report):
    split, everyone = ddp_report["sirfshampoo"], ddp_report["sirfshampoo-not-split"]
    assert split["max_abs_error"] == everyone["max_abs_error"]


def test_fsdp2_sharded_parameters_train_like_one_process_and_resume_from_a_sharded_checkpoint(tmp_path):
    torchrun("fsdp2_equality.py", str(tmp_path / "report.json"), tmp_path=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report) == sorted(NAMES)
    for name, entry in report.items():
        assert entry["sharded_parameters"], name
        assert "DTensor" in entry["state_types"], name  # state sharded like the parameters
        assert entry["ranks_equal"], name
        assert entry["moved"] > 1e-3, name
        assert entry["max_abs_error_vs_one_process"] <= 1e-6, (name, entry)
        assert entry["resume_max_abs_diff"] == 0.0, (name, entry)  # bitwise, through DCP


def test_trainer_ddp_every_name_keeps_ranks_equal_uses_the_global_batch_and_resumes_exactly(tmp_path):
    torchrun("trainer_distributed.py", str(tmp_path), tmp_path=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report) == sorted(NAMES)
    for name, entry in report.items():
        assert entry["world_size"] == 2 and entry["ranks_equal"], name
        assert entry["resume_max_abs_diff"] == 0.0, (name, entry)
        assert entry["moved"] > 1e-3, name
        if name != "adax":  # B = 4 per device × 2 processes
            assert entry["batch_size"] == 8, (name, entry)
