"""Where a student checkpoint comes from: a checkpoint directory, or an experiment's best verified trial.

The ranking comes from the checkpoints' signed manifests; leaderboard.json, unsigned, only breaks ties and may not
point outside its experiment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyarrow.fs import FileType

from kd_tune.config import Config, validate
from kd_tune.errors import InputError, KdTuneError, shown
from kd_tune.evaluation.leaderboard import LEADERBOARD_NAME, experiment_storage
from kd_tune.metrics import METRICS, epoch_key
from kd_tune.space import TRIAL_PREFIX, trial_id_of
from kd_tune.store.checkpoint import MANIFEST_NAME, Checkpoint, CheckpointError, Identity, load_checkpoint, \
    verify_checkpoint
from kd_tune.store.storage import PathEscapeError, Storage, read_json
from kd_tune.training.resume import STUDENT_KIND

# Where a sweep's trial checkpoints live: <experiment>/trial_<id>_.../train/checkpoint_... (Tune, then Ray Train)
TRIAL_RUN_DIR, CHECKPOINT_PREFIX = "train", "checkpoint_"
EXPERIMENT_SECTIONS = ("data", "features", "tune")  # what every trial of one sweep shares; the space changes none

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Source:
    """A student checkpoint's place: a storage root, the checkpoint directory under it and, from a sweep, its trial."""
    store: Storage
    rel_dir: str
    experiment: str | None = None
    trial: str | None = None

    def load(self) -> Checkpoint:
        """The checkpoint, verified (file set, sizes, SHA-256, signature, kind) before any tensor is built."""
        return load_checkpoint(self.store, self.rel_dir, expect=Identity(STUDENT_KIND, self.trial))

    def describe(self) -> dict:
        return {"experiment": self.experiment, "trial": self.trial,
                "checkpoint": f"{self.store.uri.rstrip('/')}/{self.rel_dir}"}


def locate_source(source: str, config: Config) -> Source:
    """A checkpoint directory, or an experiment `PATH_OR_URI/NAME` (it has a leaderboard.json): its best checkpoint.

    Both may be local or s3://; config.storage supplies the S3 endpoint and region.
    """
    store, name = experiment_storage(source, config)
    if store.exists(f"{name}/{MANIFEST_NAME}"):
        return Source(store, name)
    if store.exists(f"{name}/{LEADERBOARD_NAME}"):
        return best_trial(store, name, experiment=source)
    raise KdTuneError(f"{source} is neither a checkpoint directory (it has no {MANIFEST_NAME}) nor an "
                      f"experiment (it has no {LEADERBOARD_NAME})")


def best_trial(store: Storage, name: str, *, experiment: str) -> Source:
    """The best of the experiment's verified trial checkpoints, ranked by the metric their signed manifests hold.

    leaderboard.json is unsigned, so it decides nothing: its rows must only lie inside the experiment directory (a
    path elsewhere is refused), and a top row that disagrees with the verified ranking is named in a warning.
    """
    leaderboard_paths = rows_inside(store, name, experiment)
    candidates = verified_trials(store, name, experiment)
    if not candidates:
        raise KdTuneError(f"{experiment}: no trial has a checkpoint that verifies (under trial_*/{TRIAL_RUN_DIR}/)")
    metric, mode = one_experiment(candidates, experiment)
    scored = [c for c in candidates if isinstance(c[2]["metrics"].get(metric), (int, float))]  # null: NaN
    if not scored:
        raise KdTuneError(f"{experiment}: no verified checkpoint reports {metric}; allowed: an experiment whose "
                          "trials finished an epoch")
    def key(candidate) -> tuple:  # the one rule, on what the signed manifest holds
        return epoch_key(candidate[2]["metrics"] | {"epoch": candidate[2].get("epoch")}, metric, mode)

    ranked = sorted(scored, key=lambda c: (key(c), c[0]))
    # Among exact equals the leaderboard's order may choose: it cannot promote a worse trial.
    named = [c for c in ranked if key(c) == key(ranked[0]) and leaderboard_paths
             and store.path(c[0]) == leaderboard_paths[0]]
    rel, trial, _ = (named or ranked)[0]
    if leaderboard_paths and leaderboard_paths[0] != store.path(rel):
        log.warning("%s: %s names %s best, but the verified checkpoints rank %s first by %s; exporting that one",
                    experiment, LEADERBOARD_NAME, leaderboard_paths[0], store.path(rel), metric)
    return Source(store, rel, experiment=experiment, trial=trial)


