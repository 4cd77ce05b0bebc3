"""Declarative pipelines: ``xlpeft run FILE [--var name=value ...] [--dry-run] [--force]``.

:mod:`~xlpeft.pipelines.spec` reads a file (variables, ``${name}`` substitution, ``for_each``
fan-out); :mod:`~xlpeft.pipelines.done` tells whether a step's registered output already exists
for the same configuration, so a step that is done is skipped and a half-finished pipeline continues.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from xlpeft.pipelines.done import CANNOT_TELL, Decision, Planner, decide, restore
from xlpeft.pipelines.spec import Pipeline, Step, load_pipeline, parse_vars, substitute

__all__ = ["CANNOT_TELL", "Decision", "Pipeline", "Planner", "Step", "decide", "load_pipeline", "parse_vars",
           "restore", "run_pipeline", "substitute"]


def _label(i: int, total: int, step: Step) -> str:
    where = f"  (step {step.number}: {', '.join(f'{k}={v}' for k, v in step.bindings)})" if step.bindings else ""
    return f"[{i}/{total}] {step.describe()}{where}"


def run_pipeline(cli: click.Group, pipeline: Pipeline, planners: dict[str, Planner], dry_run: bool = False,
                 force: bool = False, echo: Callable[[str], None] = click.echo) -> list[Decision]:
    """Run (or, with ``dry_run``, describe) every expanded step in order; returns each step's decision.

    Every step parses before the first one runs. A step is checked for "done" just before it would
    run, so it sees what the steps before it made. A dry run checks against the store as it is:
    once a step would run, a later step reported as done may change (its inputs may be rebuilt).
    """
    from xlpeft.console import check_step

    total = len(pipeline.steps)
    for i, step in enumerate(pipeline.steps, 1):
        check_step(cli, i, list(step.args))
    if dry_run:
        shown = " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in pipeline.variables.items())
        echo(f"pipeline {pipeline.name} ({pipeline.path}): {total} steps" + (f"; {shown}" if shown else ""))
    decisions, first_run = [], None
    for i, step in enumerate(pipeline.steps, 1):
        name, params = check_step(cli, i, list(step.args))  # again: an earlier step may have made its files
        decision = decide(planners.get(name), params, force)
        decisions.append(decision)
        note = decision.text
        if dry_run and not decision.run and first_run is not None:
            note += f" (as the store is now; step {first_run} runs before it and may change its inputs)"
        if dry_run:
            echo(f"{_label(i, total, step)}\n    {note}")
            first_run = first_run or (i if decision.run else None)
            continue
        click.echo(f"{_label(i, total, step)}\n    {note.replace('would run', 'runs', 1)}", err=True)
        if decision.run:
            cli.main(args=list(step.args), prog_name="xlpeft", standalone_mode=False)
        elif decision.restore is not None:
            click.echo(f"    restored {restore(decision)}", err=True)
    return decisions
