"""Zero-shot POS transfer on real treebanks, offline: runs ``pipelines/pos-universal.yaml`` and reports it.

    .venv/bin/python benchmarks/transfer_pos.py                                # e5-small-bible, seeds 1,2,3
    .venv/bin/python benchmarks/transfer_pos.py --base e5-small --seeds 1      # the UDHR-warmed head, one seed
    .venv/bin/python benchmarks/transfer_pos.py --var lang_steps=1000 --readme benchmarks/README.md

Every module, run and table goes to MLflow through the pipeline (its last step is
``xlpeft evaluate --modules-dir``: mean ± std over seeds, the baseline, the in-language ceiling,
a heat-map). This script adds what a benchmark report needs around it: the machine, the wall
time it took (the budget used), how many steps ran or were skipped as already done, and, with
``--readme``, the table written into a marked section of that file (one section per base and
seed list, so runs with different bases sit side by side). Steps already done are skipped by the
pipeline, so a re-run after an interruption continues; the wall time printed is this run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "pos-universal.yaml"


def machine() -> str:
    import torch

    return (f"{platform.node() or 'unknown host'}: {platform.system()} {platform.release()} {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def run_pipeline(variables: list[str]) -> list:
    """The pipeline in this process, exactly as ``xlpeft run`` runs it; returns each step's decision."""
    from xlpeft.cli import cli
    from xlpeft.progress import quiet_library_bars

    quiet_library_bars()  # a log gets lines, not carriage-return frames
    args = ["run", str(PIPELINE), *[a for v in variables for a in ("--var", v)]]
    return cli.main(args=args, prog_name="xlpeft", standalone_mode=False)


def section(report: Path, variables: dict[str, str], seconds: float, ran: int, total: int, host: str) -> str:
    """The Markdown section for ``--readme``: what was measured, how, on what, and the table."""
    table = (report / "seeds.md").read_text(encoding="utf-8").strip()
    shown = ", ".join(f"{k}={v}" for k, v in variables.items())
    return "\n".join([
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {host}.",
        f"`benchmarks/transfer_pos.py` ({shown or 'the pipeline defaults'}): {ran} of {total} pipeline steps ran "
        f"({total - ran} were already done), {seconds / 60:.1f} min wall for those.",
        "", table, ""])


def write_section(readme: Path, key: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- transfer_pos KEY begin/end -->`` markers of ``readme``."""
    begin, end = f"<!-- transfer_pos {key} begin -->", f"<!-- transfer_pos {key} end -->"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{block}\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="the pipeline's base (default: its own, e5-small-bible)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the pipeline's, 1,2,3)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="any other pipeline variable")
    parser.add_argument("--readme", type=Path, help="write the report into this Markdown file's marked section")
    args = parser.parse_args(argv)
    variables = dict(v.split("=", 1) for v in args.var if "=" in v)
    if args.base:
        variables["base"] = args.base
    if args.seeds:
        variables["seeds"] = args.seeds
        variables.setdefault("ceiling_seeds", args.seeds)  # ceilings train over those seeds' language modules
    from xlpeft.pipelines import load_pipeline, parse_vars

    resolved = load_pipeline(PIPELINE, parse_vars([f"{k}={v}" for k, v in variables.items()])).variables
    report = Path(str(resolved["out"])) / str(resolved["base"]) / "report"  # as the pipeline's last step writes it
    host = machine()
    print(f"transfer_pos: {host}", file=sys.stderr, flush=True)
    from xlpeft.errors import XlpeftError

    start = time.perf_counter()
    try:
        decisions = run_pipeline([f"{k}={v}" for k, v in variables.items()])
    except XlpeftError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    ran = sum(d.run for d in decisions)
    print((report / "seeds.txt").read_text(encoding="utf-8"))
    summary = json.loads((report / "seeds.json").read_text(encoding="utf-8"))
    print(f"budget used: {seconds / 60:.1f} min wall for {ran} of {len(decisions)} steps "
          f"(seeds {', '.join(map(str, summary['seeds']))}; the rest were already done)")
    if args.readme:
        key = f"base={resolved['base']} seeds={','.join(resolved['seeds']) if isinstance(resolved['seeds'], list) else resolved['seeds']}"
        write_section(args.readme, key, section(report, variables, seconds, ran, len(decisions), host))
        print(f"wrote the table into {args.readme} ({key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
