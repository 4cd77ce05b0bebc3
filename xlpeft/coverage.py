"""How well a base's tokenizer covers each language pack's text: ``xlpeft coverage --base NAME``.

A language whose script the base's vocabulary covers poorly is split into many short pieces or
unknown tokens, and no language module trained on top can recover what the embedding layer never
distinguishes (Pfeiffer et al. 2021, "UNKs Everywhere: Adapting Multilingual Language Models to New
Scripts"; Rust et al. 2021, "How Good is Your Tokenizer?"). The three rates here are the ones those
papers report: the share of unknown tokens, characters per token, and fertility (sub-words per
whitespace word). They are measured on the pack's own text (its offline corpus, else its default)
so a user sees, before training, which targets need more than a language module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xlpeft.data.corpora import iter_lines
from xlpeft.errors import XlpeftError
from xlpeft.packs import OFFLINE, LanguagePack


@dataclass(frozen=True)
class Coverage:
    """Counts over a text: characters (without spaces), whitespace words, sub-word tokens, unknown tokens."""

    lang: str
    script: str
    lines: int
    chars: int
    words: int
    tokens: int
    unknown: int

    @property
    def unk_rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0

    @property
    def fertility(self) -> float:
        return self.tokens / self.words if self.words else 0.0


def measure(tokenizer, lines: Iterable[str], lang: str = "", script: str = "") -> Coverage:
    """Tokenise ``lines`` (no special tokens) and count what :class:`Coverage` holds."""
    unk = tokenizer.unk_token_id
    n_lines = chars = words = tokens = unknown = 0
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]  # (T,) sub-word ids of one line
        n_lines += 1
        chars += sum(1 for ch in line if not ch.isspace())
        words += len(line.split())
        tokens += len(ids)
        unknown += sum(1 for i in ids if i == unk) if unk is not None else 0
    return Coverage(lang, script, n_lines, chars, words, tokens, unknown)


def pack_coverage(tokenizer, pack: LanguagePack, max_lines: int = 2000) -> Coverage:
    """:func:`measure` on the first ``max_lines`` lines of the pack's offline corpus, else its default one.

    The offline corpus (the Bible text) is larger but exists only after ``xlpeft prepare-data bible``;
    the default (the UDHR sample shipped with the pack) is always there. Hub corpora are skipped.

    Raises:
        XlpeftError: none of the pack's text is available here.
    """
    for names in ([OFFLINE], None):
        try:
            lines: list[str] = []
            for spec in pack.resolve(names):
                if spec.hf or len(lines) >= max_lines:
                    continue
                lines.extend(iter_lines(spec, limit=max_lines - len(lines)))
        except XlpeftError:
            continue
        if lines:
            return measure(tokenizer, lines, pack.code, pack.script)
    raise XlpeftError(f"{pack.code} ({pack.name}): none of its text is available offline here; run "
                      "`xlpeft prepare-data bible` for the Bible text, or check the pack's corpora")


def table(rows: list[Coverage]) -> str:
    """Aligned text, worst-covered last: what ``xlpeft coverage`` prints."""
    out = [f"{'lang':<6}{'script':<8}{'lines':>7}{'tokens':>9}{'unk %':>8}{'chars/token':>13}{'tokens/word':>13}"]
    for c in sorted(rows, key=lambda c: (c.unk_rate, -c.chars_per_token)):
        out.append(f"{c.lang:<6}{c.script:<8}{c.lines:>7}{c.tokens:>9}{100 * c.unk_rate:>8.2f}"
                   f"{c.chars_per_token:>13.2f}{c.fertility:>13.2f}")
    return "\n".join(out)
