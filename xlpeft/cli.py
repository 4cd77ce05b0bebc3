"""The ``xlpeft`` command line: thin click wrappers over :mod:`xlpeft.recipes`.

Every user error is printed as one ``Error:`` line (exit 2) without a traceback; ``--debug``
shows tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from xlpeft import __version__, interrupts
from xlpeft.config import DEFAULT_BASE, DEFAULT_METHOD, merge_flags, parse_sets
from xlpeft.console import OVERWRITE_HELP, check_name, check_names, dispatch, on_sigterm, read_stdin_lines
from xlpeft.errors import XlpeftError

SET_HELP = "method or training hyper-parameter, repeatable (e.g. --set reduction_factor=2 --set lr=1e-4)"
METHOD_HELP = "a registered method (see `xlpeft methods`)"
BASE_HELP = "mbert, xlmr, xlmr-large, tiny-bert, a hub id or a directory"


def _train_default(name: str) -> str:
    """``[default: N]`` from TrainConfig: the CLI shows defaults, it does not hold them."""
    from xlpeft.config import TrainConfig, default_of

    return f"[default: {default_of(TrainConfig, name)}; same as --set {name}=N]"



def lang_request(lang, method, base, corpus, max_steps, batch_size, seed, sets, output, overwrite, resume):
    """train-lang's options as its recipe request; ``xlpeft run`` builds the same one to tell whether a step is done."""
    from xlpeft.recipes.train_lang import LangRequest

    sets = merge_flags(parse_sets(sets), max_steps=max_steps, batch_size=batch_size, seed=seed)
    return LangRequest(lang=lang, method=method, base=base, corpus=tuple(corpus), sets=sets, output=output,
                       resume=resume, overwrite=overwrite)


def task_request(task, lang, method, base, train_data, eval_data, max_steps, batch_size, seed, sets, output,
                 overwrite, resume):
    """train-task's options as its recipe request (shared with ``xlpeft run`` like :func:`lang_request`)."""
    from xlpeft.recipes.train_task import TaskRequest

    sets = merge_flags(parse_sets(sets), max_steps=max_steps, batch_size=batch_size, seed=seed)
    return TaskRequest(task=task, lang=lang, method=method, base=base, train_data=train_data, eval_data=eval_data,
                       sets=sets, output=output, resume=resume, overwrite=overwrite)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xlpeft")
