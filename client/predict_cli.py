"""``idc-client predict``'s command line: its flags, and the summary it prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from client.predict import COMPILE_FROM, CPU_BATCH, GPU_BATCH, load_network, run_predict
from client.predict_report import fmt, threshold_arg
from common.cli_util import add_command
from common.config import CHANNELS_LAST, COMPILE_MODES, PRECISIONS
from common.metrics import BALANCED_ACCURACY, SCALAR_METRICS


def _print_summary(summary: dict[str, Any], out: Path, shown: int = 20) -> None:
    report = summary["data"]["report"]
    print(
        f"predicted {summary['patches']} patches of {len(summary['patients'])} patient(s) "
        f"on {summary['device']}; {len(report['unreadable'])} unreadable skipped, "
        f"{len(report['ignored']) + len(report['mislabelled'])} files not used"
    )
    print(f"decision threshold: {summary['threshold']['detail']}")
    for row in summary["patients"][:shown]:
        print(
            f"  patient {row['patient']}: {row['predicted_idc']} of {row['patches']} patches "
            f"predicted IDC ({100 * row['predicted_idc_share']:.1f}%)"
        )
    if len(summary["patients"]) > shown:
        print(f"  ... and {len(summary['patients']) - shown} more patients in patients.csv")
    m = summary["metrics"]
    if m is None:
        print("no labels in the file names: no metrics (predictions only)")
    else:
        print(f"metrics on {m['examples']} labelled patches:")
        print("  " + "  ".join(f"{k} {fmt(m[k])}" for k in SCALAR_METRICS))
        best = m["best_threshold_on_these_patches"]
        if best is not None:
            print(
                f"  balanced accuracy is highest here at threshold {best['threshold']:.4g} "
                f"({fmt(best[BALANCED_ACCURACY])}); choose a threshold on validation "
                "patches, never on the test patches it is scored on"
            )
    print(f"written to {out}")


def _predict_cmd(args: argparse.Namespace) -> int:
    from common.provenance import describe

    model, metadata = load_network(args.model, args.allow_unverified)
    print(describe(metadata))
    if metadata is None:
        print(
            "WARNING: this model has no provenance record; its origin is unchecked", file=sys.stderr
        )
    summary = run_predict(
        model,
        args.data,
        args.out,
        metadata,
        args.cache_dir,
        args.batch_size,
        None if args.no_heatmaps else args.cell,
        args.device,
        threshold=args.threshold,
        model_path=args.model,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    _print_summary(summary, args.out)
    return 0


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-client predict``."""
    p = add_command(
        sub, "predict", _predict_cmd, "run a model over a folder: predictions, heatmaps"
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model file (the coordinator's final/model.idc)"
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a folder of patients or one patient's folder; patches with or without a label",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size (default {GPU_BATCH} on GPU, {CPU_BATCH} on CPU)",
    )
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda:N")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast on a GPU that supports it, fp32 on a CPU",
    )
    p.add_argument(
        "--channels-last",
        choices=CHANNELS_LAST,
        default="auto",
        help="NHWC memory layout (auto: on; measured faster on GPU and CPU)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="auto",
        help=f"torch.compile the network (auto: on a CPU from {COMPILE_FROM:,} patches, where "
        "its warm-up of about a minute was measured to pay off; off on a GPU)",
    )
    p.add_argument(
        "--cell",
        type=int,
        default=10,
        choices=(1, 2, 5, 10, 25, 50),
        help="heatmap mosaic pixels per patch (50: full resolution)",
    )
    p.add_argument(
        "--threshold",
        type=threshold_arg,
        default=None,
        help="P(IDC) at or above which a patch is called IDC (default: the model record's, "
        "else 0.5)",
    )
    p.add_argument("--no-heatmaps", action="store_true", help="skip the per-patient PNGs")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept plain weights (.pt/.npz) with no provenance (warns)",
    )
