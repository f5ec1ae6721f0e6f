"""The repository itself: notebooks and package in sync, pins that agree, settings that parse, layering kept."""
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import yaml

from mlwb.config import DEFAULTS, load_settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tracked_copy(tmp_path) -> Path:
    "A git repository holding a copy of the tracked and untracked-not-ignored files, committed."
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "copy"
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=copy, check=True)
    return copy


def test_nbdev_export_and_clean_change_nothing(tmp_path):
    copy = tracked_copy(tmp_path)
    for command in (["nbdev-export"], ["nbdev-clean"], ["nbdev-clean", "--fname", "projects"]):
        subprocess.run([str(BIN / command[0]), *command[1:]], cwd=copy, check=True, capture_output=True, timeout=300)
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True).stdout
    assert changed == "", f"run `make export` and commit what it writes:\n{changed}"


def constraint_pins() -> dict:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {name.lower().replace("_", "-"): version for name, version in pins.items()}


def direct_dependencies() -> list:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    return [re.split(r"[<>=!~\[ ;]", spec)[0].lower() for spec in specs]


def test_constraints_pin_every_direct_dependency_and_torch_exactly():
    pins = constraint_pins()
    assert pins["torch"] == "2.13.0"
    missing = [name for name in direct_dependencies() if name not in pins]
    assert not missing, f"constraints.txt lacks pins for {missing}"


def test_environment_yml_matches_constraints():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = dict(d.split("=", 1) for d in env["dependencies"] if isinstance(d, str) and "=" in d)
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda |= dict(d.split("==", 1) for d in pip_section if "==" in d)
    assert conda.pop("python") == "3.11"
    names = {"pytorch": "torch"}
    pins = constraint_pins()
    drift = {n: (v, pins.get(names.get(n, n))) for n, v in conda.items() if pins.get(names.get(n, n)) != v}
    assert not drift, f"environment.yml and constraints.txt disagree (env, constraints): {drift}"
    missing = set(direct_dependencies()) - {names.get(n, n) for n in conda}
    assert not missing, f"environment.yml lacks {missing}"


def test_settings_ini_holds_every_setting_and_parses():
    settings = load_settings(REPO, environ={})
    text = (REPO / "settings.ini").read_text()
    keys = re.findall(r"^(\w+)\s*=", text, flags=re.M)
    assert sorted(keys) == sorted(DEFAULTS)
    assert settings.serve_host == "127.0.0.1"


def notebook_modules() -> dict:
    "{notebook name: (module it exports, set of mlwb modules it imports)}"
    found = {}
    for path in sorted((REPO / "nbs").glob("[0-9]*.ipynb")):
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        exported = re.findall(r"^#\|\s*default_exp\s+(\S+)", source, flags=re.M)
        imports = set(re.findall(r"^\s*(?:from|import)\s+mlwb\.(\w+)", source, flags=re.M))
        found[path.name] = (exported, imports)
    return found


def test_one_notebook_per_module_and_lower_numbers_never_import_higher():
    found = notebook_modules()
    modules = {}
    for name, (exported, _) in found.items():
        assert len(exported) == 1, f"{name} must have exactly one default_exp"
        assert exported[0] not in modules, f"{name} and {modules.get(exported[0])} export the same module"
        assert name.split("_", 1)[1] == f"{exported[0]}.ipynb", f"{name} should be named after its module {exported[0]}"
        modules[exported[0]] = name
    for name, (exported, imports) in found.items():
        for module in imports - {exported[0]}:
            assert module in modules, f"{name} imports mlwb.{module}, which no notebook exports"
            assert modules[module] < name, f"{name} imports mlwb.{module} from the later notebook {modules[module]}"


def test_importing_mlwb_has_no_side_effects(tmp_path):
    code = "import os, mlwb.config, mlwb.tracking, mlwb.pipeline, mlwb.cache, mlwb.runner, mlwb.cli; print(sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_project_notebooks_have_one_parameters_cell_each():
    notebooks = sorted((REPO / "projects").glob("*/*.ipynb"))
    assert notebooks, "no project notebooks found"
    for path in notebooks:
        cells = nbformat.read(path, as_version=4).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path} has {len(tagged)} cells tagged parameters"
        assert all(not c.get("outputs") for c in cells if c.cell_type == "code"), f"{path} is stored with outputs"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme and "make run" in readme


def test_no_module_is_longer_than_a_lesson():
    long = {p.name: n for p in (REPO / "mlwb").glob("*.py") if p.name != "_modidx.py"
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines (split the notebook into lessons): {long}"


def test_no_module_loads_another_by_name_behind_the_import_graph():
    "Only the command line loads modules by name (its commands, on first use); nothing else hides an import."
    hidden = {p.name for p in (REPO / "mlwb").glob("*.py") if p.name not in ("cli.py", "_modidx.py")
              if re.search(r"import_module\(\s*[\"']mlwb|__import__\(\s*[\"']mlwb", p.read_text())}
    assert not hidden, f"modules that load mlwb modules by name: {sorted(hidden)}"


def test_the_package_imports_form_no_cycle():
    imports = {p.stem: set(re.findall(r"^\s*from \.(\w+) import", p.read_text(), flags=re.M))
               for p in (REPO / "mlwb").glob("*.py") if p.name != "_modidx.py"}
    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, (*seen, m)))
                   for m in imports.get(start, ()))
    cycles = sorted(m for m in imports if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"
