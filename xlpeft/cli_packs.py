"""``xlpeft coverage``: how well a base's tokenizer covers each language pack's text (:mod:`xlpeft.coverage`)."""

from __future__ import annotations

import click


@click.command("coverage")
@click.option("--base", default=None, help="the base whose tokenizer is measured [default: the default base]")
@click.option("--langs", default=None, help="comma-separated pack codes [default: every language pack]")
@click.option("--max-lines", type=click.IntRange(min=1), default=2000, show_default=True,
              help="lines of each pack's offline text to tokenise")
def coverage_cmd(base: str | None, langs: str | None, max_lines: int) -> None:
    """Unknown-token rate, characters per token and tokens per word of each language pack's text.

    A high unknown rate or few characters per token means the base's vocabulary covers the script
    poorly (Pfeiffer et al. 2021, "UNKs Everywhere"): a language module alone will not fix that.
    """
    from xlpeft.config import DEFAULT_BASE
    from xlpeft.coverage import pack_coverage, table
    from xlpeft.errors import XlpeftError
    from xlpeft.models import load_base
    from xlpeft.packs import available_packs, load_language_pack

    codes = [c.strip() for c in langs.split(",") if c.strip()] if langs else available_packs("language_packs")
    packs = [load_language_pack(c) for c in codes]  # an unknown code fails here, before the base loads
    tokenizer = load_base(base or DEFAULT_BASE).tokenizer
    rows, skipped = [], []
    for pack in packs:
        try:
            rows.append(pack_coverage(tokenizer, pack, max_lines))
        except XlpeftError as exc:
            skipped.append(f"{pack.code}: skipped ({exc})")
    if rows:
        click.echo(table(rows))
        click.echo("a language cut into many pieces a word can carry new tokens in its language module: "
                   "xlpeft train-lang --lang CODE --set new_tokens=N (whole words; for a script written without "
                   "spaces, sub-word pieces: add --set new_token_unit=piece)")
    for line in skipped:
        click.echo(line)
