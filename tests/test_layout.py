"""The package's shape: one module per stage, layered without cycles, Ray only in the Ray layer, light imports."""

import ast
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from kd_tune.config import STUDENT_NAMES, TEACHER_ARCHS, Config
from kd_tune.metrics import METRICS
from kd_tune.space import TARGETS, SearchSpace

PACKAGE = Path(__file__).resolve().parent.parent / "kd_tune"
# Every module by its dotted name under kd_tune ("config", "tuning.sweep"); folders' __init__ files are not modules
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))
           if p.stem != "__main__" and (p.stem != "__init__" or p.parent == PACKAGE)}
LAYERS = {p.parent.name: p for p in sorted(PACKAGE.glob("*/__init__.py"))}
ENTRY_POINTS = {"cli", "demo"}
FOUNDATION = {name for name in MODULES if "." not in name} - ENTRY_POINTS - {"__init__"}
RAY_LAYER = "tuning"
# Ray's modules without a public API: only kd_tune.tuning.ray_compat, which checks the Ray version, may use them
PRIVATE_RAY = ("ray._private", "ray._raylet", "ray.experimental.internal_kv", "ray.core.generated",
               "ray.train.v2._internal", "ray.tune.execution")
MAX_LINES = 450


def layer(name: str) -> str | None:
    """The folder a module lives in; None for the package's top (the foundation and the entry points)."""
    return name.split(".")[0] if "." in name else None


def may_import(folder: str) -> set[str]:
    """The folders a layer's __init__.py allows it to import (its MAY_IMPORT), read without importing it."""
    for node in ast.parse(LAYERS[folder].read_text()).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["MAY_IMPORT"]:
            return set(ast.literal_eval(node.value))
    pytest.fail(f"kd_tune/{folder}/__init__.py does not state MAY_IMPORT")


