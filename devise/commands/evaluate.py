"""`devise evaluate` (and jobs/evaluate.py): paper-style tables for a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from devise.commands.common import LOCAL_HELP, add_ray_args, resources_from_args
from devise.config import EvalConfig
from devise.runtime import check_local, preflight

_D = EvalConfig  # every default below is the config's


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="paper-style tables: flat and zero-shot hit@k, GZSL, retrieval"
    )
    p.add_argument("--model", required=True, help="RUN_DIR/model written by `devise train`")
    p.add_argument("--catalog", required=True, help="catalog parquet with test/unseen splits")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--feature-cache", default=None, help="default: $DEVISE_HOME/features")
    p.add_argument("--conse-top", type=int, default=_D.conse_top, help="ConSE's T")
    p.add_argument(
        "--pseudo-unseen",
        type=int,
        default=_D.pseudo_unseen,
        help="training classes held out per calibration draw (default: a fifth of them)",
    )
    p.add_argument(
        "--calibration-draws",
        type=int,
        default=_D.calibration_draws,
        help="pseudo-unseen draws whose H curves are averaged to choose γ",
    )
    p.add_argument(
        "--batch-size", type=int, default=_D.resources.batch_size, help="images per backbone batch"
    )
    p.add_argument(
        "--decode-cpus", type=float, default=_D.resources.decode_cpus, help="CPUs per decode task"
    )
    p.add_argument("--seed", type=int, default=_D.seed, help="random seed")
    add_ray_args(
        p,
        workers_help="backbone actors (feature extraction)",
        defaults=_D.resources,
        local_help=LOCAL_HELP + "; features by the local executor (decode processes + the "
        "backbone here, as `devise embed --local`)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_local(args.local, args.address)
    resources = resources_from_args(args)  # a bad width is one sentence before anything starts
    if not Path(args.model).exists():
        from devise.evaluate import EvalError

        raise EvalError(f"Model folder {args.model} does not exist; train one with `devise train`.")
    from devise.fsutil import check_output_dir

    check_output_dir(args.out, "--out")  # before Ray and the model: a bad folder wastes nothing
    if not args.local:
        preflight(args.address)  # a dead cluster is named before the stage loads
        from devise.runtime import init_ray

        init_ray(args.address)
    from devise.evaluate import evaluate

    config = EvalConfig(
        model=args.model, catalog=args.catalog, out=args.out, feature_cache=args.feature_cache,
        conse_top=args.conse_top, pseudo_unseen=args.pseudo_unseen,
        calibration_draws=args.calibration_draws, seed=args.seed, address=args.address,
        local=args.local, resources=resources,
    )  # fmt: skip
    report = evaluate(config)
    print((Path(args.out) / "report.md").read_text())
    print(
        f"Wrote {Path(args.out) / 'metrics.json'}, report.md, confusion.png (uncalibrated) and "
        "confusion_calibrated.png"
    )
    return 0 if report else 1
