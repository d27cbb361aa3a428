"""The identifiers TensorRT's Python bindings define, read from NVIDIA's real bindings wheels.

    python tools/tensorrt_api_surface.py            # download the wheels, write trtforge/data/tensorrt-api-<version>.json
    python tools/tensorrt_api_surface.py --check    # download again, fail if a committed table differs

The wheels (``tensorrt-cu13-bindings`` 11.4, the newest ``tensorrt-cu12-bindings`` 10.x) come
from PyPI with ``pip download --no-deps --only-binary=:all:``. Their compiled module cannot be
imported without libnvinfer, and ``strings`` over it is not enough: the linker tail-merges
short names into longer ones (``Runtime`` exists only as the tail of ``IRuntime``), so a name
can be defined without ever appearing on its own. Instead this reads the exact addresses the
code hands to pybind11 as names: the RIP-relative operands in ``objdump -d`` and the targets of
``R_X86_64_RELATIVE`` relocations (tables of name pointers), each inside ``.rodata``; the
NUL-terminated identifier at each address is a name the module defines. The names the package's
``__init__.py`` defines in Python (``nptype``, ``volume``, ``__version__``) are added from its AST.

The table is flat: it says a name exists somewhere in the module, not on which class.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "trtforge" / "data"
WHEELS = {"tensorrt-cu13-bindings": "tensorrt-cu13-bindings==11.4.*", "tensorrt-cu12-bindings": "tensorrt-cu12-bindings<11"}
MODULE = "tensorrt_bindings/tensorrt.so"
INIT = "tensorrt_bindings/__init__.py"
_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_RIP_TARGET = re.compile(r"\(%rip\)[^#]*#\s*([0-9a-f]+)")
_RELATIVE = re.compile(r"^\s*[0-9a-f]+\s+[0-9a-f]+\s+R_X86_64_RELATIVE\s+([0-9a-f]+)\s*$")


@dataclass(frozen=True)
class Section:
    name: str
    address: int
    offset: int
    size: int


def _run(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit(f"{command[0]} is not installed: install binutils (apt-get install binutils)") from None
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{' '.join(command)} failed ({err.returncode}): {err.stderr.strip()}") from None


def rodata_sections(library: Path) -> list[Section]:
    sections = []
    for line in _run("readelf", "-SW", str(library)).splitlines():
        fields = re.sub(r"^\s*\[\s*\d+\]\s*", "", line).split()
        if fields and fields[0].startswith(".rodata"):
            sections.append(Section(fields[0], int(fields[2], 16), int(fields[3], 16), int(fields[4], 16)))
    if not sections:
        raise SystemExit(f"{library} has no .rodata section: not the bindings module this tool reads")
    return sections


def referenced_addresses(library: Path) -> set[int]:
    """Every address the code loads RIP-relative, and every R_X86_64_RELATIVE relocation target."""
    addresses = {int(match.group(1), 16) for match in _RIP_TARGET.finditer(_run("objdump", "-d", "--no-show-raw-insn", str(library)))}
    for line in _run("readelf", "-rW", str(library)).splitlines():
        match = _RELATIVE.match(line)
        if match:
            addresses.add(int(match.group(1), 16))
    return addresses


def compiled_identifiers(library: Path) -> set[str]:
    data = library.read_bytes()
    sections = rodata_sections(library)
    names = set()
    for address in referenced_addresses(library):
        section = next((s for s in sections if s.address <= address < s.address + s.size), None)
        if section is None:
            continue
        start = section.offset + address - section.address
        end = data.find(b"\0", start, section.offset + section.size)
        if end > start and _IDENTIFIER.fullmatch(data[start:end]):
            names.add(data[start:end].decode())
    return names


def python_identifiers(source: str) -> set[str]:
    """The names ``__init__.py`` binds at module level (defs, classes, assignments)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def download(requirement: str, folder: Path) -> Path:
    _run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(folder), requirement)
    (wheel,) = folder.glob("*.whl")
    return wheel


def table_of(package: str, wheel: Path) -> dict:
    version = wheel.name.split("-")[1]
    with tempfile.TemporaryDirectory() as unpacked, zipfile.ZipFile(wheel) as archive:
        library = Path(archive.extract(MODULE, unpacked))
        identifiers = compiled_identifiers(library) | python_identifiers(archive.read(INIT).decode())
    return {
        "package": package,
        "version": version,
        "wheel": wheel.name,
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "module": MODULE,
        "method": "RIP-relative operands (objdump -d) and R_X86_64_RELATIVE targets (readelf -r) in .rodata, plus __init__.py's names",
        "identifiers": sorted(identifiers),
    }


def table_path(version: str) -> Path:
    return DATA / f"tensorrt-api-{'.'.join(version.split('.')[:2])}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed table differs from the wheels")
    args = parser.parse_args(argv)
    stale = []
    for package, requirement in WHEELS.items():
        with tempfile.TemporaryDirectory() as folder:
            table = table_of(package, download(requirement, Path(folder)))
        path = table_path(table["version"])
        text = json.dumps(table, indent=1) + "\n"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(f"{path.relative_to(REPO)} (wheel {table['wheel']})")
            continue
        path.write_text(text)
        print(f"{path.relative_to(REPO)}: {len(table['identifiers'])} identifiers from {table['wheel']}")
    if stale:
        print("out of date: " + ", ".join(stale) + ": run python tools/tensorrt_api_surface.py and commit the tables", file=sys.stderr)
        return 1
    if args.check:
        print("the committed TensorRT API tables match the wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
