"""The house rules, checked: no import circle (lazy imports inside functions included), no module over 600
lines, infra/ builds on nothing outside itself, the core files stay short enough to read in one sitting."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "config", "dataprep", "training", "extensions", "evaluation", "experiments", "scripts",
            "bench")
CORE = ("layers", "encoder", "demasker", "latent_dit", "schedules", "corruption", "mdm", "generators",
        "train_ae", "train_prior", "sample")


def modules():
    """{dotted module name: path} of the project's own modules (the root files and the packages)."""
    found = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path, known):
    """The project modules that `path` imports anywhere in its body (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def test_no_import_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state, circles = {}, []

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                circles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, f"import circles: {circles}"


def test_infra_imports_nothing_outside_infra():
    known = modules()
    for name, path in known.items():
        if name.startswith("infra"):
            outside = {m for m in imports(path, known) if not m.startswith("infra")}
            assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}: infra/ is the lowest layer"


def test_no_module_over_600_lines_and_short_core_files():
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= 600, f"{path.relative_to(ROOT)} has {lines} lines: split it by concept"
        if name in CORE:
            assert lines <= 400, f"{name}.py has {lines} lines: the reading path reads in one sitting"


def test_code_and_docs_speak_to_a_reader_of_the_repository():
    """Cite the paper, a docs page or a test: no issue numbers, no paths outside the repository."""
    import re
    pattern = re.compile(r"\bissues? \d|\.\./shared/|\bBRIEF\b")
    folders = [ROOT, ROOT / "docs", ROOT / "tests", *(ROOT / name for name in PACKAGES)]
    files = [p for folder in folders for p in folder.rglob("*") if p.suffix in (".py", ".md", ".sh")
             and p.is_file() and (folder != ROOT or p.parent == ROOT)]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line) and p.name != "test_house.py"]
    assert not found, f"references a reader of the repository cannot follow: {found[:10]}"
