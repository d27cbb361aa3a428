"""The ``trtforge`` command: parse arguments, call one library function, translate errors.

Every ``TrtforgeError`` is printed as ``error: <message>`` on stderr with exit code 1 and
no traceback, also where Prefect logs it: tracebacks reach the terminal only with ``--debug``
(or ``TRTFORGE_DEBUG=1``), while Prefect's API logs and states keep them for the UI. Heavy
imports (torch, Prefect) happen inside the commands that need them, so ``pull``, ``ls`` and
``show`` work with the core install.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from trtforge.errors import TrtforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
RegistryOption = Annotated[
    str | None,
    typer.Option("--registry", help="file://PATH or s3://BUCKET/PREFIX (default: $TRTFORGE_REGISTRY, then the spec's)."),
]


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def debugging() -> bool:
    return os.environ.get("TRTFORGE_DEBUG", "") not in ("", "0")


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also TRTFORGE_DEBUG=1).")] = False,
) -> None:
    """Turn trained PyTorch checkpoints into gated, versioned engines, and serve them back."""
    if debug:
        os.environ["TRTFORGE_DEBUG"] = "1"


def main() -> None:
    try:
        app()
    except TrtforgeError as err:
        if debugging():
            traceback.print_exc()
        typer.echo(f"error: {err}", err=True)
        _leave(1)
    except SystemExit as done:
        _leave(done.code)
    _leave(0)


def _leave(code: int | str | None) -> NoReturn:
    """Exit now. Python's own shutdown would first tear down every module a pipeline run loaded (torch, Prefect,
    onnx): 1.5-2 s of each run, for nothing the process still needs. What of that shutdown matters is done here:
    Prefect's background workers deliver their last logs and events, the atexit callbacks run (logging's among
    them), and stdout and stderr are flushed."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    if "prefect" in sys.modules:
        from trtforge.flows.temporary_api import drain_prefect_workers

        drain_prefect_workers()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


class _NoUserErrorTraceback(logging.Formatter):
    """A console formatter that leaves out the traceback of a project error (the CLI prints its one line).

    The record itself is left as it is, so Prefect's API handler still sends the traceback to the UI.
    """

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, TrtforgeError):
            return self.inner.format(record)
        kept = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = kept


def _console_handlers() -> list[logging.StreamHandler]:
    # Prefect's console handler sits on the root logger (its flow and task run loggers propagate to it). The API
    # handler, which ships records to the server, is left alone.
    handlers = [*logging.getLogger().handlers, *logging.getLogger("prefect").handlers]
    return [h for h in handlers if isinstance(h, logging.StreamHandler)]


def _quiet_console_tracebacks() -> None:
    """Prefect logs every failed task and flow with its traceback on the console; a user error needs none."""
    if debugging():
        return
    for handler in _console_handlers():
        if not isinstance(handler.formatter, _NoUserErrorTraceback):
            handler.setFormatter(_NoUserErrorTraceback(handler.formatter))


class _NoLinksTo(logging.Filter):
    """Leaves out Prefect's "View at URL" lines for a server that serves no UI and stops with the run."""

    def __init__(self, address: str):
        super().__init__()
        self.line_start = f"View at {address}"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.line_start)


