"""Terminal-facing helpers of the CLI: names on the command line, standard input, signals, progress bars."""

from __future__ import annotations

import re
import sys

import click

from xlpeft.errors import XlpeftError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
OVERWRITE_HELP = "replace an xlpeft module of another kind at --output (anything that is not an xlpeft module is never replaced)"


def check_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--lang/--task are codes or pack folder names (letters, digits, ``_.-``): never paths or quotes."""
    if value is not None and not NAME.fullmatch(value):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise click.BadParameter(f"should be a language code or pack name (letters, digits, _ . -); got {shown!r}"
                                 + ("; packs are looked up by name in task_packs/ or $XLPEFT_PACKS" if "/" in value
                                    else ""))
    return value


def check_names(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--lang en`` or ``--lang en,tr,id`` (several sources): each comma-separated part a name as :func:`check_name`."""
    if value is not None:
        for part in value.split(","):
            check_name(ctx, param, part.strip())
    return value


def read_stdin_lines() -> list[str]:
    """Standard input as UTF-8 lines; invalid UTF-8 is one error naming the byte offset."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes (tests, some IDEs)
        try:
            return sys.stdin.read().splitlines()
        except UnicodeDecodeError as exc:
            raise XlpeftError(f"standard input is not UTF-8 ({exc.reason}); re-encode it, e.g. iconv -t UTF-8") from None
    data = stream.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XlpeftError(f"standard input is not UTF-8 (byte {exc.start}: {exc.reason}); re-encode it, "
                          "e.g. iconv -t UTF-8") from None
    return text.removeprefix("\ufeff").splitlines()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the MLflow run is closed and the checkpoint kept on the way out."""


def on_sigterm(signum, frame) -> None:
    """Raise :class:`Terminated`, or hold it until a tracking-store write in progress has ended."""
    from xlpeft.interrupts import request

    request(Terminated)


RESUME_HINT = ("a run that had started is marked KILLED in MLflow and its last checkpoint kept; "
               "run the same command with --resume to continue it")


def close_progress_bars() -> None:
    """End a progress bar the error interrupted, so the ``Error:`` line starts a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def check_step(cli: click.Group, index: int, step: list[str]) -> tuple[str, dict | None]:
    """Parse a pipeline step as the CLI would (command, options, types) without running it.

    A path that must exist is not required to yet: an earlier step may create it.

    Returns:
        (command name, its parsed options as click passes them), or (name, None) when an option
        names a path that does not exist yet (or the step only asks for ``--help``).
    """
    where = f"pipeline step {index} (xlpeft {' '.join(step)[:200]})"
    ctx = cli.make_context("xlpeft", list(step), resilient_parsing=False)
    name = None
    try:
        name, command, rest = cli.resolve_command(ctx, ctx.protected_args + ctx.args)
        return name, dict(command.make_context(name, rest, parent=ctx).params)
    except click.BadParameter as exc:
        if isinstance(exc.param, click.Option | click.Argument) and isinstance(exc.param.type, click.Path):
            return name, None
        raise XlpeftError(f"{where}: {exc.format_message()}") from None
    except click.exceptions.Exit:
        return name, None
    except click.ClickException as exc:
        raise XlpeftError(f"{where}: {exc.format_message()}") from None


def dispatch(cli: click.Group, args: list[str], debug: bool, training: bool) -> None:
    """Run ``cli`` on ``args``; every user error becomes one ``Error:`` line and an exit status."""
    hint = f"; {RESUME_HINT}" if training else ""
    try:
        try:
            cli.main(args=args, prog_name="xlpeft", standalone_mode=False)
        finally:
            close_progress_bars()
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt (and so Terminated) into Abort
        if isinstance(exc.__cause__, Terminated):
            click.echo(f"Error: terminated (SIGTERM){hint}", err=True)
            sys.exit(143)
        click.echo(f"Error: interrupted{hint}", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            raise
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see `{exc.ctx.command_path} --help`)"
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except XlpeftError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except Terminated:
        click.echo(f"Error: terminated (SIGTERM){hint}", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo(f"Error: interrupted{hint}", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: keep it to one line unless --debug
        if debug:
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def describe_methods() -> list[str]:
    """The lines of ``xlpeft methods``: each method's help (its paper), ``--set`` keys with defaults, combine, per-kind recipe."""
    from dataclasses import fields

    from xlpeft.config import KIND_TRAIN_DEFAULTS, TrainConfig
    from xlpeft.methods.base import MODULE_KINDS
    from xlpeft.registry import get_method, method_names

    def keys(cls: type) -> list[str]:
        return [f"  --set {f'{f.name}={f.default}':<28} {f.metadata.get('help', '')}" for f in fields(cls)]

    def kinds(per_kind: dict[str, dict]) -> list[str]:
        return [f"  {kind} modules default to: " + ", ".join(f"{k}={v}" for k, v in d.items())
                for kind, d in per_kind.items() if d]

    lines: list[str] = []
    for name in method_names():
        spec = get_method(name)
        lines += [f"{name}: {spec.help}", *keys(spec.config_cls), f"  combines by {spec.combine}"]
        lines += kinds({kind: spec.kind_defaults(kind) for kind in MODULE_KINDS})
    return lines + ["training (all methods):", *keys(TrainConfig), *kinds(KIND_TRAIN_DEFAULTS)]
