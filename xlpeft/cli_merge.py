"""``xlpeft merge``: the command line of :mod:`xlpeft.recipes.merge` (thin: parse, call, print)."""

from __future__ import annotations

import click

from xlpeft.merging import MERGE_METHODS


def _weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, one per module (e.g. 0.7,0.3); got {text!r}") from None


@click.command("merge")
@click.argument("modules", nargs=-1, required=True)
@click.option("--method", type=click.Choice(MERGE_METHODS), default="linear", show_default=True,
              help="linear: weighted average; task_arithmetic: λ·Σ w_i δ_i (Ilharco et al. 2023); "
                   "ties: trim, elect sign, disjoint mean (Yadav et al. 2023)")
@click.option("--weights", help="one weight per module, comma-separated, in order "
              "[default: 1/n for linear, 1 for task_arithmetic and ties]")
@click.option("--scale", type=float, default=1.0, show_default=True, help="λ, multiplies the merged delta")
@click.option("--density", type=float, default=0.2, show_default=True,
              help="ties: fraction of each weight tensor a delta keeps after trimming (Yadav et al. 2023)")
@click.option("--output", required=True, help="directory for the merged module (new, empty, or an earlier module)")
@click.option("--name", help="the merged language module's language [default: the parents', joined by +]")
@click.option("--base", help="the base the modules were trained on [default: the one they name]")
@click.option("--overwrite", is_flag=True, help="replace an xlpeft module of another kind at --output")
def merge_cmd(modules, method, weights, scale, density, output, name, base, overwrite) -> None:
    """Merge sparse (sft) and LoRA deltas into one new module; MODULES are directories or NAME[@VERSION].

    The result is saved, logged and registered like a trained module, with lineage to every parent.
    """
    from xlpeft.merging import MergeConfig
    from xlpeft.recipes.merge import MergeRequest, merge

    config = MergeConfig(method=method, weights=_weights(weights), scale=scale, density=density)
    r = merge(MergeRequest(tuple(modules), output, config, name, base, overwrite))
    click.echo(f"merged {len(modules)} modules ({method}) into a {r.method} module of {r.num_entries:,} "
               f"parameters: {r.output}")
    click.echo(f"  registered as {r.registered_name} version {r.version}; MLflow run {r.run_id}")
