"""The ``trtforge`` command: parse arguments, call one library function, translate errors.

Every ``TrtforgeError`` is printed as ``error: <message>`` on stderr with exit code 1 and
no traceback. Heavy imports (torch, Prefect) happen inside the commands that need them, so
``pull``, ``ls`` and ``show`` work with the core install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from trtforge.errors import TrtforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
RegistryOption = Annotated[
    Optional[str],
    typer.Option("--registry", help="file://PATH or s3://BUCKET/PREFIX (default: $TRTFORGE_REGISTRY, then the spec's)."),
]


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def main() -> None:
    try:
        app()
    except TrtforgeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


def _print_run_table(summary) -> None:
    from trtforge.report import target_rows

    rows = target_rows(summary)
    headers = ["target", "status", "metrics", "reason / notes", "location"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)))


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Model spec YAML, e.g. examples/digits/spec.yaml.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Use this checkpoint instead of the spec's (no retraining).")] = None,
    registry: RegistryOption = None,
    artifacts: Annotated[Path, typer.Option(help="Folder for run outputs and caches.")] = Path("artifacts"),
    summary_file: Annotated[Optional[Path], typer.Option("--summary", help="Append the Markdown summary to this file.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the retrain-to-engine flow: checkpoint, export, simplify, build, gate, publish."""
    from trtforge.errors import RunFailed
    from trtforge.report import markdown_summary
    from trtforge.spec import load_spec

    load_spec(spec)  # fail on a bad spec before starting Prefect
    from flows.retrain_to_engine import retrain_to_engine

    try:
        summary = retrain_to_engine(
            spec_path=str(spec), checkpoint=str(checkpoint) if checkpoint else None, registry=registry, artifacts_dir=str(artifacts)
        )
        failed = None
    except RunFailed as err:
        summary, failed = err.summary, err
    if summary_file is not None:
        with open(summary_file, "a") as handle:
            handle.write(markdown_summary(summary))
    if as_json:
        print_json(summary.public_json())
    else:
        if summary.up_to_date:
            typer.echo(f"up to date: version {summary.version}")
        else:
            _print_run_table(summary)
            typer.echo(summary.message)
            if summary.run_dir:
                typer.echo(f"report: {summary.run_dir / 'report.md'}")
    if failed is not None:
        raise typer.Exit(1)


@app.command("validate-calibration")
def validate_calibration_command(
    spec: Annotated[Path, typer.Argument(help="Model spec YAML, e.g. examples/digits/spec.yaml.")],
    data: Annotated[
        Optional[Path], typer.Option(help="Calibration data (.npz, .npy or image folder) instead of the spec's.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Write the validation result (JSON) and Data Docs (HTML) into this folder.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check a calibration set against the spec with great-expectations; exit 1 when it fails."""
    from trtforge.spec import load_spec
    from trtforge.stages.validate_calibration import validate_calibration

    report = validate_calibration(load_spec(spec), data=data, out_dir=out)
    if as_json:
        print_json(report.summary())
    else:
        verdict = "passed" if report.passed else f"FAILED {len(report.failed)} expectation(s)"
        typer.echo(f"calibration set {report.source}: {report.samples} samples, sha256 {report.sha256[:12]}, {verdict}")
        for failure in report.failed:
            where = f" [{failure.column}]" if failure.column else ""
            typer.echo(f"  {failure.expectation}{where}: {failure.details}")
        if report.data_docs is not None:
            typer.echo(f"data docs: {report.data_docs}")
    if not report.passed:
        raise typer.Exit(1)
