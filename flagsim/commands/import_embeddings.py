"""`flagsim import-embeddings`: bring embeddings made elsewhere (Parquet, clip-retrieval) into a run."""

from __future__ import annotations

import argparse

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    from flagsim.importemb import CLIP_ID_COLUMNS, FORMATS

    p = sub.add_parser(
        "import-embeddings",
        help="import embeddings made elsewhere (a Parquet table, or clip-retrieval's output)",
        description="Convert embeddings made by another tool into embeddings/model=NAME/ shards "
        "and a manifest, so that index, neighbours, query, compare and report work on them. "
        "SOURCE is a Parquet file or folder with an id, an optional name and a vector column "
        "(list or fixed-size list of floats), or clip-retrieval's output folder "
        "(img_emb/img_emb_N.npy with metadata/metadata_N.parquet, in SOURCE or SOURCE/embeddings). "
        "Every row is checked (one dimension, no NaN/Inf, unique ids) before the run changes; a "
        "registered model's dimension must match.",
    )
    p.add_argument("source", metavar="SOURCE", help="Parquet file or folder, or clip-retrieval "
                   "output folder (path or URI)")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="model name to store them under (a registered model's dimension must match)")
    options.add_run_options(p)
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="auto",
                   help="input layout (default: clip-retrieval when SOURCE has img_emb/, else parquet)")
    p.add_argument("--id-column", metavar="C",
                   help=f"column of the image ids (default: image_id; clip-retrieval: the first of "
                   f"{', '.join(CLIP_ID_COLUMNS)} present)")
    p.add_argument("--name-column", metavar="C",
                   help="column of the display names (default: name, clip-retrieval: caption, "
                   "when present; else the id)")
    p.add_argument("--vector-column", metavar="C", help="Parquet column of the vectors (default: embedding)")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="rows per shard (default: the config's embed.shard_size)")
    p.add_argument("--force", action="store_true", help="replace the model's existing embeddings (without it, a rerun of the same import "
                   "is up to date and any other is refused)")
    return p


def run(args: argparse.Namespace) -> int:
    from flagsim.commands.import_csv import images_note
    from flagsim.importemb import import_embeddings

    cfg = options.config_from_args(args, {"embed.shard_size": args.shard_size})
    run_dir = options.run_dir_from(args, cfg, writable=True)
    res = import_embeddings(
        args.source, args.model, run_dir, fmt=args.fmt, id_column=args.id_column,
        name_column=args.name_column, vector_column=args.vector_column,
        shard_size=cfg.embed.shard_size, force=args.force,
    )
    if res.up_to_date:
        print(f"{res.rows} x {res.dim} embeddings of {res.model}: {run_dir}/embeddings/model="
              f"{res.model} up to date (the same {res.files} file(s) already imported)")
        return 0
    print(f"{res.rows} x {res.dim} embeddings of {res.model} from {res.files} {res.format} file(s) -> "
          f"{run_dir}/embeddings/model={res.model} ({res.shards} shard(s)){images_note(res)}")
    return 0