@click.option("--debug", is_flag=True, help="show tracebacks on errors")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Zero-shot cross-lingual transfer with composable adapters and sparse fine-tuning.

    Train a language module (MLM on target-language text), a task module (labelled
    source-language data) and compose them. Every run is tracked in MLflow.
    """
    ctx.obj = {"debug": debug}


@cli.command("train-lang")
@click.option("--lang", required=True, callback=check_name, help="language code: a folder of language_packs/ (e.g. sw)")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help=METHOD_HELP)
@click.option("--base", default=DEFAULT_BASE, show_default=True, help=BASE_HELP)
@click.option("--corpus", multiple=True, help="a pack corpus name, a UTF-8 text file, or hf:NAME[:CONFIG][:SPLIT]; repeatable")
@click.option("--max-steps", type=int, help=f"optimizer steps {_train_default('max_steps')}")
@click.option("--batch-size", type=int, help=f"sequences per step {_train_default('batch_size')}")
@click.option("--seed", type=int, help=f"random seed {_train_default('seed')}")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--output", help="module directory [default: modules/lang-<lang>-<method>]")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--resume", is_flag=True, help="continue the newest unfinished run of this same command from its checkpoint")
def train_lang(lang, method, base, corpus, max_steps, batch_size, seed, sets, output, overwrite, resume) -> None:
    """Train a language module with masked-language modelling."""
    from xlpeft.recipes.train_lang import train_language

    result = train_language(lang_request(lang, method, base, corpus, max_steps, batch_size, seed, sets, output,
                                         overwrite, resume))
    if not result.version:  # a data-parallel rank other than 0
        return
    m = result.metrics
    click.echo(
        f"language module {lang}/{method}: eval loss {m['eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f}\n"
        f"  saved to   {result.path}\n"
        f"  MLflow run {result.run_id}; registered as {result.registered_name} version {result.version}"
    )


@cli.command("train-task")
@click.option("--task", required=True, callback=check_name, help="task pack: a folder of task_packs/ (ner, pos, nli)")
@click.option("--lang", default="en", show_default=True, callback=check_names,
              help="source language of the labelled data; several (en,tr,id): multi-source, each batch from one "
                   "source under its own language module")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help=METHOD_HELP)
@click.option("--base", default=DEFAULT_BASE, show_default=True, help=BASE_HELP)
@click.option("--train-data", help="CoNLL / CoNLL-U / JSONL file or hf:NAME[:CONFIG][:SPLIT] [default: the pack's]; "
                                   "multi-source: one per source, comma-separated in --lang order")
@click.option("--eval-data", help="evaluation file or hf: spec [default: the pack's validation split or a held-out "
                                  "slice]; multi-source: one per source, comma-separated")
@click.option("--max-steps", type=int, help=f"optimizer steps {_train_default('max_steps')}")
@click.option("--batch-size", type=int, help=f"examples per step {_train_default('batch_size')}")
@click.option("--seed", type=int, help=f"random seed {_train_default('seed')}")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help=SET_HELP + "; also lang_module=auto|none|PATH|NAME[@ALIAS]|hf:ORG/REPO (multi-source: one per "
                   "source, comma-separated), head_dropout, sampling=proportional|uniform, temperature")
@click.option("--output", help="module directory [default: modules/task-<task>-<method>]")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--resume", is_flag=True, help="continue the newest unfinished run of this same command from its checkpoint")
def train_task(task, lang, method, base, train_data, eval_data, max_steps, batch_size, seed, sets, output,
               overwrite, resume) -> None:
    """Train a task module (+ head) over the source language's module."""
    from xlpeft.recipes.train_task import train_task as run_train_task

    result = run_train_task(task_request(task, lang, method, base, train_data, eval_data, max_steps, batch_size, seed,
                                         sets, output, overwrite, resume))
    if not result.version:  # a data-parallel rank other than 0
        return
    headline = {k: v for k, v in result.metrics.items() if k in ("f1", "precision", "recall", "accuracy")}
    click.echo(
        f"task module {task}/{method} ({lang}, over {result.lang_module or 'no language module'}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in headline.items())
        + f"\n  saved to   {result.path}\n"
        f"  MLflow run {result.run_id}; registered as {result.registered_name} version {result.version}"
    )


@cli.command("compose")
@click.option("--lang", required=True, callback=check_name, help="target language (its language module is used)")
@click.option("--task", required=True, callback=check_name, help="task pack (its task module is used)")
@click.option("--base", default=DEFAULT_BASE, show_default=True, help="the base both modules were trained on")
@click.option("--lang-method", help=f"{METHOD_HELP} [default: the newest registered language module]")
@click.option("--task-method", help=f"{METHOD_HELP} [default: the newest registered task module]")
@click.option("--eval-data", help="file or hf:NAME[:CONFIG][:SPLIT] [default: the pack's data for --lang]")
@click.option("--split", help="task-pack split to evaluate on, e.g. sample_test [default: test, else validation]")
@click.option("--module", "modules", multiple=True, metavar="REF", help="extra module stacked between the language "
              "and task modules, bottom first (e.g. a domain module): a directory or NAME[@VERSION]; repeatable")
@click.option("--output", help="write the composed model here (a new or empty directory, or an earlier composed model)")
@click.option("--adapter-drop", type=click.IntRange(min=0), default=0, metavar="N", help="AdapterDrop (Rücklé et al. "
              "2021): adapter-like modules skip the lowest N layers (recorded; the baseline runs without) [default: 0]")
@click.option("--register", is_flag=True, help="log the composition as an MLflow Model and register it as "
              "xlpeft-<task>-<lang> (serve it with `mlflow models serve -m models:/xlpeft-<task>-<lang>@latest`)")
@click.option("--ensemble", metavar="LANGS", help="a target without a module: average the task module's outputs over "
              "these languages' modules (e.g. tr,id), scored against each alone and the baseline")
@click.option("--emea", is_flag=True, help="--ensemble: adapt the weights per batch by entropy minimisation (EMEA, "
              "Wang et al. 2021)")
