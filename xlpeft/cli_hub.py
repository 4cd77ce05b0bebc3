"""``xlpeft push MODULE ORG/REPO``: upload a module to the Hugging Face Hub with a generated model card.

``--dry-run`` prints the files (with sizes) and the card and touches no network; otherwise the repo is
created if needed (``create_repo(exist_ok=True)``) and one commit uploads a staging folder holding the
module's files and ``README.md``. The card is made by :func:`xlpeft.hub_card.model_card`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from xlpeft.errors import XlpeftError


def push(plan, revision: str | None = None, private: bool = False) -> str:
    """Upload ``plan`` (a :class:`~xlpeft.hub_card.PushPlan`); returns the commit's URL.

    Raises:
        XlpeftError: offline mode, no token, or the hub refused or could not be reached (one line each).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from xlpeft.hub import offline, transport_errors
    from xlpeft.hub_card import CARD

    if offline():
        raise XlpeftError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or use --dry-run to see the plan)")
    if not get_token():
        raise XlpeftError(f"pushing to {plan.repo_id} needs a Hugging Face token with write access; log in with "
                          "`hf auth login` or set HF_TOKEN (or use --dry-run to see the plan)")
    staging = Path(tempfile.mkdtemp(prefix="xlpeft-push-"))
    try:
        for name, _ in plan.files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(plan.module_dir / name, staging / name)
        (staging / CARD).write_text(plan.card, encoding="utf-8")
        api = HfApi()
        try:
            api.create_repo(plan.repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=plan.repo_id, folder_path=str(staging), revision=revision,
                                     commit_message=f"xlpeft push {plan.module_dir.name}")
        except (HfHubHTTPError, OSError, *transport_errors()) as exc:  # refused (401/403/409...) or unreachable
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise XlpeftError(f"could not push to {plan.repo_id} ({type(exc).__name__}: {first}); check the network, "
                              "that your token can write to it (`hf auth whoami`), and the repo name") from None
        return str(info.commit_url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@click.command("push")
@click.argument("module")
@click.argument("repo_id", metavar="ORG/REPO")
@click.option("--revision", help="branch to push to (created if missing) [default: main]")
@click.option("--private", is_flag=True, help="create the repository as private (an existing one keeps its setting)")
@click.option("--license", "license_id", help="SPDX license id for the card's metadata (e.g. apache-2.0)")
@click.option("--dry-run", is_flag=True, help="print the files and the model card; touch no network")
def push_cmd(module, repo_id, revision, private, license_id, dry_run) -> None:
    """Upload MODULE (a directory, NAME[@VERSION|@ALIAS] or hf:ORG/REPO) to the Hub with a generated model card."""
    from xlpeft.compose import resolve_module
    from xlpeft.hub_card import CARD, plan_push

    loaded = resolve_module(module).module
    plan = plan_push(loaded, repo_id, license_id)
    lines = plan.describe(revision, private)
    if dry_run:
        click.echo("\n".join(["dry run: nothing is uploaded", *lines, f"--- {CARD} ---", plan.card.rstrip("\n")]))
        return
    click.echo("\n".join(lines))
    click.echo(f"pushed: {push(plan, revision, private)}")