@contextlib.contextmanager
def _pipeline_flow(
    module: str,
    name: str,
    command: str,
    *,
    runs_here: bool = True,
    head_start: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Iterator[Any]:
    """A flow of the pipeline extra (with the core install, one line saying what to install), for the block.

    ``runs_here``: the flow runs in this process, so where no API is configured a temporary Prefect
    server starts before Prefect is imported here, boots while the flow's modules import, and
    stops when the block ends. ``head_start``: the flow's first stages (trtforge.headstart), for the
    block, begun first, so that they run while the server's child reads Prefect's settings and boots
    and Prefect imports here (begun after the child's decision, they started 0.7-0.9 s later, and a
    cold digits run spent 0.6 s more outside any stage).
    """
    temporary_api, stack = None, contextlib.ExitStack()
    # The stack sees how the block ended: an interrupted run stops its head start rather than waiting for it.
    with stack:
        try:
            try:
                if not _importable("prefect"):
                    # Before the head start, which a failing run waits for: a core install learns this at once.
                    raise ModuleNotFoundError("No module named 'prefect'", name="prefect")
                if head_start is not None:
                    stack.enter_context(head_start())
                if runs_here:
                    temporary_api = importlib.import_module("trtforge.flows.temporary_api").TemporaryApi.start(_import_the_flows_library)
                flow = getattr(importlib.import_module(f"trtforge.flows.{module}"), name)
            except ModuleNotFoundError as err:
                missing = (err.name or "").split(".")[0]
                if missing.startswith("trtforge"):
                    raise
                raise TrtforgeError(
                    f"'trtforge {command}' needs the pipeline extra, which is not installed (no module {missing!r}): pip install 'trtforge[pipeline]'"
                ) from None
            _quiet_console_tracebacks()
            if temporary_api is not None:
                temporary_api.wait_ready()
                for handler in _console_handlers():
                    handler.addFilter(_NoLinksTo(temporary_api.address))
            yield flow
        finally:
            if temporary_api is not None:
                temporary_api.stop()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _import_the_flows_library() -> None:
    from trtforge.flows import LIBRARY_MODULES
    from trtforge.report import pyplot

    for module in LIBRARY_MODULES:
        importlib.import_module(module)
    pyplot()


def _already_published(spec, checkpoint: Path, registry: str | None):
    """Decided before any Prefect server starts: the run's summary when a published version has exactly these
    inputs (else None), and the inputs, hashed once here for the flow to reuse (None without a checkpoint yet)."""
    from trtforge.lineage import published_version, run_inputs
    from trtforge.registry import open_registry
    from trtforge.registry.storage import check_store_uri
    from trtforge.stages.publish import registry_uri
    from trtforge.summary import RunSummary

    uri = registry_uri(spec, registry)
    check_store_uri(uri)  # a mistyped --registry fails now, not after the training
    if not Path(checkpoint).is_file():
        return None, None
    inputs = run_inputs(spec, Path(checkpoint))
    version = published_version(open_registry(uri), spec, inputs)
    if version is None:
        return None, inputs
    summary = RunSummary(
        model=spec.name, registry=uri, version=version, up_to_date=True, passed=True, message=f"up to date: version {version}"
    )
    return summary, inputs


def _fail(message: str) -> None:
    """End a command that printed its results but failed: one ``error:`` line on stderr, exit code 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _print_run_table(summary) -> None:
    from trtforge.report import format_metrics

    if not summary.targets:
        return
    headers = ["target", "status", "metrics"]
    rows = [[t.tag, t.status.value + ("" if t.required else " (optional)"), format_metrics(t.metrics)] for t in summary.targets]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for target, row in zip(summary.targets, rows):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        for line in ([target.reason] if target.reason else []) + ([target.location] if target.location else []):
            typer.echo(f"    {line}")


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Model spec YAML, e.g. examples/digits/spec.yaml.")],
    checkpoint: Annotated[Path | None, typer.Option(help="Use this checkpoint instead of the spec's (no retraining).")] = None,
    registry: RegistryOption = None,
    artifacts: Annotated[Path, typer.Option(help="Folder for run outputs and caches.")] = Path("artifacts"),
    summary_file: Annotated[Path | None, typer.Option("--summary", help="Append the Markdown summary to this file.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the retrain-to-engine flow: checkpoint, export, simplify, build, gate, publish."""
    from trtforge.report import markdown_summary
    from trtforge.spec import load_spec

    loaded = load_spec(spec)  # fail on a bad spec before starting Prefect
    (summary, inputs), failed = _already_published(loaded, checkpoint or loaded.checkpoint, registry), None
    if summary is None:
        # The embedded API server starts in a subprocess; on a busy 2-core machine Prefect's
        # 20 s default is not always enough.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from trtforge.headstart import head_start

        try:
            with _pipeline_flow(
                "retrain_to_engine", "retrain_to_engine", "run", head_start=lambda: head_start(loaded, checkpoint, artifacts)
            ) as retrain_to_engine:
                summary = retrain_to_engine(
                    spec_path=str(spec),
                    checkpoint=str(checkpoint) if checkpoint else None,
                    registry=registry,
                    artifacts_dir=str(artifacts),
                    inputs=inputs,
                )
        except TrtforgeError as err:
            if err.summary is None:
                raise
            summary, failed = err.summary, err
        except RuntimeError as err:
            if "Prefect API" not in str(err):
                raise
            raise TrtforgeError(f"{err}; set PREFECT_API_URL to a running server or retry when the machine is less busy") from None
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
            if summary.run_dir and (summary.run_dir / "report.md").is_file():
                typer.echo(f"report: {summary.run_dir / 'report.md'}")
    if failed is not None:
        _fail(summary.message)


def _for_worker(location: str) -> str:
    """A local path or file:// URI made absolute, so a worker on a shared filesystem finds it; other URIs as they are."""
    if location.startswith("file://"):
        return "file://" + os.path.abspath(location.removeprefix("file://"))
    if "://" in location:
        return location
    return os.path.abspath(location)


@app.command("ci")
def ci_command(
    spec: Annotated[Path, typer.Option("--spec", help="Model spec YAML; with --deployment, a path the worker can read (its checkout).")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="The checkpoint to build: a local path or s3://BUCKET/KEY.")],
    summary_file: Annotated[Path | None, typer.Option("--summary", help="Write the Markdown summary to this file.")] = None,
    junit_file: Annotated[Path | None, typer.Option("--junit", help="Write a JUnit XML report: one test case per target gate.")] = None,
    deployment: Annotated[
        str | None,
        typer.Option(
            "--deployment",
            help="Run on this deployment of the watch flow (e.g. retrain-to-engine-scheduled) on the server in PREFECT_API_URL, and wait.",
        ),
    ] = None,
    registry: RegistryOption = None,
    artifacts: Annotated[Path, typer.Option(help="Folder for run outputs and caches (runs in this process only).")] = Path("artifacts"),
    as_json: JsonFlag = False,
) -> None:
    """Build a new checkpoint for CI; exit 0 only if every required target passed and the version was published (or already was)."""
    from trtforge.ci import ci_passed, write_junit, write_markdown
    from trtforge.errors import RunFailed
    from trtforge.registry.storage import check_store_uri
    from trtforge.spec import load_spec
    from trtforge.stages.publish import registry_uri

    loaded = load_spec(spec)
    uri = registry_uri(loaded, registry)
    check_store_uri(uri)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if deployment is not None:
        with _pipeline_flow("watch", "run_on_deployment", "ci", runs_here=False) as run_on_deployment:
            summary = run_on_deployment(
                deployment,
                str(spec),
                loaded.name,
                _for_worker(checkpoint),
                _for_worker(uri),
                on_started=lambda line: typer.echo(line, err=True),
            )
    elif "://" not in checkpoint and (published := _already_published(loaded, Path(checkpoint), uri)[0]) is not None:
        summary = published
    else:
        from trtforge.headstart import head_start

        # A local checkpoint is the one the watch flow builds from: its export can start before the flow does.
        local = None if "://" in checkpoint else Path(checkpoint)
        try:
            with _pipeline_flow(
                "watch", "watch", "ci", head_start=(lambda: head_start(loaded, local, artifacts)) if local is not None else None
            ) as watch:
                summary = watch(spec_path=str(spec), checkpoint=checkpoint, registry=uri, artifacts_dir=str(artifacts))
        except RunFailed as err:
            summary = err.summary
        except RuntimeError as err:
            if "Prefect API" not in str(err):
                raise
            raise TrtforgeError(f"{err}; set PREFECT_API_URL to a running server or retry when the machine is less busy") from None
    if summary_file is not None:
        write_markdown(summary, summary_file)
    if junit_file is not None:
        write_junit(summary, junit_file)
    if as_json:
        print_json(summary.public_json())
    elif summary.up_to_date:
        typer.echo(f"up to date: version {summary.version}")
    else:
        _print_run_table(summary)
        typer.echo(summary.message)
    if not ci_passed(summary):
        _fail(summary.message)