@click.option("--emea-steps", type=click.IntRange(min=1), default=1, show_default=True, help="EMEA steps a batch")
@click.option("--emea-lr", type=float, default=10.0, show_default=True, help="EMEA learning rate on the weights")
@click.option("--fallback", type=click.Choice(["none", "related"]), default="none", show_default=True,
              help="related: if --lang has no language module, use the closest languages' (same genus, family, "
              "script in the language packs; several tied are ensembled) and say which and why")
def compose_cmd(lang, task, base, lang_method, task_method, eval_data, split, modules, output, adapter_drop,
                register, ensemble, emea, emea_steps, emea_lr, fallback) -> None:
    """Compose a language module (and any --module) with a task module; score it against the source-language baseline."""
    from xlpeft.composed import COMPOSITION_FILE
    from xlpeft.io import check_output_dir
    from xlpeft.recipes.compose import ComposeRequest, compose_task

    module_lang, why = None, ""
    if fallback == "related" and ensemble is None:
        from xlpeft.recipes.fallback import plan_fallback

        plan = plan_fallback(lang, base, lang_method)
        if plan is not None:
            why = plan.describe()
            click.echo(f"--fallback related: {why}", err=True)
            if len(plan.chosen) > 1:
                ensemble = ",".join(r.lang for r in plan.chosen)
            else:
                module_lang = plan.chosen[0].lang
    if ensemble is not None:
        from xlpeft.cli_ensemble import run_ensemble

        return run_ensemble(lang, task, base, ensemble, lang_method, task_method, eval_data, split, emea, emea_steps,
                            emea_lr, {"--module": modules, "--output": output, "--adapter-drop": adapter_drop,
                                      "--register": register})
    if emea:
        raise XlpeftError("--emea adapts the weights of an ensemble: give the languages with --ensemble LANGS")
    if output is not None:  # before any work: never write into another model's directory
        output = str(check_output_dir(output, COMPOSITION_FILE, "an earlier composed model"))
    r = compose_task(ComposeRequest(lang=lang, task=task, base=base, lang_method=lang_method,
                                    task_method=task_method, eval_data=eval_data, output=output, split=split,
                                    modules=tuple(modules), adapter_drop=adapter_drop, register=register,
                                    module_lang=module_lang, fallback=why))
    if r.overlap:
        click.echo(f"delta overlap (shared indices): total {sum(r.overlap.values())}; "
                   + ", ".join(f"{k} {v}" for k, v in r.overlap.items()))
    if r.metrics:
        click.echo(f"zero-shot {task} on {lang} ({r.evaluated_on}):")
        extra = "".join(f" + {m}" for m in modules)
        click.echo(f"  {module_lang or lang} language module{extra} + task module{f' (adapter drop {adapter_drop})' * bool(adapter_drop)}: "
                   f"{r.metric} {r.metrics[r.metric]:.4f}")
        click.echo(f"  baseline ({r.baseline_lang or 'no'} language module): {r.metric} {r.baseline[r.metric]:.4f}")
    else:
        click.echo(f"composed; no {task} evaluation data for {lang} (pass --eval-data to score it)")
    if r.output:
        click.echo(f"  composed model written to {r.output}")
    if r.registered_name:
        click.echo(f"  registered as {r.registered_name} version {r.version} "
                   f"(serve: mlflow models serve -m models:/{r.registered_name}/{r.version} --env-manager local)")
    click.echo(f"  MLflow run {r.run_id}")


@cli.command("evaluate")
@click.option("--task", required=True, callback=check_name, help="task pack")
@click.option("--langs", required=True, help="comma-separated target languages, e.g. sw,yo,ha")
@click.option("--base", default=DEFAULT_BASE, show_default=True)
@click.option("--eval-dir", type=click.Path(file_okay=False),
              help="folder of <lang>.conll or <lang>.test.conll files overriding the pack's data")
@click.option("--split", help="task-pack split to evaluate on, e.g. sample_test [default: test, else validation]")
@click.option("--modules-dir", type=click.Path(file_okay=False),
              help="score the modules saved under this folder instead of the registry's newest: one matrix per "
                   "seed (from their manifests), reported as mean ± std, with in-language task modules as the ceiling")
