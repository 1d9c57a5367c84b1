"""The pack's shape: it imports without ComfyUI, keeps its rooms apart, and installs as a package."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import comfyui_selma
from comfyui_selma.trainer import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution",
                   "node_helpers", "latent_preview"}
PYPROJECT = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())


def _absolute_imports(path: Path, module_level_only: bool) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    statements = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for statement in statements:
        if isinstance(statement, ast.Import):
            found += [(alias.name.split(".")[0], statement.lineno) for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
            found.append((statement.module.split(".")[0], statement.lineno))
    return found


def test_package_imports_where_comfyui_is_absent():
    probe = ("import sys, comfyui_selma; "
             "assert not {'comfy', 'folder_paths', 'server'} & set(sys.modules), sorted(sys.modules); "
             "print(sorted(comfyui_selma.NODE_CLASS_MAPPINGS))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def test_entry_point_exports_what_comfyui_reads():
    assert comfyui_selma.WEB_DIRECTORY == "./web"
    assert set(comfyui_selma.NODE_CLASS_MAPPINGS) == set(comfyui_selma.NODE_DISPLAY_NAME_MAPPINGS)


def test_trainer_never_imports_comfyui():
    for path in (REPOSITORY_ROOT / "trainer").rglob("*.py"):
        for module, line in _absolute_imports(path, module_level_only=False):
            assert module not in COMFYUI_MODULES, f"{path}:{line} imports ComfyUI module {module!r}"


def test_nodes_import_comfyui_only_inside_functions():
    for path in (REPOSITORY_ROOT / "nodes").rglob("*.py"):
        for module, line in _absolute_imports(path, module_level_only=True):
            assert module not in COMFYUI_MODULES, f"{path}:{line} imports {module!r} at module level"


@pytest.mark.parametrize("node_name", sorted(comfyui_selma.NODE_CLASS_MAPPINGS))
def test_node_declares_the_classic_schema_with_tooltips(node_name):
    node_class = comfyui_selma.NODE_CLASS_MAPPINGS[node_name]
    assert node_class.CATEGORY.startswith("SELMA/")
    assert node_class.DESCRIPTION.strip()
    assert isinstance(node_class.RETURN_TYPES, tuple)
    assert callable(getattr(node_class, node_class.FUNCTION))
    inputs = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for input_name, spec in inputs.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_name}.{input_name} needs a tooltip"


def test_requirements_txt_mirrors_pyproject_dependencies_without_pinning_torch():
    listed = [line.strip() for line in (REPOSITORY_ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == PYPROJECT["project"]["dependencies"]
    torch_requirement = next(requirement for requirement in listed if requirement.startswith("torch"))
    assert "==" not in torch_requirement


def test_pyproject_carries_what_the_comfy_registry_validates():
    project = PYPROJECT["project"]
    assert project["version"] and project["license"] == "MIT" and project["requires-python"] == ">=3.10"
    assert {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"} <= set(PYPROJECT["tool"]["comfy"])
    assert project["scripts"]["selma"] == "comfyui_selma.trainer.cli:main"


@pytest.mark.slow
def test_wheel_installs_the_root_as_comfyui_selma_with_its_data(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPOSITORY_ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel_path,) = tmp_path.glob("comfyui_selma-*.whl")
    names = set(zipfile.ZipFile(wheel_path).namelist())
    assert "comfyui_selma/__init__.py" in names
    assert "comfyui_selma/trainer/cli.py" in names
    for path in (REPOSITORY_ROOT / "nodes").glob("*.py"):
        assert f"comfyui_selma/nodes/{path.name}" in names
    for path in (REPOSITORY_ROOT / "trainer").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert f"comfyui_selma/{path.relative_to(REPOSITORY_ROOT)}" in names, f"{path} is left out of the wheel"
    assert not any(name.startswith("comfyui_selma/tests/") for name in names)


@pytest.mark.parametrize("subcommand", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_answers_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([subcommand, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: selma " + subcommand)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _parsers(subparser)


def test_every_help_text_is_printed_as_written_percent_signs_included():
    def squeezed(text: str) -> str:  # argparse wraps lines, also at hyphens
        return "".join(text.split())

    for parser in _parsers(cli.build_parser()):
        shown = parser.format_help()
        assert "'option_strings'" not in shown, f"{parser.prog}: a help text broke argparse's formatting"
    train_help = squeezed(next(parser for parser in _parsers(cli.build_parser())
                               if parser.prog == "selma train").format_help())
    assert squeezed("Recompute activations in the backward pass: much less memory, about 20-30% slower.") in train_help


def test_a_stage_not_built_yet_says_so_and_exits_non_zero(capsys, monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "render", (None, "Stage 2"))
    assert cli.main(["render"]) == cli.NOT_BUILT_EXIT_CODE
    assert "not built yet" in capsys.readouterr().err


def test_selma_console_script_is_installed():
    result = subprocess.run([str(Path(sys.executable).parent / "selma"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "prompts" in result.stdout
