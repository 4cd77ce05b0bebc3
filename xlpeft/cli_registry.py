"""``xlpeft promote``: point a registry alias (``production``) at a version of a module or a composition.

Every command that takes a registered name then accepts ``NAME@ALIAS`` (``xlpeft compose --module
xlpeft-lang-sw-adapter@production``), and ``models:/NAME@ALIAS`` loads a composition in MLflow.
"""

from __future__ import annotations

import click


@click.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", required=True, metavar="ALIAS",
              help="the alias to set, e.g. production or staging (latest is reserved: it is always the newest)")
def promote_cmd(name: str, version: str, alias: str) -> None:
    """Point alias ALIAS of registered model NAME (a module or a composition) at VERSION."""
    from xlpeft import tracking

    before = tracking.promote(name, version, alias)
    moved = "" if before is None else (" (unchanged)" if before.version == version else f" (was v{before.version})")
    click.echo(f"{name}@{alias} -> v{version}{moved}; use it as {name}@{alias}")