@click.option("--source", callback=check_name, help="with --modules-dir: the zero-shot task modules' training "
              "language [default: the one that is not a target]")
@click.option("--report", type=click.Path(file_okay=False), help="with --modules-dir: also write the table "
              "(seeds.md, seeds.json, seeds.txt, seeds.png) into this folder")
def evaluate_cmd(task, langs, base, eval_dir, split, modules_dir, source, report) -> None:
    """Language x method transfer matrix for every registered module; table and heat-map go to MLflow.

    A baseline+<task method> column scores each task module over its own source-language module
    (no target-language module): the zero-shot reference each cell should beat.
    """
    from xlpeft.recipes.evaluate import evaluate_matrix
    from xlpeft.tracking import tracking_uri

    codes = [x.strip() for x in langs.split(",") if x.strip()]
    if not codes:
        raise click.BadParameter(f"lists no language; got {langs!r}, expected e.g. sw,yo,ha", param_hint="--langs")
    for code in codes:
        check_name(click.get_current_context(), None, code)
    if modules_dir:
        from xlpeft.recipes.evaluate import evaluate_seeds

        table, run_id, notes = evaluate_seeds(task, codes, base, modules_dir, source, eval_dir, split, report)
        for note in notes:
            click.echo(f"skipped {note}", err=True)
        click.echo(table.format())
        click.echo(f"MLflow run {run_id} (artifacts: evaluation/seeds.png, seeds.json, seeds.md)")
    else:
        if source or report:
            raise click.BadParameter("only applies with --modules-dir", param_hint="--report" if report else "--source")
        matrix, run_id = evaluate_matrix(task, codes, base, eval_dir, split)
        click.echo(matrix.format())
        click.echo(f"MLflow run {run_id} (artifacts: evaluation/matrix.png, matrix.json)")
    click.echo(f"browse runs, artifacts and the registry: mlflow ui --backend-store-uri {tracking_uri()}")


@cli.command("predict")
@click.option("--lang", required=True, callback=check_name)
@click.option("--task", required=True, callback=check_name)
@click.option("--base", default=DEFAULT_BASE, show_default=True)
@click.option("--lang-method", help=f"{METHOD_HELP} [default: the newest registered language module]")
@click.option("--task-method", help=f"{METHOD_HELP} [default: the newest registered task module]")
def predict_cmd(lang, task, base, lang_method, task_method) -> None:
    """Tag raw text from stdin (one sentence a line); prints CoNLL `token<TAB>tag`, or one label a line for NLI.

    Every input line gets one output block (token tasks) or line (NLI), blank lines included, so the
    output can be matched to the input line by line.
    """
    from xlpeft.data.tasks import TokenExample
    from xlpeft.recipes.predict import predict_lines

    lines = read_stdin_lines()
    if not any(line.strip() for line in lines):
        raise XlpeftError("predict reads text from standard input; e.g. echo 'Juma alikwenda Nairobi' | xlpeft predict ...")
    for example, pred in predict_lines(lang, task, base, lines, lang_method, task_method):
        if isinstance(example, TokenExample):
            click.echo("\n".join(f"{t}\t{p}" for t, p in zip(example.tokens, pred, strict=True)) + "\n")
        else:
            click.echo(pred)


@cli.command("methods")
def methods() -> None:
    """List module methods (with their papers), their --set keys and per-kind defaults."""
    from xlpeft.console import describe_methods

    click.echo("\n".join(describe_methods()))


@cli.command("modules")
def modules() -> None:
    """List modules in the MLflow Model Registry, with their aliases and descriptions."""
    from xlpeft import tracking

    names = tracking.list_registered()
    if not names:
        click.echo(f"no xlpeft modules registered in {tracking.tracking_uri()}")
    for name in names:
        versions = tracking.list_versions(name)
        if not versions:  # a process was killed between creating the name and registering its version
            click.echo(f"{name}  (no version: an interrupted registration; the next run that trains it "
                       "registers version 1)")
        for v in versions:  # aliases after the version; the description's summary line below it
            click.echo(f"{name} v{v.version}{''.join(f' @{a}' for a in v.aliases)}  base={v.tags.get('xlpeft.base')} "
                       f"({v.tags.get('xlpeft.base_fingerprint')})  run={v.run_id}"
                       + (f"\n    {v.description.splitlines()[0][:160]}" if v.description else ""))


