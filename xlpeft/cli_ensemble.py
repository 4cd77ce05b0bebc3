"""``xlpeft compose --ensemble``: the command-line side of :mod:`xlpeft.recipes.ensemble` (check, call, print)."""

from __future__ import annotations

import click

from xlpeft.errors import XlpeftError


def run_ensemble(lang: str, task: str, base: str, members: str, lang_method: str | None, task_method: str | None,
                 eval_data: str | None, split: str | None, emea: bool, emea_steps: int, emea_lr: float,
                 conflicting: dict[str, object]) -> None:
    """Score ``task`` on ``lang`` through the ensemble of ``members``' language modules and print the comparison."""
    from xlpeft.ensemble import EnsembleConfig
    from xlpeft.recipes.ensemble import EnsembleRequest, compose_ensemble

    given = [name for name, value in conflicting.items() if value]
    if given:
        raise XlpeftError(f"--ensemble scores an ensemble and saves nothing; it cannot be combined with "
                          f"{', '.join(given)}: drop {'them' if len(given) > 1 else 'it'}")
    langs = tuple(m.strip() for m in members.split(",") if m.strip())
    config = EnsembleConfig(emea_steps=emea_steps if emea else 0, emea_lr=emea_lr)
    r = compose_ensemble(EnsembleRequest(lang, task, langs, base, lang_method, task_method, eval_data, split, config))
    how = f"EMEA, {config.emea_steps} step(s) a batch" if emea else "plain average"
    click.echo(f"zero-shot {task} on {lang} ({r.evaluated_on}) through an ensemble of {', '.join(langs)} ({how}):")
    click.echo(f"  ensemble: {r.metric} {r.metrics[r.metric]:.4f}")
    for member, scores in r.members.items():
        click.echo(f"  {member} language module alone: {r.metric} {scores[r.metric]:.4f}")
    click.echo(f"  baseline ({r.baseline_lang or 'no'} language module): {r.metric} {r.baseline[r.metric]:.4f}")
    if r.weights:
        click.echo("  last batch's weights: " + ", ".join(f"{m} {w:.3f}" for m, w in zip(langs, r.weights, strict=True)))
    click.echo(f"  MLflow run {r.run_id}")
