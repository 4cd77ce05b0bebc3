"""The offline POS benchmark end to end on the tiny base: benchmarks/transfer_pos.py -> pipelines/pos-universal.yaml.

The prepared data are written here in the layout and formats ``xlpeft prepare-data`` writes (CoNLL
in the 12 universal tags, a SOURCE.json carrying the pins, Bible text one verse a line), so the
pipeline's prepare-data steps find them prepared and nothing is fetched; everything after that is
the code users run, with step counts cut to seconds.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from xlpeft.data import bible
from xlpeft.data.pos_sources import POS_SOURCES
from xlpeft.data.registry_packages import data_dir
from xlpeft.data.tagmaps import mapping_path
from xlpeft.recipes.prepare_data import file_sha256, pack_translations

ROOT = Path(__file__).resolve().parents[2]
WORDS = {"NOUN": ["kitap", "ev", "su"], "VERB": ["gel", "git"], "ADJ": ["güzel"], ".": ["."], "DET": ["bir"]}


def sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tags = [rng.choice(["DET", "ADJ", "NOUN"]) for _ in range(rng.randint(2, 5))] + ["VERB", "."]
        out.append([(rng.choice(WORDS[t]), t) for t in tags])
    return out


def write_prepared() -> None:
    """Every pos-universal language and every pack Bible translation, as prepare-data leaves them."""
    for i, source in enumerate(POS_SOURCES):
        out = data_dir() / "pos-universal" / source.lang
        out.mkdir(parents=True)
        splits = {}
        for j, split in enumerate(("train", "dev", "test")):
            sents = sentences(24 if split == "train" else 8, seed=10 * i + j)
            (out / f"{split}.conll").write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sents) + "\n",
                                                encoding="utf-8")
            splits[split] = {"sentences": len(sents)}
        record = {"sha256": source.package.sha256, "tag_map_sha256": file_sha256(mapping_path(source.tag_map)),
                  "splits": splits}
        (out / "SOURCE.json").write_text(json.dumps(record), encoding="utf-8")
    for code in pack_translations():
        path = bible.corpus_path(code)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(" ".join(w for w, _ in s) for s in sentences(60, seed=99)) + "\n", encoding="utf-8")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("transfer_pos", ROOT / "benchmarks" / "transfer_pos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_runs_the_pipeline_and_reports_every_cell_over_seeds(workdir, capsys):
    write_prepared()
    readme = workdir / "README.md"
    readme.write_text("# Benchmarks\n\nkept text\n", encoding="utf-8")
    bench = load_benchmark()
    args = ["--base", "tiny-bert", "--seeds", "1,2", "--var", "langs=tr,km", "--var", "lang_steps=4",
            "--var", "task_steps=6", "--var", "seq_len=32", "--var", "lang_batch=4", "--var", "task_batch=4",
            "--var", f"out={workdir / 'mods'}", "--readme", str(readme)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "mods" / "tiny-bert" / "report" / "seeds.json").read_text())
    assert summary["seeds"] == [1, 2] and set(summary["values"]) == {"tr", "km"}
    cells = {"adapter+adapter", "adapter+sft", "sft+adapter", "sft+sft", "baseline+adapter", "baseline+sft",
             "in-language+adapter"}
    for lang in ("tr", "km"):
        assert set(summary["values"][lang]) == cells
        assert all(len(v) == 2 and all(0.0 <= x <= 1.0 for x in v) for v in summary["values"][lang].values())
        assert "exceeds_spread" in summary["summary"][lang]["adapter+adapter"]
    assert summary["baseline_langs"] == {"adapter": "en", "sft": "en"}
    assert "budget used:" in out and "of 24 steps" in out and "in-language+adapter" in out
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n") and "<!-- transfer_pos base=tiny-bert seeds=1,2 begin -->" in text
    assert "| tr |" in text and "| km |" in text and "CPU cores" in text

    # a second run continues instead of retraining: every training step is done, only the report reruns
    assert bench.main(args) == 0
    out = capsys.readouterr()
    assert "train-lang" in out.err and out.err.count("    runs") <= 4  # prepare-data x2, prepare-base, evaluate
    assert readme.read_text().count("transfer_pos base=tiny-bert seeds=1,2 begin") == 1


@pytest.mark.slow
def test_methods_pipeline_scores_every_method_pair(workdir, capsys):
    """pipelines/pos-methods.yaml: two other families' modules into the same folders, every pair of them scored."""
    from xlpeft.cli import cli

    write_prepared()
    out = workdir / "mods"
    args = ["run", str(ROOT / "pipelines" / "pos-methods.yaml"), *[a for v in (
        "base=tiny-bert", "seeds=1", "langs=tr", "methods=lora,prefix", "lang_steps=3", "task_steps=4", "seq_len=32",
        "lang_batch=4", "task_batch=4", f"out={out}") for a in ("--var", v)]]
    decisions = cli.main(args=args, prog_name="xlpeft", standalone_mode=False)
    assert sum(d.run for d in decisions) == len(decisions) == 3 + 2 * 2 + 2 + 1
    summary = json.loads((out / "tiny-bert" / "report-methods" / "seeds.json").read_text())
    assert set(summary["values"]["tr"]) == {"lora+lora", "lora+prefix", "prefix+lora", "prefix+prefix",
                                            "baseline+lora", "baseline+prefix"}
    assert summary["baseline_langs"] == {"lora": "en", "prefix": "en"}
    assert sorted(p.name for p in (out / "tiny-bert" / "s1").iterdir()) == [
        "lang-en-lora", "lang-en-prefix", "lang-tr-lora", "lang-tr-prefix", "task-pos-en-lora", "task-pos-en-prefix"]