@cli.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE",
              help="override a variable of the pipeline's vars: (repeatable, e.g. --var langs=sw,yo)")
@click.option("--dry-run", is_flag=True, help="print every expanded step and whether it would run or is done")
@click.option("--force", "--no-skip", "force", is_flag=True,
              help="run every step, also those a finished run with the same configuration already did")
def run(pipeline: str, variables: tuple[str, ...], dry_run: bool, force: bool) -> list:
    """Run a declarative pipeline: a YAML list of xlpeft commands (see pipelines/).

    A train-lang / train-task step is skipped when a finished run logged the same configuration and
    registered its module, so re-running a half-finished pipeline continues it.
    """
    from pathlib import Path

    from xlpeft.pipelines import Planner, load_pipeline, parse_vars, run_pipeline
    from xlpeft.recipes.train_lang import plan_language
    from xlpeft.recipes.train_task import plan_task

    planners = {"train-lang": Planner(lang_request, plan_language), "train-task": Planner(task_request, plan_task)}
    return run_pipeline(cli, load_pipeline(Path(pipeline), parse_vars(variables)), planners, dry_run=dry_run, force=force)


@cli.command("convert")
@click.argument("src")  # a directory or hf:ORG/REPO[@REVISION][:SUBDIR] (checked by interop.convert)
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--from", "from_format", required=True, type=click.Choice(["adapterhub", "composable-sft", "peft", "xlpeft"]),
              help="format of SRC")
@click.option("--to", "to_format", default="xlpeft", show_default=True,
              type=click.Choice(["xlpeft", "adapterhub", "composable-sft", "peft"]), help="format to write at DST")
@click.option("--base", help="the base the module belongs to (needed for --to xlpeft, --to composable-sft)")
@click.option("--name", help="language code / task name to record, or the AdapterHub adapter name to write")
@click.option("--without-head", is_flag=True,
              help="AdapterHub/peft: no prediction head; composable-sft: drop dense values (apply(with_abs=False))")
@click.option("--safetensors", is_flag=True, help="AdapterHub export: adapter.safetensors instead of pytorch_adapter.bin")
@click.option("--layout", default="diffs", show_default=True, type=click.Choice(["diffs", "body"]),
              help="composable-sft export: current {diffs, abs} or earlier {body, head} layout")
def convert_cmd(src, dst, from_format, to_format, base, name, without_head, safetensors, layout) -> None:
    """Convert AdapterHub adapters, composable-sft SFTs and peft LoRA/(IA)³ adapters to xlpeft modules and back.

    SRC is a directory or a hub id hf:ORG/REPO[@REVISION][:SUBDIR] (through the Hugging Face cache).
    """
    from xlpeft.interop import convert

    out = convert(src, dst, from_format, to_format, base=base, name=name, without_head=without_head,
                  safetensors=safetensors, layout=layout)
    click.echo(f"converted {src} ({from_format}) -> {out} ({to_format})")

from xlpeft.cli_hub import push_cmd  # noqa: E402
from xlpeft.cli_merge import merge_cmd  # noqa: E402
from xlpeft.cli_packs import coverage_cmd  # noqa: E402
from xlpeft.cli_prepare import prepare_base, prepare_data_cmd, warm_head  # noqa: E402
from xlpeft.cli_registry import promote_cmd  # noqa: E402

for _command in (merge_cmd, coverage_cmd, prepare_base, prepare_data_cmd, warm_head, promote_cmd, push_cmd):
    cli.add_command(_command)  # the commands kept in their own modules, so this one stays thin


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn user errors into one ``Error:`` line."""
    args = sys.argv[1:] if argv is None else argv
    from xlpeft.progress import quiet_library_bars

    quiet_library_bars()  # a log gets lines, not carriage-return frames
    debug = "--debug" in args or os.environ.get("XLPEFT_DEBUG") == "1"
    training = any(a in ("train-lang", "train-task", "run") for a in args)
    previous = None
    interrupts.clear()  # a request left by an earlier command in this process is not this one's
    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        dispatch(cli, args, debug, training)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
