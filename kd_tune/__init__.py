"""kd_tune: distributed tuning of knowledge distillation for tiny wake-word models."""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["alpha_at", "combine_teachers", "distillation_loss", "temperature_at", "__version__"]

# Where the modules a Tune experiment pickles (tuner.pkl) lived before the layer folders: `sweep --resume` of an
# experiment started by an older kd_tune unpickles these names.
MOVED_MODULES = {f"kd_tune.{name}": f"kd_tune.tuning.{name}" for name in ("board", "console", "sweep", "trial")}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as its new module: one module object under both names, never a copy."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # importlib gave it the old name's spec: its own goes back


sys.meta_path.insert(0, _MovedModuleFinder())  # before an editable install's finder, which knows the old paths


def __getattr__(name: str):
    # Lazy: importing any kd_tune module imports this package, and kd_tune.config and kd_tune.deploy.detect load no
    # torch.
    if name in __all__:
        from kd_tune.training import distill

        return getattr(distill, name)
    raise AttributeError(f"module 'kd_tune' has no attribute {name!r}")