def kd_tune_imports(path: Path) -> set[str]:
    """Every kd_tune module `path` imports, by dotted name, at any depth of the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kd_tune":
            base = node.module.removeprefix("kd_tune").lstrip(".")
            for alias in node.names:  # `from kd_tune.tuning import sweep` names a module; `... import X` a member
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("kd_tune.") for a in node.names if a.name.startswith("kd_tune.")}
    return found - {"", ".".join(path.relative_to(PACKAGE).with_suffix("").parts)}


def third_party_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
    return roots


def test_no_import_cycle_among_modules():
    # Rule: the modules form layers: no cycle, counting imports inside functions.
    graph = {name: kd_tune_imports(path) for name, path in MODULES.items()}
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_each_layer_imports_only_the_foundation_itself_and_what_its_init_allows():
    # Rule: a module in a folder imports the foundation, its own folder and its MAY_IMPORT folders; the foundation
    # imports only the foundation; only the entry points (cli, demo) import anything.
    for name, path in MODULES.items():
        if name in ENTRY_POINTS or name == "__init__":
            continue
        allowed = FOUNDATION | {m for m in MODULES if layer(m) == layer(name)
                                or layer(name) and layer(m) in may_import(layer(name))}
        wrong = kd_tune_imports(path) - allowed - {"__init__"}
        assert not wrong, f"kd_tune/{path.relative_to(PACKAGE)} imports {sorted(wrong)}, outside its layers"


def test_the_layers_form_an_order():
    # Rule: MAY_IMPORT names only existing folders, and nothing circular: every folder's allowed folders come before
    # it when the folders are sorted by how many they may import.
    ordered = sorted(LAYERS, key=lambda folder: len(may_import(folder)))
    for i, folder in enumerate(ordered):
        assert may_import(folder) <= set(ordered[:i]), f"{folder} may import {sorted(may_import(folder))}"


def test_old_module_names_load_the_moved_modules_and_a_flat_layout_experiment():
    # Rule: `sweep --resume` of an experiment from the flat layout (kd_tune 0.1.0) unpickles its tuner.pkl (a real
    # one, from a `make demo` sweep), whose objects name kd_tune.trial, .board, .console and .sweep.
    import ray.cloudpickle

    import kd_tune.trial
    from kd_tune.tuning import trial

    assert kd_tune.trial is trial
    state = ray.cloudpickle.loads((Path(__file__).parent / "fixtures" / "tuner_flat_layout.pkl").read_bytes())
    modules = {type(c).__module__ for c in state["_run_config"].callbacks}
    assert {"kd_tune.tuning.board", "kd_tune.tuning.sweep"} <= modules, modules


# Modules that may import kd_tune inside functions, and why
DEFERRING = {"cli": "`detect` and `config` stay light", "__init__": "the package's public names load on first use",
             "tuning.trial": "a trial's Tune actor and Train controller import it and never train"}


def test_only_a_few_modules_import_inside_functions():
    # Rule: kd_tune modules import each other at the top (or under `if TYPE_CHECKING:`, for the type checker only);
    # only DEFERRING's modules defer, each for its reason.
    for name, path in MODULES.items():
        if name in DEFERRING:
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in tree.body:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                top |= {id(child) for child in node.body}
        nested = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in top
                  and (node.module or "").startswith("kd_tune")]
        assert not nested, f"kd_tune/{name}.py imports kd_tune inside a function at lines {nested}"


def test_ray_is_imported_only_in_the_ray_layer():
    # Rule: `import ray` appears only in the Ray layer; everything below it runs without Ray.
    users = {name for name, path in MODULES.items() if "ray" in third_party_roots(path)}
    outside = {name for name in users if layer(name) != RAY_LAYER}
    assert not outside, f"{sorted(outside)} import ray outside kd_tune/{RAY_LAYER}/"


def dotted(node: ast.expr) -> str | None:
    """`a.b.c` for an attribute chain on a name; None for anything else (a call's result, a subscript)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def is_private_ray(name: str | None) -> bool:
    """Whether a dotted name is in Ray but outside its public API: a `_` part (not a dunder) or a PRIVATE_RAY one."""
    parts = (name or "").split(".")
    return parts[0] == "ray" and (any(p.startswith("_") and not p.endswith("__") for p in parts[1:])
                                  or any(name == p or name.startswith(p + ".") for p in PRIVATE_RAY))


def private_ray_uses(path: Path) -> list[str]:
    """`line: name` for each private Ray module `path` imports or reaches as an attribute (`ray._raylet.X`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if is_private_ray(node.module) else [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and not is_private_ray(dotted(node.value)):
            names = [dotted(node)]  # where a chain turns private: `ray._raylet` of `ray._raylet.X.Y`, once
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if is_private_ray(name)]
    return found


def test_only_ray_compat_uses_rays_private_modules():
    # Rule: no kd_tune module but ray_compat imports or reaches into Ray's private modules (ray._private, ray._raylet,
    # internal_kv, generated protobufs, Train V2's _internal, Tune's execution): a Ray upgrade is checked in one file.
    users = {name: uses for name, path in MODULES.items()
             if name != "tuning.ray_compat" and (uses := private_ray_uses(path))}
    assert not users, f"private Ray used outside kd_tune/tuning/ray_compat.py (move it there): {users}"
    assert private_ray_uses(MODULES["tuning.ray_compat"]), "the scan finds nothing even in ray_compat: it is broken"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_size_limit(name):
    # Rule: a module holds one stage; none grows past ~450 lines.
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"kd_tune/{MODULES[name].relative_to(PACKAGE)} has {lines} lines (limit {MAX_LINES})"


@pytest.mark.parametrize("code", [
    "from kd_tune.config import load_config; load_config(None, check_paths=False)",
    "import kd_tune.deploy.detect",
    "from kd_tune import cli; cli.parser()",
])
def test_light_paths_load_no_torch_and_no_ray(code):
    # Rule: loading a config, the detector and the CLI's parser import neither torch nor Ray.
    probe = f"import sys; {code}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_every_search_space_key_maps_to_a_config_field():
    # Rule: each key a search space may hold lands in exactly one existing config field.
    assert set(TARGETS) == set(SearchSpace.model_fields)
    for name, (section, key, _) in TARGETS.items():
        section_model = typing.get_args(Config.model_fields[section].annotation) or (
            Config.model_fields[section].annotation,)
        assert key in section_model[0].model_fields, f"{name} -> {section}.{key} is not a config field"


def test_config_names_match_the_registries():
    # Rule: the names a config accepts are exactly the registered students and teachers (config stays torch-free).
    from kd_tune.training.models import STUDENTS, TEACHERS

    assert set(STUDENT_NAMES) == set(STUDENTS) and set(TEACHER_ARCHS) == set(TEACHERS)


def test_metrics_table_is_complete():
    # Rule: every metric has a TensorBoard tag in a known group, and a rankable metric says its direction.
    for name, metric in METRICS.items():
        assert metric.tag.split("/")[0] in ("eval", "loss", "schedule", "system"), name
        assert metric.goal in (None, "min", "max"), name


def test_readme_pipeline_table_lists_every_module_in_layer_order():
    # Rule: the README's pipeline table names every module once, each importing only modules above it in the table.
    readme = (PACKAGE.parent / "README.md").read_text()
    table = [f.replace("/", ".") for f in re.findall(r"^\| [^|]+ \| `kd_tune/([\w/]+)\.py` \|", readme, flags=re.M)]
    assert sorted(table) == sorted(set(MODULES) - {"__init__"}), "README pipeline table vs kd_tune/**/*.py"
    for i, name in enumerate(table):
        below = kd_tune_imports(MODULES[name]) - {"__init__"}
        assert below <= set(table[:i]), f"kd_tune/{name}.py imports {sorted(below - set(table[:i]))} from below it"
