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
