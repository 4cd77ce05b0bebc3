"""Seed tables: mean ± std per cell, the difference from the baseline and the spread rule, grouping by seed."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule, Manifest
from xlpeft.matrix import Matrix
from xlpeft.seeds import SeedTable, group_by_seed


def matrix(rows: dict[str, dict[str, float]], skipped: dict[str, str] | None = None) -> Matrix:
    return Matrix("accuracy", rows, skipped or {}, {"adapter": "en"})


def table(seeds: dict[int, dict[str, dict[str, float]]]) -> SeedTable:
    return SeedTable.of({s: matrix(rows) for s, rows in seeds.items()})


def test_cells_are_mean_and_sample_std_over_seeds():
    t = table({1: {"tr": {"adapter+adapter": 0.60, "baseline+adapter": 0.50}},
               2: {"tr": {"adapter+adapter": 0.70, "baseline+adapter": 0.52}},
               3: {"tr": {"adapter+adapter": 0.62, "baseline+adapter": 0.48}}})
    mean, std, n = t.stats("tr", "adapter+adapter")
    assert (n, t.seeds) == (3, [1, 2, 3])
    assert mean == pytest.approx(statistics.fmean([0.60, 0.70, 0.62]))
    assert std == pytest.approx(statistics.stdev([0.60, 0.70, 0.62]))
    diff, exceeds = t.versus_baseline("tr", "adapter+adapter")
    assert diff == pytest.approx(mean - 0.50)
    assert exceeds == (diff > std + statistics.stdev([0.50, 0.52, 0.48]))
    assert t.versus_baseline("tr", "baseline+adapter") is None


def test_a_difference_inside_the_seed_spread_is_not_marked():
    t = table({1: {"km": {"sft+adapter": 0.40, "baseline+adapter": 0.45}},
               2: {"km": {"sft+adapter": 0.60, "baseline+adapter": 0.41}}})
    diff, exceeds = t.versus_baseline("km", "sft+adapter")
    assert diff == pytest.approx(0.07) and not exceeds
    assert "0.500 ± 0.141 (+0.070)" in t.cell("km", "sft+adapter") and "*" not in t.cell("km", "sft+adapter")
    t2 = table({1: {"km": {"sft+adapter": 0.60, "baseline+adapter": 0.40}},
                2: {"km": {"sft+adapter": 0.61, "baseline+adapter": 0.41}}})
    assert t2.versus_baseline("km", "sft+adapter")[1] and t2.cell("km", "sft+adapter").endswith("*)")


def test_columns_order_cells_then_baselines_then_ceilings_and_markdown_has_every_row(tmp_path: Path):
    t = table({1: {"id": {"in-language+adapter": 0.9, "baseline+adapter": 0.5, "sft+adapter": 0.6, "adapter+adapter": 0.7},
                   "tr": {"baseline+adapter": 0.3, "adapter+adapter": 0.4}}})
    assert t.columns() == ["adapter+adapter", "sft+adapter", "baseline+adapter", "in-language+adapter"]
    md = t.markdown()
    assert md.splitlines()[0] == "| accuracy | adapter+adapter | sft+adapter | baseline+adapter | in-language+adapter |"
    assert "| tr | 0.400 (+0.100) | – | 0.300 | – |" in md and "supervised ceiling" in md  # one seed: no ± shown
    t.save(tmp_path, "test")
    assert {p.name for p in tmp_path.iterdir()} == {"seeds.json", "seeds.txt", "seeds.md", "seeds.png"}


def test_a_language_skipped_for_one_seed_is_reported():
    t = SeedTable.of({1: matrix({"tr": {"adapter+adapter": 0.5}}), 2: matrix({}, {"tr": "no language module"})})
    assert t.skipped == {"tr": "seed 2: no language module"} and t.stats("tr", "adapter+adapter")[2] == 1


def module(kind: str, lang: str, method: str, seed, task: str | None = None, path: str = "m") -> LoadedModule:
    manifest = Manifest(kind, method, {"fingerprint": "f"}, {}, lang=lang, task=task,
                        training={} if seed is None else {"seed": seed})
    return LoadedModule(manifest, {}, Path(path))


def test_group_by_seed_keeps_language_and_task_modules_of_the_task():
    groups = group_by_seed([module("language", "tr", "adapter", 2), module("task", "en", "adapter", 2, "pos"),
                            module("task", "en", "adapter", 2, "ner"), module("language", "tr", "sft", 1)], "pos")
    assert list(groups) == [1, 2]
    assert set(groups[2].lang_mods) == {("tr", "adapter")} and set(groups[2].task_mods) == {("en", "adapter")}


def test_group_by_seed_refuses_ambiguity_and_missing_seeds():
    with pytest.raises(XlpeftError, match="two language modules for tr with method adapter and seed 1: a and b"):
        group_by_seed([module("language", "tr", "adapter", 1, path="a"), module("language", "tr", "adapter", 1, path="b")], "pos")
    with pytest.raises(XlpeftError, match="records no seed"):
        group_by_seed([module("language", "tr", "adapter", None)], "pos")
