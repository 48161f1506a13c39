"""Smoke test of an installed hf_rootfree wheel, as a user gets it from ``pip install``.

``.ci/run`` installs the built wheel (not editable) into a fresh virtual environment outside the
checkout and runs this file from a directory outside the checkout, so that only the installed
copy can be imported. It checks what a missing file in the wheel would break:

1. ``import hf_rootfree`` comes from site-packages, ``__version__`` is the installed
   distribution's version and a valid PEP 440 version, and ``py.typed`` is shipped;
2. the five ``--optim`` names are accepted by ``HfArgumentParser(TrainingArguments)``;
3. one ``Trainer`` step under each name changes the weights with the name's optimizer class;
4. the fused CPU kernel is compiled from the installed ``csrc/elementwise.cpp`` (into a fresh
   ``TORCH_EXTENSIONS_DIR``) and the element-wise names ran through it in step 3;
5. ``python -m hf_rootfree --help`` prints the usage.

Usage: ``python wheel_smoke.py`` (exits non-zero with the failed check). Not a pytest test:
pytest collects ``tests/`` only.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

EXPECTED_NAMES = ("rootfree_adamw", "rootfree_rmsprop", "adax", "rootfree_adax", "sirfshampoo")
ELEMENTWISE_NAMES = EXPECTED_NAMES[:4]


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke test FAILED: {message}")
    print(f"ok: {message}", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hf_rootfree_smoke_") as scratch:
        run(Path(scratch))


def run(scratch: Path) -> None:
    extensions = str(scratch / "torch_extensions")
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions  # a fresh build, never a cached one
    os.environ.pop("HF_ROOTFREE_FUSED", None)

    # 1. The installed package, its version and its data files.
    from packaging.version import Version

    import hf_rootfree

    package = Path(hf_rootfree.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    check(package.parent == site, f"hf_rootfree is imported from site-packages ({package})")
    installed = importlib.metadata.version("hf_rootfree")
    check(
        hf_rootfree.__version__ == installed and str(Version(installed)) == installed,
        f"__version__ {hf_rootfree.__version__!r} is the installed, PEP 440-normal version {installed!r}",
    )
    check((package / "py.typed").is_file(), "py.typed is installed")
    from hf_rootfree.optim import _fused, elementwise

    source = Path(_fused._SOURCE).resolve()
    check(
        source.is_file() and source.is_relative_to(package),
        f"the kernel source is installed inside the package ({source})",
    )

    # 2. The --optim names, through the parser a training script uses.
    from transformers import HfArgumentParser, Trainer, TrainingArguments

    from hf_rootfree.registry import OPTIMIZERS

    check(tuple(OPTIMIZERS) == EXPECTED_NAMES, f"OPTIMIZERS lists {EXPECTED_NAMES}")
    out = str(scratch / "trainer_output")
    parser = HfArgumentParser(TrainingArguments)
    for name in EXPECTED_NAMES:
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", out, "--optim", name])
        check(str(getattr(args.optim, "value", args.optim)) == name, f"--optim {name} parses")

    # 3. + 4. One Trainer step per name; count the fused kernel's calls.
    import torch

    fused_calls = []
    fused_step = elementwise._PATHS["fused"]

    def counting_fused_step(*args, **kwargs):
        fused_calls.append(1)
        return fused_step(*args, **kwargs)

    elementwise._PATHS["fused"] = counting_fused_step

    class TinyModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.head(torch.tanh(self.hidden(x)))
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=generator), "labels": torch.tensor(i % 3)} for i in range(8)]
    for name in EXPECTED_NAMES:
        torch.manual_seed(0)
        model = TinyModel()
        before = [p.detach().clone() for p in model.parameters()]
        calls_before = len(fused_calls)
        args = TrainingArguments(
            output_dir=out,
            optim=name,
            max_steps=1,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        result = trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        moved = all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
        check(
            type(optimizer) is OPTIMIZERS[name].cls and moved and result.global_step == 1,
            f"Trainer step with --optim {name}: {type(optimizer).__name__} moved every weight "
            f"(loss {result.training_loss:.4f})",
        )
        if name in ELEMENTWISE_NAMES:
            check(len(fused_calls) > calls_before, f"--optim {name} ran the fused kernel")

    builds = [Path(root) / "build.ninja" for root, _, files in os.walk(extensions) if "build.ninja" in files]
    check(
        len(builds) == 1 and str(source) in builds[0].read_text(),
        f"the fused kernel was compiled from the installed source into {extensions}",
    )

    # 5. The launcher.
    launcher = subprocess.run(
        [sys.executable, "-m", "hf_rootfree", "--help"], capture_output=True, text=True, check=False
    )
    check(
        launcher.returncode == 0
        and launcher.stdout.startswith("usage: python -m hf_rootfree")
        and all(name in launcher.stdout for name in EXPECTED_NAMES),
        "python -m hf_rootfree --help prints the usage with the five names",
    )
    print(f"wheel smoke test passed: hf_rootfree {installed} from {package}")


if __name__ == "__main__":
    main()
