"""The architecture rules of docs/ARCHITECTURE.md, checked on the source so that the document stays true."""
import ast
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

REMOTE_CODE_FOLDERS = ("modeling_lavit", "processing")
STAGE_SCRIPTS = ("stage1_tokenizer", "stage2_pretrain", "finetune", "stage3_detokenizer", "pretokenize")
MAX_FUNCTION_LINES = 60


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO_ROOT / folder).glob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in `path`: level 1 for `from .x import`, 0 for absolute imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found.extend((0, alias.name) for alias in node.names)
    return found


def test_remote_code_folders_import_only_their_siblings_of_the_project():
    """Every module a Hub folder may hold; the packages' `__init__.py` (the installed lazy namespaces, which import
    `lavit.registration`) is never copied into one: `saving_lavit.code_files` follows module imports only."""
    for path in python_files(*REMOTE_CODE_FOLDERS):
        if path.name == "__init__.py":
            continue
        for level, module in imported_modules(path):
            assert level <= 1, f"{path.name} imports from a parent package ({module})"
            assert module.split(".")[0] not in ("lavit", "training", "hub_cards"), f"{path.name} imports {module}"


def test_no_model_file_imports_the_converter():
    """The converter sits on top of the model classes (it imports them), so Hub folders never ship it."""
    for path in python_files("modeling_lavit"):
        if path.name != "convert_original_lavit.py":
            assert (1, "convert_original_lavit") not in imported_modules(path), path.name


def test_training_scripts_never_import_scripts():
    for path in python_files("training"):
        for level, module in imported_modules(path):
            assert not (level == 1 and module in STAGE_SCRIPTS), f"{path.name} imports the script {module}"


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in python_files(*REMOTE_CODE_FOLDERS, "training"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of `path`, and `Class.method` for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
    return names


def test_every_step_of_the_design_document_names_a_file_and_a_symbol_that_exist():
    document = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    references = re.findall(r"`([\w/]+\.py)` +\| +`([\w.]+)`", document)
    assert len(references) >= 20, "the data-path tables should name each step's file and symbol"
    for file, symbol in references:
        path = REPO_ROOT / file
        assert path.is_file(), f"docs/ARCHITECTURE.md names {file}, which does not exist"
        assert symbol in defined_names(path), f"docs/ARCHITECTURE.md names {symbol} in {file}, which has no such name"


@pytest.mark.parametrize("folder", REMOTE_CODE_FOLDERS + ("training",))
def test_every_file_of_the_package_folders_is_in_the_design_document(folder):
    document = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for path in python_files(folder):
        if path.name != "__init__.py":
            assert f"{folder}/{path.name}" in document, f"docs/ARCHITECTURE.md does not place {folder}/{path.name}"


# the installed package's folders (pyproject's package-dir): tests/<sub-package>/ mirrors each
PACKAGE_FOLDERS = {"lavit": (), "modeling_lavit": ("modeling",), "processing": ("processing",),
                   "training": ("training",), "hub_cards": ("hub_cards",)}


def own_test_file(module: Path) -> Path:
    """Where the tests of source `module` live: `lavit.<folder>.<module>` -> tests/<folder>/test_<module>.py. The
    `evaluate` metric modules (`metrics/<name>/<name>.py`, loaded by path) have tests/evaluation/metrics/test_<name>.py.
    """
    top, *folders = module.relative_to(REPO_ROOT).parent.parts
    if folders[-2:] == ["metrics", module.stem]:
        folders = folders[:-1]
    return REPO_ROOT.joinpath("tests", *PACKAGE_FOLDERS[top], *folders, f"test_{module.stem}.py")


def source_modules() -> list[Path]:
    """Every module of the package: not `__init__.py` / `__main__.py`, not `processing/saving_lavit.py` (a link to
    the one in `modeling_lavit/`, so that both remote-code folders hold it)."""
    return sorted(path for top in PACKAGE_FOLDERS for path in (REPO_ROOT / top).rglob("*.py")
                  if path.name not in ("__init__.py", "__main__.py") and not path.is_symlink())


@pytest.mark.parametrize("module", source_modules(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_module_has_a_test_file_of_its_own_that_tests_it(module):
    """Whoever changes a module knows which tests are its own: its test file exists, defines tests, and reaches the
    module (imports it or a name it defines; a metric module, loaded by path, is named as a string)."""
    test_file = own_test_file(module)
    wanted = test_file.relative_to(REPO_ROOT)
    assert test_file.is_file(), f"{module.relative_to(REPO_ROOT)} has no test file of its own: add {wanted}"
    tree = ast.parse(test_file.read_text())
    tests = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             and node.name.startswith("test_")]
    assert tests, f"{test_file.relative_to(REPO_ROOT)} defines no test"
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    reached = (any(name.split(".")[-1] == module.stem for name in modules | imported)
               or imported & defined_names(module) or f'"{module.stem}"' in test_file.read_text())
    assert reached, f"{test_file.relative_to(REPO_ROOT)} imports neither {module.stem} nor any name it defines"


def test_dtype_names_are_read_by_one_function():
    """A dtype name a user gives ("bfloat16", "float17") is read by `validation_lavit.floating_dtype` alone: a bare
    `getattr(torch, name)` turns a typo into torch's AttributeError and accepts integer dtypes."""
    for path in python_files("modeling_lavit", "processing", "training", "hub_cards", "lavit", "lavit/cli",
                             "lavit/evaluation", "lavit/serving"):
        if path.name != "validation_lavit.py":
            assert "getattr(torch, " not in path.read_text(), f"{path.relative_to(REPO_ROOT)} reads a dtype name itself"


@pytest.mark.parametrize("stage", [name for name in STAGE_SCRIPTS if name != "pretokenize"])
def test_every_training_stage_reads_its_data_and_counts_through_stage_records(stage):
    """The bad records of a run are counted in one place: a stage takes its records and counters from
    `training.evaluation.stage_records` rather than loading `--data` or making counters itself. (`pretokenize` reads
    its data whole, never streamed, and counts the images its tokenizer could not read.)"""
    source = (REPO_ROOT / "training" / f"{stage}.py").read_text()
    assert "stage_records(" in source
    for own_reading in ("load_records(", "training_records(", "split_eval_records(", "BadRecordCounter()"):
        assert own_reading not in source, f"training/{stage}.py calls {own_reading} itself"


@pytest.mark.parametrize("stage", STAGE_SCRIPTS)
def test_every_training_stage_runs_its_datasets_transforms_in_temporary_files(stage):
    """No stage writes `datasets` cache files into a user's data folder or reuses a stale one: the function of each
    stage script that reads its data (from the command line or called from Python) runs inside
    `training.data.transforms_in_temporary_files` (tests/training/test_pretokenize.py shows what it prevents)."""
    tree = ast.parse((REPO_ROOT / "training" / f"{stage}.py").read_text())
    readers = [node for node in tree.body if isinstance(node, ast.FunctionDef) and any(
        isinstance(call, ast.Call) and getattr(call.func, "id", "") in ("stage_records", "load_records")
        for call in ast.walk(node))]
    assert readers, f"training/{stage}.py reads no data"
    for function in readers:
        assert any(isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") ==
                   "transforms_in_temporary_files" for decorator in function.decorator_list), \
            f"training/{stage}.py: {function.name} reads data outside transforms_in_temporary_files"
