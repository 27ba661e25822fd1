"""``coopnets push``: publish a finished training run's checkpoint to the Hugging Face Hub.

``coopnets train ... --out RUN_DIR`` writes the checkpoint folder ``RUN_DIR/model``
(:func:`coopnets.save_pretrained`: weights, config with the measured per-depth table,
model card); this command uploads it to ``--repo-id`` and prints the commit to pin. It takes
:func:`coopnets.push_to_hub`'s arguments (huggingface_hub's names): ``--private``, ``--revision``,
``--token``, ``--commit-message``, ``--commit-description`` and ``--create-pr`` (open a pull
request against the default branch instead of committing to it).

Example:
    coopnets push runs/r18 --repo-id someorg/coop_resnet18.digits
    coopnets push runs/r18/model --repo-id someorg/coop_resnet18.digits --private
    coopnets push runs/r18 --repo-id someorg/coop_resnet18.digits --create-pr --commit-description "3 more epochs"
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..hub import push_to_hub
from ._run_folder import checkpoint_folder
from .errors import bad_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="training run folder (its 'model' subfolder is published) or a checkpoint folder")
    parser.add_argument("--repo-id", required=True, help="Hub repo to publish to, ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--commit-message", default="Upload coopnets checkpoint", help="commit message (its summary)")
    parser.add_argument("--commit-description", default=None,
                        help="commit description (and the pull request's, with --create-pr)")
    parser.add_argument("--create-pr", action="store_true",
                        help="open a pull request against the default branch with the commit; the branch stays unchanged")


def run(args: argparse.Namespace) -> int:
    if args.create_pr and args.revision not in (None, "main"):
        raise bad_value("--revision", args.revision, "--create-pr opens a pull request against the default branch; "
                                                     "drop --revision (or drop --create-pr to commit to that branch)")
    folder = checkpoint_folder(args.run_dir)  # failures: one line on stderr, exit code 2 (coopnets.cli.main)
    info = push_to_hub(
        folder, args.repo_id, private=args.private, revision=args.revision, token=args.token,
        commit_message=args.commit_message, commit_description=args.commit_description, create_pr=args.create_pr,
    )
    if args.create_pr:
        print(f"opened pull request {info.pr_url} with {folder} ({info.pr_revision}); the default branch is unchanged")
    else:
        print(f"published {folder} -> {info.commit_url}")
    print(f"load it with: coopnets.create_model('hf-hub:{args.repo_id}@{info.oid}', pretrained=True)")
    return 0