@app.command("validate-calibration")
def validate_calibration_command(
    spec: Annotated[Path, typer.Argument(help="Model spec YAML, e.g. examples/digits/spec.yaml.")],
    data: Annotated[Path | None, typer.Option(help="Calibration data (.npz, .npy or image folder) instead of the spec's.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the validation result (JSON) and Data Docs (HTML) into this folder.")] = None,
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
        _fail(
            f"calibration set {report.source} failed {len(report.failed)} expectation(s): "
            + "; ".join(f.expectation for f in report.failed)
        )


@app.command("check")
def check_command(
    model: Annotated[Path, typer.Argument(help="The ONNX model to check, e.g. artifacts/.../model.sim.onnx.")],
    plugins: Annotated[
        list[str] | None,
        typer.Option("--plugin", help="An op domain or op type served by a TensorRT plugin (repeatable)."),
    ] = None,
    tensorrt_version: Annotated[str | None, typer.Option("--tensorrt-version", help="Check for this TensorRT release, e.g. 10.1.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check every node against TensorRT (its parser if installed, else its operator table); exit 1 if any is unsupported."""
    from trtforge.stages.check_ops import check_ops

    report = check_ops(model, plugins=plugins or (), tensorrt_version=tensorrt_version)
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        typer.echo(report.format_table())
    if not report.ok:
        unsupported = sorted({node.op_type for node in report.unsupported})
        _fail(f"{model}: {len(report.unsupported)} node(s) TensorRT cannot run (op types {', '.join(unsupported)}); see the table above")


# --- registry: ls, show, pull, verify, promote, gc (core install only) -----------------------------------

RegistryUriOption = Annotated[
    str | None,
    typer.Option("--registry", help="file://PATH or s3://BUCKET/PREFIX (default: $TRTFORGE_REGISTRY, then file://artifacts/registry)."),
]


RequireSignatureOption = Annotated[
    bool | None,
    typer.Option(
        "--require-signature/--no-require-signature",
        help="Refuse a version whose signature does not verify with the trusted key (default: $TRTFORGE_REQUIRE_SIGNATURE).",
    ),
]
TrustedKeyOption = Annotated[
    Path | None,
    typer.Option("--trusted-key", help="PEM public key that signatures must verify with (default: $TRTFORGE_TRUSTED_KEY)."),
]


def _reader(uri: str | None):
    from trtforge.registry import RegistryReader, open_registry_store

    return RegistryReader(open_registry_store(uri))


def _publisher(uri: str | None):
    from trtforge.registry import Publisher, open_registry_store

    return Publisher(open_registry_store(uri))


def _maintenance(uri: str | None):
    from trtforge.registry import Maintenance, open_registry_store

    return Maintenance(open_registry_store(uri))


def _trusted_key(path: Path | None):
    from trtforge.registry import TrustedKey

    return None if path is None else TrustedKey(path)


def _metrics_text(gate: dict[str, Any] | None) -> str:
    metrics = (gate or {}).get("metrics") or {}
    return " ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in metrics.items()) or "-"


@app.command("ls")
def ls_command(
    model: Annotated[str, typer.Argument(help="Model name, e.g. digits-cnn.")],
    registry: RegistryUriOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List a model's versions with their targets and gate results, and its aliases."""
    listing = _reader(registry).describe(model)
    if as_json:
        print_json(listing.model_dump(mode="json"))
        return
    typer.echo(f"{listing.model} in {listing.registry}")
    typer.echo("aliases: " + (", ".join(f"{alias} -> {version}" for alias, version in listing.aliases.items()) or "none"))
    for version in listing.versions:
        marks = f"  [{', '.join(version.aliases)}]" if version.aliases else ""
        signed = "signed" if version.signed else "unsigned"
        typer.echo(f"version {version.version}  {version.created_at:%Y-%m-%d %H:%M:%S} UTC  {signed}{marks}")
        for target in version.targets:
            built = " ".join(part for part in (target.backend, target.runtime_version, target.arch or "cpu", target.precision) if part)
            typer.echo(f"  {target.tag}  {built}  gate: {_metrics_text(target.gate)}")


def _fastest_by_place(manifest) -> dict[str, list[str]]:
    """Per target tag, its marks: 'best latency on cpu', 'best throughput on sm_90', ... (the manifest's choice per place)."""
    from trtforge.registry.pull import fastest_per_place

    marks: dict[str, list[str]] = {}
    for place, chosen in fastest_per_place(manifest).items():
        for by, tag in chosen.items():
            marks.setdefault(tag, []).append(f"best {by} on {place}")
    return marks


@app.command("show")
def show_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    registry: RegistryUriOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show the manifest of one version: targets, files with SHA-256, lineage, environment, serving contract."""
    manifest = _reader(registry).manifest(model, version)
    if as_json:
        print_json(manifest.model_dump(mode="json"))
        return
    typer.echo(f"{manifest.model} version {manifest.version}, published {manifest.created_at:%Y-%m-%d %H:%M:%S} UTC")
    typer.echo("lineage:")
    for name, value in manifest.lineage.model_dump().items():
        typer.echo(f"  {name}: {value}")
    typer.echo("environment: " + ", ".join(f"{name} {value}" for name, value in manifest.environment.items() if value))
    if manifest.serving is not None:
        from trtforge.serving import describe

        typer.echo("serving:")
        for line in describe(manifest.serving):
            typer.echo(f"  {line}")
    fastest = _fastest_by_place(manifest)
    for entry in manifest.targets.values():
        mark = "".join(f"  [{where}]" for where in fastest.get(entry.tag, []))
        typer.echo(f"target {entry.tag}  gate: {_metrics_text(entry.record.get('gate'))}{mark}")
        for name, file in entry.files.items():
            typer.echo(f"  {name}  {file.size} bytes  sha256 {file.sha256}")


@app.command("pull")
def pull_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the target's files into.")],
    version: Annotated[int | None, typer.Option("--version", help="Version number (default: the alias).")] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="Alias to resolve (default: latest).")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="'auto' (this host's GPU, through NVML) or e.g. sm_90.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, fp16, bf16, int8 or fp8.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="tensorrt or onnxruntime.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", "--target", help="Exact target tag, e.g. trt10.3-sm90-fp16-b1_32_128.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Local cache of verified files (default: $TRTFORGE_CACHE_DIR or ~/.cache/trtforge).")
    ] = None,
    fastest: Annotated[
        bool,
        typer.Option(
            "--fastest",
            help="Of the engines that fit, the fastest: the manifest's choice for the place ('--arch auto': this GPU, or the CPU engines).",
        ),
    ] = False,
    best: Annotated[
        str | None,
        typer.Option(
            "--best",
            help="What --fastest ranks by: 'latency' (median at the opt shape; the default) or 'throughput' (samples/s); implies --fastest.",
        ),
    ] = None,
    require_signature: RequireSignatureOption = None,
    trusted_key: TrustedKeyOption = None,
    registry: RegistryUriOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Download the engine that fits this host, verify its SHA-256 (and signature), and write it atomically."""
    reader = _reader(registry)
    if fastest or best is not None:
        from trtforge.registry.pull import fastest_target, local_tensorrt_version

        if tag is not None:
            raise TrtforgeError("--fastest chooses among the engines that fit: leave out --tag")
        version = reader.resolve(model, version=version, alias=alias)
        alias = None
        tag = fastest_target(
            reader.manifest(model, version),
            arch=arch,
            precision=precision,
            backend=backend,
            local_tensorrt=local_tensorrt_version(),
            best=best or "latency",
        ).tag
        arch = precision = backend = None
    result = reader.pull(
        model,
        output,
        version=version,
        alias=alias,
        tag=tag,
        arch=arch,
        precision=precision,
        backend=backend,
        cache_dir=cache_dir,
        require_signature=require_signature,
        trust=_trusted_key(trusted_key),
    )
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    source = "from the local cache" if result.cached else "downloaded and verified"
    typer.echo(f"pulled {result.model} version {result.version} target {result.tag} ({source})")
    if result.signature_verified_with:
        typer.echo(f"signature verified with {result.signature_verified_with}")
    for file in result.files:
        typer.echo(f"  {file.path}  sha256 {file.sha256}")
    for note in result.notes:
        typer.echo(f"note: {note}")


@app.command("triton")
def triton_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The Triton model repository to write (a new folder).")],
    version: Annotated[int | None, typer.Option("--version", help="Version number (default: the alias).")] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="Alias to resolve (default: latest).")] = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="TensorRT plans for these GPU architectures, comma-separated, e.g. sm_80,sm_90.")
    ] = None,
    all_archs: Annotated[bool, typer.Option("--all-archs", help="A TensorRT plan for every architecture the version has.")] = False,
    backend: Annotated[
        str | None, typer.Option("--backend", help="tensorrt or onnxruntime (default: tensorrt where the version has TensorRT targets).")
    ] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, fp16, bf16, int8 or fp8.")] = None,
    spec: Annotated[
        Path | None,
        typer.Option("--spec", help="The spec the version was built from: the batch range where no TensorRT profile records it."),
    ] = None,
    max_queue_delay_us: Annotated[int, typer.Option("--max-queue-delay-us", help="Dynamic batching: longest wait to fill a batch.")] = 100,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Capture CUDA graphs (TensorRT plans only).")] = False,
    instances: Annotated[int, typer.Option("--instances", help="Model instances in the one instance group.")] = 1,
    replace: Annotated[bool, typer.Option("--replace", help="Swap an existing repository folder for the new one.")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Local cache of verified files (default: $TRTFORGE_CACHE_DIR or ~/.cache/trtforge).")
    ] = None,
    require_signature: RequireSignatureOption = None,
    trusted_key: TrustedKeyOption = None,
    registry: RegistryUriOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Write a Triton model repository (config.pbtxt, one plan per GPU architecture) from a published version, atomically."""
    from trtforge.triton import ConfigOptions, write_repository

    result = write_repository(
        _reader(registry),
        model,
        output,
        version=version,
        alias=alias,
        archs=[a for a in arch.split(",") if a.strip()] if arch else None,
        all_archs=all_archs,
        backend=backend,
        precision=precision,
        spec_path=spec,
        options=ConfigOptions(max_queue_delay_us=max_queue_delay_us, cuda_graphs=cuda_graphs, instances=instances),
        replace=replace,
        cache_dir=cache_dir,
        require_signature=require_signature,
        trust=_trusted_key(trusted_key),
    )
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    typer.echo(f"wrote {result.model_dir} ({result.platform}) from {result.model} version {result.version}")
    for plan in result.plans:
        served = f"compute capability {plan.capability}" if plan.capability else "CPU"
        typer.echo(f"  {served}: {plan.file}  (target {plan.tag}, sha256 {plan.sha256})")
    typer.echo(f"max_batch_size {result.max_batch_size}, preferred batch sizes {result.preferred_batch_size or 'none'}")
    typer.echo(f"serve it: tritonserver --model-repository {result.repository}")


@app.command("verify")
def verify_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    trusted_key: TrustedKeyOption = None,
    require_signature: RequireSignatureOption = None,
    registry: RegistryUriOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Check a published version in place: every file's SHA-256, no added files, and its signature; exit 1 on any problem."""
    report = _maintenance(registry).verify(model, version, trust=_trusted_key(trusted_key), require_signature=require_signature)
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        typer.echo(f"{report.model} version {report.version} in {report.registry}: {'verified' if report.verified else 'FAILED'}")
        for file in report.files:
            typer.echo(f"  {file.status:8}  {file.name}  sha256 {file.sha256 or '-'}")
        for name in report.unexpected:
            typer.echo(f"  added     {name}")
        typer.echo(f"signature: {report.signature} ({report.signature_detail})")
        for problem in report.problems:
            typer.echo(f"problem: {problem}")
    if not report.verified:
        raise typer.Exit(1)


@app.command("promote")
def promote_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to point the alias at (older ones too: a rollback).")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to move, e.g. prod.")],
    registry: RegistryUriOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Point an alias at a published version (compare-and-swap: concurrent moves never overwrite blindly)."""
    _publisher(registry).promote(model, version, alias)
    if as_json:
        print_json({"model": model, "alias": alias, "version": version})
    else:
        typer.echo(f"{model}: {alias} -> version {version}")


@app.command("gc")
def gc_command(
    older_than: Annotated[float, typer.Option("--older-than", min=0, help="Only remove leftovers older than this many hours.")] = 24.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be removed; remove nothing.")] = False,
    registry: RegistryUriOption = None,
    local: Annotated[
        bool, typer.Option("--local", help="Prune this machine's work and cache folders under --artifacts instead of the registry.")
    ] = False,
    artifacts: Annotated[Path, typer.Option(help="With --local: the folder runs wrote to.")] = Path("artifacts"),
    max_gb: Annotated[
        float | None,
        typer.Option(
            "--max-gb",
            min=0,
            help="With --local: then remove the least recently used until the rest fit (default $TRTFORGE_LOCAL_CACHE_GB, then 20).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove what crashed publishes and runs left: versions without a manifest, staging folders, unfinished uploads.

    Never a published version. With --local, this machine's export work folders and precision and
    reference caches unused for --older-than hours go instead, then the least recently used until
    the rest fit the cap; nothing used in the last hour is removed.
    """
    from datetime import timedelta

    if local:
        _gc_local(artifacts, timedelta(hours=older_than), max_gb, dry_run, as_json)
        return
    report = _maintenance(registry).gc(older_than=timedelta(hours=older_than), dry_run=dry_run)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    verb = "would remove" if dry_run else "removed"
    for version in report.versions:
        typer.echo(f"{verb} unfinished {version.model} version {version.version} ({version.objects} objects, {version.bytes} bytes)")
    for staged in report.staging:
        typer.echo(f"{verb} staging of {staged.model} run {staged.run} ({staged.objects} objects, {staged.bytes} bytes)")
    for upload in report.uploads:
        typer.echo(f"{verb} unfinished upload of {upload.key} (started {upload.initiated:%Y-%m-%d %H:%M:%S} UTC)")
    if not report.versions and not report.staging and not report.uploads:
        typer.echo(f"nothing to remove in {report.registry} older than {older_than:g} h")


def _gc_local(artifacts: Path, older_than, max_gb: float | None, dry_run: bool, as_json: bool) -> None:
    from trtforge.localcache import cap_bytes_from_environment, prune

    cap = int(max_gb * 1024**3) if max_gb is not None else cap_bytes_from_environment()
    report = prune(artifacts, cap_bytes=cap, older_than=older_than, dry_run=dry_run)
    if as_json:
        print_json(report.model_dump(mode="json") | {"freed_bytes": report.freed_bytes, "kept_bytes": report.kept_bytes})
        return
    verb = "would remove" if dry_run else "removed"
    for entry in report.removed:
        typer.echo(f"{verb} {entry.kind} {entry.path} ({entry.bytes / 1024**2:.1f} MiB)")
    typer.echo(
        f"{len(report.removed)} entries ({report.freed_bytes / 1024**2:.1f} MiB) {verb}; {len(report.kept)} kept "
        f"({report.kept_bytes / 1024**2:.1f} MiB, cap {cap / 1024**3:g} GiB) in {report.root}"
    )
