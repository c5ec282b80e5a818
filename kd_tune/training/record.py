"""`kd-tune train`: one distillation run in this process, recorded per epoch as TensorBoard scalars (tags from
kd_tune.metrics.METRICS) and verified checkpoints on the configured storage, with retention."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pyarrow.fs import FileType
from tensorboardX import SummaryWriter

from kd_tune.config import Config, dump_config
from kd_tune.datasets.data import load_data
from kd_tune.errors import InputError, KdTuneError, shown
from kd_tune.metrics import METRICS
from kd_tune.store.checkpoint import Identity, copy_checkpoint, latest_checkpoint, load_checkpoint, prune_checkpoints
from kd_tune.store.storage import Storage, check_layout, read_text, upload_tree, write_text
from kd_tune.training.teachers import require_current_teachers, teacher_store
from kd_tune.training.resume import STUDENT_KIND
from kd_tune.training.train import Report, fit

CONFIG_NAME = "config.yaml"
RUN_ENTRIES = {CONFIG_NAME, "checkpoints", "tensorboard"}  # all that run_training writes in its folder


class RunExistsError(InputError):
    """`--name` names a folder that holds another run's config or files `kd-tune train` did not write."""


class RunRecorder:
    """Per epoch: TensorBoard scalars, a verified copy of the checkpoint on storage, and retention."""

    def __init__(self, store: Storage, run: str, config: Config, *, echo: Report | None = None):
        self.store, self.run, self.config, self.echo = store, run, config, echo
        self.local = Path(store.local_path(run)) if store.is_local else Path(tempfile.mkdtemp(prefix="kd_tune_tb_"))
        self.writer = SummaryWriter(str(self.local / "tensorboard"))

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key in METRICS:
                self.writer.add_scalar(METRICS[key].tag, value, epoch)
        self.writer.flush()
        if not self.store.is_local:
            upload_tree(self.local / "tensorboard", self.store, f"{self.run}/tensorboard")
        if checkpoint is not None:
            copy_checkpoint(checkpoint, self.store, f"{self.run}/checkpoints/epoch_{epoch:04d}")
            prune_checkpoints(self.store, f"{self.run}/checkpoints", metric=self.config.tune.metric,
                              mode=self.config.tune.mode, keep_best=self.config.storage.keep_best)
        if self.echo:
            self.echo(metrics, checkpoint)

    def close(self) -> None:
        self.writer.close()


def run_training(config: Config, *, name: str, resume: bool = False, overwrite: bool = False,
                 echo: Report | None = None) -> str:
    """`kd-tune train`: one distillation run written to <storage.root>/<name>; returns its location.

    An existing run of another config is refused unless resumed or overwritten (its checkpoints and TensorBoard
    events then go); a folder `kd-tune train` did not write is never used. Teachers are checked against the data
    before the first epoch.
    """
    store = Storage.from_config(config.storage)
    check_layout(store, teacher_store(config), run=name)
    stale = claim_run(store, name, config, resume=resume, overwrite=overwrite)
    latest = latest_checkpoint(store, f"{name}/checkpoints") if resume else None
    if resume and latest is None:
        raise KdTuneError(f"--resume: no checkpoint under {store.uri}/{name}/checkpoints")
    data = load_data(config.data)
    require_current_teachers(config, data)
    for rel in stale:  # only once nothing can refuse the run any more
        store.delete_dir(rel)
    write_text(store, f"{name}/{CONFIG_NAME}", dump_config(config))
    recorder = RunRecorder(store, name, config, echo=echo)
    try:
        start = load_checkpoint(store, latest, expect=Identity(STUDENT_KIND, name)) if latest else None
        fit(config, recorder, data=data, resume=start, run_name=name)
    finally:
        recorder.close()
    return f"{store.uri}/{name}"


def claim_run(store: Storage, name: str, config: Config, *, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to write run `name` over what another command wrote, or over another config's run unless told to;
    returns what --overwrite is to delete: the run's checkpoints and TensorBoard events, all this command writes."""
    if not store.exists(name):
        return []
    if store.filesystem.get_file_info(store.path(name)).type != FileType.Directory:
        raise RunExistsError(f"--name {name}: {store.uri.rstrip('/')}/{name} is a file; allowed: a new --name")
    found = store.listdir(name)
    foreign = [entry for entry in found if entry not in RUN_ENTRIES and not entry.startswith(".")]
    where = f"{store.uri.rstrip('/')}/{name}"
    if foreign:  # a sweep, a teacher, the cache: never written into, whatever the flags
        raise RunExistsError(f"--name {name}: {where} holds {shown(foreign[0])}, which `kd-tune train` does not "
                             "write; allowed: a new --name, or the name of a `kd-tune train` run")
    same = CONFIG_NAME in found and read_text(store, f"{name}/{CONFIG_NAME}") == dump_config(config)
    if CONFIG_NAME in found and not (same or resume or overwrite):
        raise RunExistsError(f"--name {name}: {where} is a run of another config; allowed: --resume to continue it, "
                             "--overwrite to start it over with this config, or a new --name")
    return [f"{name}/{entry}" for entry in ("checkpoints", "tensorboard") if overwrite and entry in found]
