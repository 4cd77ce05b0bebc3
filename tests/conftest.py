"""Shared fixtures: tiny random BERT / XLM-R bases built in-process, isolated MLflow stores, corpora.

Nothing here touches the network: tokenizers are trained by `tokenizers` on text the tests write.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Tests never touch the network. huggingface_hub reads this once at import, so set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Nothing a test writes to the xlpeft cache (tiny bases, fingerprint memos) lands in the user's home.
os.environ["XLPEFT_CACHE"] = tempfile.mkdtemp(prefix="xlpeft-test-cache-")
atexit.register(shutil.rmtree, os.environ["XLPEFT_CACHE"], ignore_errors=True)

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from xlpeft.models import build_tiny_base, load_base  # noqa: E402

SW_WORDS = (
    "watu wote wamezaliwa huru hadhi na haki zao ni sawa wana akili na dhamiri hivyo yapasa "
    "watendeane kindugu kila mtu anastahili haki zote uhuru bila ubaguzi wa aina yoyote"
).split()
EN_WORDS = (
    "all human beings are born free and equal in dignity and rights they are endowed with reason "
    "and conscience and should act towards one another in a spirit of brotherhood"
).split()


def make_lines(words: list[str], n: int, seed: int = 0, length: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT (WordPiece) and XLM-R (Unigram) model directories, built once per session."""
    root = tmp_path_factory.mktemp("bases")
    texts = make_lines(SW_WORDS, 300) + make_lines(EN_WORDS, 300, seed=1)
    return {kind: build_tiny_base(kind, root / kind, texts, vocab_size=200) for kind in ("tiny-bert", "tiny-xlmr")}


@pytest.fixture(params=["tiny-bert", "tiny-xlmr"])
def base(request, base_dirs):
    """A freshly loaded frozen tiny base (one per architecture)."""
    return load_base(str(base_dirs[request.param]))


def use_store(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Work in ``root``: its own MLflow store, xlpeft cache and module directory, offline."""
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("XLPEFT_CACHE", str(root / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A clean working directory with its own MLflow store and xlpeft cache."""
    use_store(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture
def sw_corpus(tmp_path) -> Path:
    path = tmp_path / "sw.txt"
    path.write_text("\n".join(make_lines(SW_WORDS, 200, seed=2)) + "\n", encoding="utf-8")
    return path


PER = ["Amina", "Juma", "Obama", "Kenyatta", "Mary", "John"]
ORG = ["UNESCO", "Safaricom", "Google", "Arsenal"]
LOC = ["Nairobi", "Dodoma", "London", "Lagos", "Kenya"]
FILL = ["the", "visited", "met", "in", "said", "that", "works", "for", "yesterday", "and"]


def make_ner(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Template NER sentences a tiny model can learn: entity words come from small fixed lists."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        sent = [(rng.choice(PER), "B-PER"), (rng.choice(FILL), "O"), (rng.choice(FILL), "O")]
        if rng.random() < 0.5:
            sent += [(rng.choice(ORG), "B-ORG"), (rng.choice(FILL), "O")]
        sent += [("in", "O"), (rng.choice(LOC), "B-LOC")]
        if rng.random() < 0.3:
            sent += [("City", "I-LOC")]
        sentences.append(sent)
    return sentences


def write_conll(path: Path, sentences) -> Path:
    path.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in s) for s in sentences) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def ner_files(tmp_path) -> dict[str, Path]:
    return {"train": write_conll(tmp_path / "train.conll", make_ner(160, seed=1)),
            "eval": write_conll(tmp_path / "eval.conll", make_ner(40, seed=2))}
