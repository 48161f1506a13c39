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
import torch
from optim_db import NAMES

SCRIPTS = Path(__file__).resolve().parent / "scripts"
CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


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


def test_ddp_split_work_gives_the_same_result_as_every_rank_doing_all_of_it(ddp_report):
    split, everyone = ddp_report["sirfshampoo"], ddp_report["sirfshampoo-not-split"]
    assert split["max_abs_error"] == everyone["max_abs_error"]
    # each rank preconditioned a share of the blocks, together all of them; unsplit, each did all
    total = split["preconditioned_one_process"]
    assert sum(split["preconditioned_per_rank"]) == total and max(split["preconditioned_per_rank"]) < total
    assert everyone["preconditioned_per_rank"] == [total, total]


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


def accelerate_launch(config: Path, *args: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--mixed_precision",
        "no",  # the configs' bf16 is for GPUs; the comparisons here are in fp32
        "--main_process_port",
        "0",  # a free port
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])


@pytest.fixture(scope="module")
def trainer_ddp_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ddp")  # accelerate launch --config_file recipes/configs/ddp.yaml
    accelerate_launch(CONFIGS / "ddp.yaml", str(SCRIPTS / "trainer_distributed.py"), str(out), tmp_path=out)
    return json.loads((out / "report.json").read_text())


def test_trainer_ddp_every_name_keeps_ranks_equal_uses_the_global_batch_and_resumes_exactly(
    trainer_ddp_report,
):
    report = trainer_ddp_report
    assert sorted(report) == sorted(NAMES)
    for name, entry in report.items():
        assert entry["world_size"] == 2 and entry["ranks_equal"], name
        assert entry["resume_max_abs_diff"] == 0.0, (name, entry)
        assert entry["moved"] > 1e-3, name
        assert not entry["sharded_parameters"], name
        assert "optimizer.pt" in entry["checkpoint"], name
        assert entry["batch_size"] == (None if name == "adax" else 8), name  # 4 per device x 2 processes


@pytest.mark.parametrize("route", ["accelerate-config", "training-arguments"])
def test_trainer_fsdp2_every_name_shards_checkpoints_resumes_exactly_and_matches_ddp(
    trainer_ddp_report, route, tmp_path
):
    script = str(SCRIPTS / "trainer_distributed.py")
    if route == "accelerate-config":  # accelerate launch --config_file recipes/configs/fsdp2.yaml
        accelerate_launch(CONFIGS / "fsdp2.yaml", script, str(tmp_path), "accelerate", tmp_path=tmp_path)
    else:  # TrainingArguments(fsdp=..., fsdp_config={"version": 2, ...}) under torchrun
        torchrun("trainer_distributed.py", str(tmp_path), "fsdp2", tmp_path=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report) == sorted(NAMES)
    for name, entry in report.items():
        assert entry["sharded_parameters"], name  # DTensor parameters: FSDP2 really ran
        assert {"optimizer_0", "pytorch_model_fsdp_0"} <= set(entry["checkpoint"]), name  # sharded (DCP)
        assert entry["world_size"] == 2 and entry["ranks_equal"], name
        assert entry["resume_max_abs_diff"] == 0.0, (name, entry)
        assert entry["batch_size"] == trainer_ddp_report[name]["batch_size"], name
        assert entry["moved"] > 1e-3, name
        sharded, replicated = torch.tensor(entry["final"]), torch.tensor(trainer_ddp_report[name]["final"])
        error = float((sharded - replicated).abs().max())
        assert error <= 1e-6, (name, error)  # fp32 tolerance: the same global batch, reduced differently
