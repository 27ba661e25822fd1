"""Build a zoo entry: one command from a pretrained timm tag to a published, measured ``coop_*`` checkpoint.

It fine-tunes the depth-adaptive model with the cooperative recipe, starting every net
from the timm tag's pretrained weights, with the Leader as a fixed pretrained teacher
(``--recipe-opt fixed_leader=True``); evaluates every depth on the validation split
(accuracy, params, FLOPs and latency, with device and batch size); writes the checkpoint
folder with its card (model-index per depth, the exact training command, preprocessing,
the source tag and its license); checks everything (:func:`check_before_publishing`: the
structure is the zoo entry's, the checkpoint reloads strictly through the zoo entry's
builder, the manifest record is complete, the manifest file is readable) and only then
pushes it to ``--repo-id`` and records the pinned commit in the manifest
(``coopnets/hub/manifest.json``), which makes ``coop_<name>.<tag>`` a pretrained tag.
``--dry-run`` does everything but the push and the manifest update: it writes the record it
would add to ``OUT/zoo_record.json``.

It is torchrun-ready: under ``torchrun --nproc_per_node=N hub/build_zoo.py ...`` every
rank trains (DDP), rank 0 evaluates, writes and pushes.

Usage:
    python hub/build_zoo.py coop_resnet50 --from resnet50.a1_in1k --data-dir IMAGENET --epochs 10 \\
        --repo-id ORG/coop_resnet50.a1_in1k --out runs/zoo-r50
    python hub/build_zoo.py coop_resnet18 --from resnet18.a1_in1k --epochs 2 --img-size 32 --dry-run --out /tmp/z
    (anything after ``--`` goes to ``coopnets train`` unchanged, e.g. ``-- --opt adamw --lr 1e-3``)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag

import coopnets
from coopnets.cli.train import add_arguments as add_train_arguments
from coopnets.cli.train import config_from_args
from coopnets.cli.errors import run_entry
from coopnets.hub import CheckpointError, HubLocation, push_to_hub, read_config
from coopnets.hub.manifest import MANIFEST_PATH, add_checkpoint, checkpoint_record
from coopnets.models.plans import structure_keys
from coopnets.train import train


def fail(message: str) -> int:
    """An expected failure: raised for the one error policy (:func:`coopnets.cli.errors.run_entry`) to report."""
    raise ValueError(message) from None


def check_source(zoo_name: str, source: str) -> Optional[str]:
    """Why ``source`` (a timm ``arch.tag``) cannot become ``zoo_name``, or ``None`` when it can."""
    if zoo_name not in coopnets.list_models():
        return f"{zoo_name!r} is not a zoo entry; choose one of: {', '.join(coopnets.list_models())}"
    arch, tag = split_model_name_tag(source)
    if not tag or not timm.is_model(source) or get_pretrained_cfg(source) is None:
        tags = timm.list_pretrained(f"{arch}.*") if timm.is_model(arch) else []
        return f"--from needs a timm model with a pretrained tag, got {source!r}; e.g. {', '.join(tags[:5]) or 'resnet50.a1_in1k'}"
    if f"coop_{arch}" != zoo_name:
        return f"{zoo_name} wraps a different backbone than {arch!r}; use --from {zoo_name[5:]}.TAG"
    return None


def train_argv(args: argparse.Namespace, extra: List[str]) -> List[str]:
    """The ``coopnets train`` flags of the run (the builder's recipe first, the user's extras last)."""
    argv = ["--model", args.source, "--pretrained", "--method", "cooperative", "--recipe-opt", "fixed_leader=True",
            "--recipe-opt", f"leader={args.source}", "--epochs", str(args.epochs), "--seed", str(args.seed),
            "--out", str(args.out), "--img-size", str(args.img_size)]
    argv += ["--data-dir", str(args.data_dir)] if args.data_dir else ["--dataset", "digits"]
    return argv + extra


def zoo_record(folder: Path, zoo_name: str, tag: str, hf_hub_id: str, source: str) -> Dict:
    """The manifest record of the run's checkpoint (its structure must be the zoo entry's own)."""
    config = read_config(HubLocation.local(folder))
    zoo = timm.create_model(zoo_name, num_classes=config["num_classes"], pretrained=False)
    structure = {k: zoo.model_args().get(k) for k in structure_keys()}
    recorded = {k: {**config["model_args"], "num_classes": config["num_classes"]}.get(k) for k in structure_keys()}
    if json.loads(json.dumps(structure)) != recorded:
        raise CheckpointError(f"{folder}: its structure {recorded} is not the zoo entry's {structure}; "
                              f"train without structure-changing --model-kwargs")
    record = checkpoint_record(config, zoo_name, tag, hf_hub_id)
    record["training"]["source_tag"] = source
    return record


def check_before_publishing(folder: Path, zoo_name: str, tag: str, source: str, manifest: Path) -> Dict:
    """Every check, before anything is published: the manifest record of the checkpoint in ``folder``
    (structure of the zoo entry, measured per-depth table and training record: :func:`zoo_record`),
    a strict reload through the zoo entry's own builder (architecture, structure, every key and
    shape), and a readable manifest file. Returns the record with a placeholder commit."""
    record = zoo_record(folder, zoo_name, tag, f"ORG/NAME@{'0' * 40}", source)
    config = read_config(HubLocation.local(folder))
    overlay = {"file": str(folder), "hf_hub_id": None}
    coopnets.create_model(zoo_name, pretrained=True, num_classes=config["num_classes"],
                          **config["model_args"], pretrained_cfg_overlay=overlay)
    if manifest.exists():
        try:
            json.loads(manifest.read_text())["checkpoints"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{manifest} is not a readable manifest ({e!r}); fix it before publishing") from e
    return record


def main(argv: Optional[List[str]] = None) -> int:
    """``python hub/build_zoo.py ...``; every expected failure is one line on stderr and exit code 2."""
    return run_entry(build, argv, prog="build_zoo")


def build(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("zoo_name", help="zoo entry, e.g. coop_resnet50")
    parser.add_argument("--from", dest="source", required=True, help="timm pretrained tag, e.g. resnet50.a1_in1k")
    parser.add_argument("--data-dir", type=Path, default=None, help="ImageFolder root (train/, val/); default: digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--repo-id", default=None, help="Hub repo ORG/NAME (required without --dry-run)")
    parser.add_argument("--tag", default=None, help="pretrained tag of the zoo entry (default: the source's tag)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / `hf auth login`)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help="manifest file to update")
    parser.add_argument("--dry-run", action="store_true", help="everything but the push and the manifest update")
    args = parser.parse_args(argv)
    problem = check_source(args.zoo_name, args.source)
    if problem is None and not args.dry_run and not args.repo_id:
        problem = "--repo-id ORG/NAME is needed to publish (or pass --dry-run)"
    if problem:
        return fail(problem)
    tag = args.tag or split_model_name_tag(args.source)[1]
    train_parser = argparse.ArgumentParser(prog="coopnets train")
    add_train_arguments(train_parser)
    train_args = train_parser.parse_args(train_argv(args, extra))
    try:
        summary = train(config_from_args(train_args))
    except (ValueError, FileExistsError, FileNotFoundError, CheckpointError) as e:
        return fail(str(e))
    if not summary:  # ranks other than 0 under torchrun: rank 0 evaluates, writes and pushes
        return 0
    folder = args.out / "model"
    try:
        record = check_before_publishing(folder, args.zoo_name, tag, args.source, args.manifest)
        record["hf_hub_id"] = f"{args.repo_id or 'ORG/NAME'}@{'0' * 40}"
        if not args.dry_run:
            record["hf_hub_id"] = f"{args.repo_id}@{push_to_hub(folder, args.repo_id, token=args.token).oid}"
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    if args.dry_run:
        (args.out / "zoo_record.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"dry run: {args.zoo_name}.{tag} built in {args.out}; record in {args.out / 'zoo_record.json'}; nothing pushed")
    else:
        add_checkpoint(record, args.manifest)
        print(f"published {args.zoo_name}.{tag} -> {record['hf_hub_id']}; recorded in {args.manifest}")
    print(f"per-depth {summary.get('test_split', 'test')} accuracy: "
          + " / ".join(f"{r['accuracy']:.4f}" for r in record["per_depth"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
