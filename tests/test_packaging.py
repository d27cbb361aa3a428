"""The install matches the layering: the library needs no Prefect, flows and tasks live under trtforge."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

from tests.conftest import REPO

# Makes 'prefect' (or any listed top-level package) unimportable, as in the core install.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def __init__(self, names):
            self.names = names
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError("No module named " + repr(name), name=name)
            return None
    sys.meta_path.insert(0, Block(BLOCKED))
    """
)


def _python(code: str, blocked: set[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    script = f"BLOCKED = {blocked!r}\n" + BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_library_module_imports_without_prefect():
    done = _python(
        """
        import pkgutil, trtforge
        names = [m.name for m in pkgutil.walk_packages(trtforge.__path__, "trtforge.")]
        library = [n for n in names if not n.startswith(("trtforge.flows", "trtforge.tasks"))]
        for name in library:
            __import__(name)
        assert "prefect" not in sys.modules
        print(len(library))
        """,
        {"prefect"},
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 40


def test_flows_and_tasks_import_from_the_repository_root_and_from_elsewhere(tmp_path):
    code = """
        import trtforge.flows.retrain_to_engine as flow, trtforge.tasks.stage as stage
        print(flow.__file__, stage.__file__)
        """
    for cwd in (REPO, tmp_path):
        done = _python(code, set(), cwd=cwd)
        assert done.returncode == 0, done.stderr
        flow_file, stage_file = done.stdout.split()
        assert Path(flow_file) == REPO / "flows" / "retrain_to_engine.py"
        assert Path(stage_file) == REPO / "tasks" / "stage.py"


def test_declared_packages_are_every_package_folder():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    on_disk = {
        ".".join((name, *init.parent.relative_to(REPO / folder).parts))
        for name, folder in mapping.items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert set(config["packages"]) == on_disk


def test_the_wheel_installs_no_generic_top_level_packages(tmp_path):
    # A copy of the sources: setuptools writes its build folder into the tree it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("trtforge", "flows", "tasks"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("trtforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"trtforge"}
    assert "trtforge/flows/retrain_to_engine.py" in names and "trtforge/tasks/stage.py" in names


def test_run_without_the_pipeline_extra_says_what_to_install():
    done = _python(
        """
        sys.argv = ["trtforge", "run", "examples/digits/spec.yaml"]
        from trtforge.cli import main
        main()
        """,
        {"prefect", "torch"},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: 'trtforge run' needs the pipeline extra, which is not installed (no module 'prefect'): pip install 'trtforge[pipeline]'"
    ]