def rows_inside(store: Storage, name: str, experiment: str) -> list[str]:
    """The leaderboard's checkpoint paths, in its order; PathEscapeError for one outside the experiment."""
    rows = read_json(store, f"{name}/{LEADERBOARD_NAME}")
    if not isinstance(rows, list):
        raise InputError(f"{experiment}/{LEADERBOARD_NAME}: a JSON {type(rows).__name__}; allowed: the list of rows "
                         "`kd-tune sweep` writes")
    paths = [str(r["checkpoint"]).rstrip("/") for r in rows if isinstance(r, dict) and r.get("checkpoint")]
    for path in paths:
        if not path.startswith(f"{store.root}/{name}/"):  # a row is data: it must not reach another experiment
            raise PathEscapeError(f"{experiment}/{LEADERBOARD_NAME}: checkpoint {shown(path)} lies outside the "
                                  f"experiment directory {store.root}/{name}; allowed: the trials' own checkpoints "
                                  "(moved? pass the checkpoint directory)")
    return paths


def verified_trials(store: Storage, name: str, experiment: str) -> list[tuple[str, str, dict]]:
    """(path under the root, trial id, manifest) of every checkpoint under trial_<id>*/train/ that verifies as that
    trial's student; one that does not (half-written, damaged, another trial's) is skipped with a warning."""
    found = []
    for trial_dir in (d for d in store.listdir(name) if d.startswith(TRIAL_PREFIX)):
        trial = trial_id_of(trial_dir)
        parent = f"{name}/{trial_dir}/{TRIAL_RUN_DIR}"
        if store.filesystem.get_file_info(store.path(parent)).type != FileType.Directory:
            continue
        for checkpoint in (c for c in store.listdir(parent) if c.startswith(CHECKPOINT_PREFIX)):
            rel = f"{parent}/{checkpoint}"
            if store.filesystem.get_file_info(store.path(rel)).type != FileType.Directory:
                continue  # Ray's checkpoint_manager_snapshot.json sits beside the checkpoints
            try:
                found.append((rel, trial, verify_checkpoint(store, rel, expect=Identity(STUDENT_KIND, trial))))
            except CheckpointError as error:
                log.warning("%s: skipping a checkpoint that does not verify: %s", experiment, error)
    return found


def one_experiment(candidates: list[tuple[str, str, dict]], experiment: str) -> tuple[str, str]:
    """The ranking metric and its goal, once every checkpoint is shown to come from one sweep's settings."""
    first_rel, _, first = candidates[0]
    expected = validate(first["config"], source=f"{first_rel}'s manifest config").to_dict()
    for rel, _, manifest in candidates[1:]:
        found = validate(manifest["config"], source=f"{rel}'s manifest config").to_dict()
        differ = [section for section in EXPERIMENT_SECTIONS if found[section] != expected[section]]
        if differ:  # a trial copied in from another sweep, e.g. one trained for another wake word
            raise InputError(f"{experiment}: {rel} was trained with other {differ[0]} settings than {first_rel}; "
                             "allowed: the trials of one sweep (export another experiment's checkpoint by its path)")
    metric = expected["tune"]["metric"]
    goal = METRICS[metric].goal
    assert goal is not None  # tune.metric is one of RANKABLE, the metrics with a goal
    return metric, goal
