"""`flagsim models`: the registered models, their default weights and whether those are available offline."""

from __future__ import annotations

import argparse
import json

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "models",
        help="list the registered models and whether their weights are available offline",
        description="List every registered model: name, family, weights source, embedding "
        "width, pooling, and whether its weights can be loaded without the network (a local "
        "path, the Hugging Face or torch hub cache, or an installed package). With --config/"
        "--set, the weights of embed.settings.<model>.weights are checked instead of the "
        "defaults. Nothing is downloaded and no model is loaded.",
    )
    options.add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per model instead")
    p.add_argument(
        "--details", action="store_true", help="also print why each unavailable model is unavailable"
    )
    return p


def rows(args: argparse.Namespace) -> list[dict]:
    from flagsim.models import check_weights, get_spec, list_models

    cfg = None
    if getattr(args, "config", None) or getattr(args, "overrides", None):
        cfg = options.config_from_args(args)
    out = []
    for name in list_models():
        spec = get_spec(name)
        weights, revision = spec.weights, spec.revision
        if cfg is not None:
            mcfg = cfg.embed.for_model(name)
            if mcfg.weights is not None:
                weights, revision = mcfg.weights, mcfg.revision
            elif mcfg.revision is not None:
                revision = mcfg.revision
        reason = check_weights(name, weights, revision, offline=True)
        out.append({
            "name": name,
            "family": spec.family,
            "weights": weights,
            "revision": revision,
            "dim": spec.dim,
            "pooling": spec.pooling,
            "image_size": spec.image_size,
            "available_offline": reason is None,
            "reason": reason,
            "description": spec.description,
        })
    return out


def run(args: argparse.Namespace) -> int:
    table_rows = rows(args)
    if args.json:
        for r in table_rows:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    from rich.table import Table

    from flagsim.console import plain, safe, stdout_console

    table = Table(title="registered models")
    for col, kw in (
        ("name", {"style": "bold"}),
        ("family", {}),
        ("default weights" if not getattr(args, "config", None) else "weights", {}),
        ("dim", {"justify": "right"}),
        ("pooling", {}),
        ("offline", {}),
    ):
        table.add_column(col, **kw)
    for r in table_rows:
        src = r["weights"] or "none (weight-free)"
        if r["revision"]:
            src += f"@{r['revision']}"
        table.add_row(safe(r["name"]), safe(r["family"]), safe(src), str(r["dim"]), safe(r["pooling"]),
                      "yes" if r["available_offline"] else "no")
    console = stdout_console()
    console.print(table)
    missing = [r for r in table_rows if not r["available_offline"]]
    if args.details:
        for r in missing:
            print(plain(r["reason"]))
    elif missing:
        console.print(
            f"{len(missing)} model(s) need weights that are not available offline; "
            "--details says how to supply them", markup=False, highlight=False,
        )
    return 0
