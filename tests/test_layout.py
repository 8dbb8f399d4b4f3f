"""The package's shape: folders are stages, imports only go downward, functions stay short."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dolly_ray"
# What each layer may import: the shared modules at the top of the package import only
# each other; a stage imports the shared modules, the stages below it and itself.
LAYERS = {
    "shared": {"shared"},
    "records": {"shared", "records"},
    "generate": {"shared", "generate"},
    "train": {"shared", "records", "generate", "train"},
    "serve": {"shared", "generate", "serve"},
    "batch": {"shared", "records", "generate", "batch"},
    "recipes": {"shared", "records", "generate", "train", "serve", "batch", "recipes"},
}
# Modules beside the stages that compose them rather than being shared by them.
RECIPES = {"dolly_ray.demo", "dolly_ray.testing"}
LONGEST_FUNCTION = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every package module ``path`` imports, at any depth (inside functions and
    ``TYPE_CHECKING`` blocks too: a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dolly_ray":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found - {"dolly_ray"}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def layer(module: str) -> str:
    if module in RECIPES:
        return "recipes"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "shared"


def test_every_stage_is_a_folder_and_nothing_is_left_beside_them():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS) - {"shared", "recipes"}
    loose = {name for name in modules() if layer(name) == "shared"} - {"dolly_ray"}
    assert loose == {f"dolly_ray.{name}" for name in ("cli", "cluster", "models", "prompts", "storage")}


def test_imports_only_go_downward():
    wrong = sorted(
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph().items()
        for target in targets
        if layer(target) not in LAYERS[layer(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else path + [target]
            if target not in state and (circle := visit(target, path + [target])):
                return circle
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            circle = visit(module, [module])
            assert circle is None, " -> ".join(circle)


def test_the_check_finds_a_circle(tmp_path):
    """The circle check itself: two modules that import each other are found."""
    (tmp_path / "a.py").write_text("from dolly_ray.b import thing\n")
    (tmp_path / "b.py").write_text("def f():\n    from dolly_ray import a\n")
    known = {"dolly_ray.a", "dolly_ray.b"}
    assert imports(tmp_path / "a.py", known) == {"dolly_ray.b"}
    assert imports(tmp_path / "b.py", known) == {"dolly_ray.a"}


def test_no_function_is_longer_than_the_house_rule():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)
