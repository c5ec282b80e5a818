"""`kd-tune train`: one distillation run in this process, recorded per epoch as TensorBoard scalars (tags from
kd_tune.metrics.METRICS) and verified checkpoints on the configured storage, with retention."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tensorboardX import SummaryWriter

from kd_tune.checkpoint import Identity, copy_checkpoint, latest_checkpoint, load_checkpoint, prune_checkpoints
from kd_tune.config import Config, dump_config
from kd_tune.errors import KdTuneError
from kd_tune.metrics import METRICS
from kd_tune.storage import Storage, upload_tree, write_text
from kd_tune.train import STUDENT_KIND, Report, fit


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


def run_training(config: Config, *, name: str, resume: bool = False, echo: Report | None = None) -> str:
    """`kd-tune train`: one distillation run written to <storage.root>/<name>; returns its location."""
    store = Storage.from_config(config.storage)
    latest = latest_checkpoint(store, f"{name}/checkpoints") if resume else None
    if resume and latest is None:
        raise KdTuneError(f"--resume: no checkpoint under {store.uri}/{name}/checkpoints")
    write_text(store, f"{name}/config.yaml", dump_config(config))
    recorder = RunRecorder(store, name, config, echo=echo)
    try:
        resume = load_checkpoint(store, latest, expect=Identity(STUDENT_KIND, name)) if latest else None
        fit(config, recorder, resume=resume, run_name=name)
    finally:
        recorder.close()
    return f"{store.uri}/{name}"
