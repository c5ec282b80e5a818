"""tuning.ray_compat against the installed Ray: its private names exist, its copy is current, its version is Ray's.

The module's lists are read from its source, not imported: the tests still run, and name what is missing, when an
upgraded Ray fails the module's own import.
"""

import ast
import hashlib
import importlib
import inspect
import tomllib
from pathlib import Path

import pytest
import ray
from test_layout import dotted, is_private_ray

from kd_tune.errors import KdTuneError

REPO = Path(__file__).resolve().parents[2]
COMPAT = REPO / "kd_tune" / "tuning" / "ray_compat.py"
TREE = ast.parse(COMPAT.read_text())
RECHECK = "re-check kd_tune/tuning/ray_compat.py against it"


def declared(tree: ast.Module) -> dict:
    """The module's top-level constants whose value is a literal (SUPPORTED_RAY_VERSION, PRIVATE_NAMES, ...)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # not a literal, e.g. a value read from Ray
                continue
    return found


DECLARED = declared(TREE)


def resolve(name: str):
    """The object a dotted name names: its longest importable module, then attributes (AttributeError names the
    first one missing)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            found = getattr(found, attr)
        return found
    raise ImportError(f"no module of {name} imports")


def test_the_installed_ray_is_the_supported_one():
    # Rule: the Ray installed is the one ray_compat was checked against, and the one pyproject.toml pins; an upgrade
    # fails here until ray_compat is re-checked and SUPPORTED_RAY_VERSION moved with the pin.
    supported = DECLARED["SUPPORTED_RAY_VERSION"]
    assert ray.__version__ == supported, f"Ray {ray.__version__} is installed, not {supported}: {RECHECK}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.replace(" ", "").startswith("ray[")]
    assert pins and all(d.endswith(f"=={supported}") for d in pins), f"pyproject's Ray pin {pins} vs {supported}"


@pytest.mark.parametrize("name", DECLARED["PRIVATE_NAMES"])
def test_every_private_name_kd_tune_relies_on_exists(name):
    # Rule: each private Ray name kd_tune uses (ray_compat.PRIVATE_NAMES) exists in the installed Ray: a Ray that
    # renamed or dropped one fails here, by name, not mid-sweep.
    try:
        resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{name} is not in Ray {ray.__version__} ({e}); kd_tune relies on it: {RECHECK}")


@pytest.mark.parametrize("owner", sorted(DECLARED["PRIVATE_INSTANCE_ATTRIBUTES"]))
def test_every_private_attribute_of_tunes_loggers_exists(owner):
    # Rule: the instance attributes that kd_tune's subclasses of Tune's loggers read (the logger's own state) are
    # still set by the installed Ray's logger.
    instance = resolve(owner)()
    missing = [a for a in DECLARED["PRIVATE_INSTANCE_ATTRIBUTES"][owner] if not hasattr(instance, a)]
    assert not missing, f"{owner} of Ray {ray.__version__} no longer sets {missing}: {RECHECK}"


def test_private_names_lists_every_private_name_ray_compat_uses():
    # Rule: PRIVATE_NAMES is complete: every private Ray name that ray_compat imports or reaches (ray._raylet.X) is
    # listed, or is the start of a listed one, so the test above checks it.
    used = set()
    for node in ast.walk(TREE):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            used |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            used |= {a.name for a in node.names}
        elif isinstance(node, ast.Attribute):
            used.add(dotted(node))
    listed = DECLARED["PRIVATE_NAMES"]
    unlisted = sorted(n for n in used if is_private_ray(n) and not any(x == n or x.startswith(n + ".") for x in listed))
    assert not unlisted, f"kd_tune/tuning/ray_compat.py uses {unlisted}, not in its PRIVATE_NAMES"


def test_the_copied_method_is_still_rays():
    # Rule: run_train_controller copies one Ray method (COPIED_METHOD); when the installed Ray's source of it differs
    # from the one copied (COPIED_METHOD_SHA256), the copy must be re-checked before kd_tune runs on that Ray.
    name = DECLARED["COPIED_METHOD"]
    digest = hashlib.sha256(inspect.getsource(resolve(name)).encode()).hexdigest()
    assert digest == DECLARED["COPIED_METHOD_SHA256"], (
        f"Ray {ray.__version__} changed {name}: re-check its copy, tuning.ray_compat.run_train_controller, against "
        f"it, then set COPIED_METHOD_SHA256 = {digest!r}")


def test_another_ray_version_is_refused_at_import_with_one_line(monkeypatch):
    # Rule: importing ray_compat under any Ray but the supported one raises a kd_tune error whose one line names the
    # installed and the supported version and how to install the supported one.
    from kd_tune.tuning import ray_compat

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    try:
        with pytest.raises(KdTuneError) as refused:
            importlib.reload(ray_compat)
    finally:
        monkeypatch.undo()
        importlib.reload(ray_compat)  # the module as the supported Ray imports it, for every later test
    message = str(refused.value)
    assert isinstance(refused.value, ImportError) and "\n" not in message
    assert "Ray 2.61.0 is installed" in message and "supports Ray 2.60.0 only" in message
    assert "pip install 'ray[default,tune,train]==2.60.0'" in message
