"""Publish a training run's checkpoint and record it in the zoo manifest.

The manifest (``hub/manifest.json``, a link to the package's
``coopnets/hub/manifest.json``) lists the zoo's pretrained tags. A record is made only
from a checkpoint folder written by a real ``coopnets train`` run: its measured per-depth
table and its training record (command, seed, data) are copied from the folder's
``config.json``; nothing is typed in by hand. The record pins the exact Hub commit.

Usage:
    python hub/publish.py RUN_DIR --repo-id ORG/coop_resnet18.digits --tag digits
    python hub/publish.py RUN_DIR --repo-id ORG/NAME --tag digits --revision SHA   # already pushed: record only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from coopnets.cli._run_folder import checkpoint_folder
from coopnets.hub import HubLocation, push_to_hub, read_config
from coopnets.hub.manifest import MANIFEST_PATH, add_checkpoint, checkpoint_record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="training run folder (or its checkpoint folder)")
    parser.add_argument("--repo-id", required=True, help="Hub repo ORG/NAME")
    parser.add_argument("--tag", required=True, help="pretrained tag, e.g. 'digits' for coop_resnet18.digits")
    parser.add_argument("--revision", default=None, help="commit already on the Hub: record it without pushing")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / `hf auth login`)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help="manifest file to update")
    args = parser.parse_args(argv)

    folder = checkpoint_folder(args.run_dir)
    config = read_config(HubLocation.local(folder))
    # the record is built (and so checked: measured table, training record) before anything is pushed
    record = checkpoint_record(config, config["architecture"], args.tag, f"{args.repo_id}@{args.revision}")
    if args.revision is None:
        args.revision = push_to_hub(folder, args.repo_id, token=args.token).oid
        record["hf_hub_id"] = f"{args.repo_id}@{args.revision}"
    add_checkpoint(record, args.manifest)
    print(f"recorded {record['model']}.{record['tag']} -> {record['hf_hub_id']} in {args.manifest}")
    print(json.dumps(record["per_depth"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
