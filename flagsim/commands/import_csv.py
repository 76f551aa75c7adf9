"""`flagsim import-csv`: import an embedding CSV in the original notebook's format into a run."""

from __future__ import annotations

import argparse

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import-csv",
        help="import embeddings saved by the original notebook (Country,Flag Image,features)",
        description="Convert a CSV (optionally gzipped) whose `features` column is numpy's printed "
        "text of a 1xD array into embeddings/model=NAME/ shards and a manifest. image_id is the "
        "Country's file stem (spaces -> _, [ ] removed), so ids match the bundled flags. A "
        "registered model's dimension must match; other names are imported as external models. "
        "A run without images.parquet gets the bundled flags' rows when every id is a bundled flag.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="the CSV (.csv or .csv.gz; path or URI)")
    p.add_argument("--model", metavar="NAME",
                   help="model name to store them under (e.g. vit, clip, blip2, dinov2, "
                   "efficientnet, vgg16); may be left out for the original files "
                   "national_flag_embeddings_<label>.csv[.gz], whose label names the model")
    options.add_run_options(p)
    p.add_argument("--checkpoint", metavar="WEIGHTS",
                   help="the weights (hub id or path) that made the vectors; lets `flagsim query` "
                   "embed new images the same way")
    p.add_argument("--revision", metavar="REV", help="hub revision of --checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace the model's existing embeddings (without it, a file whose bytes "
                   "were already imported is skipped as up to date, and any other is refused)")
    p.add_argument("--no-images", action="store_true",
                   help="do not write images.parquet when the run has none")
    return p


def run(args: argparse.Namespace) -> int:
    from flagsim.errors import ConfigError
    from flagsim.importcsv import import_csv, model_from_filename

    cfg = options.config_from_args(args)
    run_dir = options.run_dir_from(args, cfg, writable=True)
    if args.model and len(args.files) > 1:
        raise ConfigError("--model names one file's model; import several files without --model")
    if (args.checkpoint or args.revision) and len(args.files) > 1:
        raise ConfigError("--checkpoint/--revision describe one model; import one file at a time")
    plan = []
    for f in args.files:
        model = args.model or model_from_filename(f)
        if not model:
            raise ConfigError(f"{f}: pass --model NAME (the model cannot be told from the file name)")
        plan.append((f, model))
    for f, model in plan:
        res = import_csv(
            f, model, run_dir, checkpoint=args.checkpoint, revision=args.revision,
            shard_size=cfg.embed.shard_size, force=args.force, images=not args.no_images,
        )
        if res.up_to_date:
            print(f"{res.rows} x {res.dim} embeddings of {res.model} in "
                  f"{run_dir}/embeddings/model={res.model}: up to date (same file already imported)")
            continue
        print(f"{res.rows} x {res.dim} embeddings of {res.model} -> "
              f"{run_dir}/embeddings/model={res.model} ({res.shards} shard(s)){images_note(res)}")
    return 0


def images_note(res) -> str:
    """What an import did to the run's images table, as the end of its summary line."""
    if res.images_table == "kept" and res.not_in_images:
        return f"; {res.not_in_images} id(s) not in images.parquet"
    return {"written": "; wrote images.parquet from the bundled flags",
            "kept": "", "none": "; no images table"}[res.images_table]
