"""Studies whose command ends with their report: the study runs (`cbtlab.tune.cli`), then its
table, figures and HTML page are built from MLflow and logged under `report/` on its parent
run (`cbtlab.dashboards.report`). The study layer cannot draw its own report (the dashboards
sit above it), so the command lives here.

    vit_adaptation_main(["--preset", "smoke"])    # = studies/vit_adaptation.py --preset smoke
    segmentation_decoders_main(["--preset", "smoke"])       # studies/segmentation_decoders.py
    decoder_robustness_main(["--preset", "smoke"])          # studies/decoder_robustness.py
"""

from __future__ import annotations

from collections.abc import Sequence

from mlflow.exceptions import MlflowException

from cbtlab.dashboards.report import build_report
from cbtlab.tune import cli as study_cli
from cbtlab.tune.runner import StudyResult


def report_study(result: StudyResult) -> None:
    """Build and log the report of a study that has just run; a failure is printed, never
    raised (the study itself is already in MLflow: `cbtlab study report` can redo it)."""
    try:
        report = build_report(result.tracking_uri, parent_run_id=result.parent_run_id)
    except (LookupError, ValueError, OSError, MlflowException) as exc:
        print(f"report: not built ({type(exc).__name__}: {exc}); retry with `cbtlab study "
              f"report --parent {result.parent_run_id}`")  # fmt: skip
        return
    print(f"report: {report.html_path}")
    for name in report.figures:
        print(f"  figure {name}")
    print(f"logged under report/ on the parent run {result.parent_run_id}")


def vit_adaptation_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab study vit-adapt` and studies/vit_adaptation.py: the study, then its report."""
    return study_cli.vit_adaptation_main(argv, prog, report=report_study)


def segmentation_decoders_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab study seg-decoders` and studies/segmentation_decoders.py: the grid, then its
    report (pareto_flops.png: mIoU against decoder FLOPs, Fig. 8 left)."""
    return study_cli.seg_decoders_main(argv, prog, report=report_study)


def decoder_robustness_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab study decoder-robustness` and studies/decoder_robustness.py: the grid, the noise
    evaluation, then the grid's report."""
    return study_cli.decoder_robustness_main(argv, prog, report=report_study)
