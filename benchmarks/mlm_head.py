"""Held-out MLM loss per language of e5-small's MLM heads: UDHR warm-up (e5-small) vs Bible (e5-small-bible).

    .venv/bin/xlpeft prepare-data bible && .venv/bin/xlpeft prepare-base e5-small && \
        .venv/bin/xlpeft prepare-base e5-small-bible
    .venv/bin/python benchmarks/mlm_head.py [--bases e5-small,e5-small-bible] [--threads N]

Both bases share the dequantised encoder (checked: the script stops if their encoder weights
differ), so the held-out text is encoded once and every head scores the same masked positions:
e5-small-bible's held-out lines (``WARMUPS["e5-small-bible"]``: the Bible verses whose index
hashes to 0 mod 10 for en, id, sw, tr, the UDHR lines of the same rule for the other packs, km
included), masked ``eval_rounds`` times with the warm-up's seed, exactly the positions behind
e5-small-bible's own ``per_lang`` figures. The identity column is the head before any warm-up.
e5-small's head trained on every UDHR line, its held-out ones included, so on the UDHR languages
it has seen the text it is scored on; on the Bible languages neither head has.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from xlpeft.data.warmup import split_lines
from xlpeft.models import arch_for, resolve_base_dir
from xlpeft.recipes import prepare_base as pb


def load(name: str):
    directory = resolve_base_dir(name)
    return AutoModelForMaskedLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def encoder_weights(model) -> dict[str, torch.Tensor]:
    return model.get_submodule(arch_for(model).encoder).state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="e5-small,e5-small-bible")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    names = args.bases.split(",")
    models = {name: load(name) for name in names}
    first, tokenizer = models[names[0]]
    reference = encoder_weights(first)
    for name, (model, _) in models.items():
        if any(not torch.equal(reference[k], v) for k, v in encoder_weights(model).items()):
            raise SystemExit(f"{name}'s encoder differs from {names[0]}'s: the heads cannot share held-out states")
    cfg = pb.WARMUPS["e5-small-bible"]
    sources = pb.warmup_sources(cfg)
    held = [split_lines(spec, cfg.heldout_every, cfg.max_lines, cfg.eval_lines)[1] for _, spec in sources]
    langs, label_of = pb.label_index([lang for lang, _ in sources])
    states, targets, groups = pb.heldout_states(first, tokenizer, held, cfg)
    groups = label_of[groups]
    columns = {}
    for name, (model, _) in models.items():
        columns[name] = pb.grouped_losses(model.get_submodule(arch_for(model).mlm_head), states, targets, groups, langs)
    pb.identity_init(first)  # after its own column: the head every warm-up starts from
    columns["identity head"] = pb.grouped_losses(first.get_submodule(arch_for(first).mlm_head), states, targets,
                                              groups, langs)
    order = ["identity head", *names]
    print("| lang | text | held-out lines | positions | " + " | ".join(order) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(order))
    for lang in langs:
        text = "Bible" if any(lang == code and "/bible/" in spec.path for code, spec in sources) else "UDHR"
        lines = sum(len(h) for (code, _), h in zip(sources, held, strict=True) if code == lang)
        cells = " | ".join(f"{columns[c][lang]['loss']:.2f}" for c in order)
        print(f"| {lang} | {text} | {lines} | {columns[order[0]][lang]['positions']} | {cells} |")
    total = sum(v["positions"] for v in columns[order[0]].values())
    means = " | ".join(f"{sum(v['loss'] * v['positions'] for v in columns[c].values()) / total:.2f}" for c in order)
    print(f"| all (position-weighted) | | | {total} | {means} |")
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {uname}; {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load_avg}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
