"""``coopnets push``: publish a finished training run's checkpoint to the Hugging Face Hub.

``coopnets train ... --out RUN_DIR`` writes the checkpoint folder ``RUN_DIR/model``
(:func:`coopnets.save_pretrained`: weights, config with the measured per-depth table,
model card); this command uploads it to ``--repo-id`` and prints the commit to pin.

Example:
    coopnets push runs/r18 --repo-id someorg/coop_resnet18.digits
    coopnets push runs/r18/model --repo-id someorg/coop_resnet18.digits --private
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..hub import push_to_hub
from ._run_folder import checkpoint_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="training run folder (its 'model' subfolder is published) or a checkpoint folder")
    parser.add_argument("--repo-id", required=True, help="Hub repo to publish to, ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--commit-message", default="Upload coopnets checkpoint", help="commit message")


def run(args: argparse.Namespace) -> int:
    folder = checkpoint_folder(args.run_dir)  # failures: one line on stderr, exit code 2 (coopnets.cli.main)
    info = push_to_hub(
        folder, args.repo_id, private=args.private, revision=args.revision,
        token=args.token, commit_message=args.commit_message,
    )
    print(f"published {folder} -> {info.commit_url}")
    print(f"load it with: coopnets.create_model('hf-hub:{args.repo_id}@{info.oid}', pretrained=True)")
    return 0
