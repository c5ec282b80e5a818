"""The teacher-output cache: same losses as live teachers, keyed, verified, resumable, built the same on Ray."""

import dataclasses
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from kd_tune.audio.features import front_end, render_view
from kd_tune.config import validate
from kd_tune.datasets.data import STRADDLE_KIND, UNLABELLED, Split, load_dataset
from kd_tune.store.checkpoint import MANIFEST_NAME, CheckpointError, load_checkpoint
from kd_tune.training import cache
from kd_tune.training.teachers import StaleTeacherError, load_teacher
from kd_tune.training.train import fit, fit_teacher

LOSSES = ("student_loss", "distillation_loss", "total_loss")


def make_config(data_root, storage_root, **sections):
    raw = {"data": {"root": str(data_root)},
           "teachers": [{"name": "cnn", "arch": "cnn", "source": "tiny", "epochs": 1},
                        {"name": "w2v", "arch": "wav2vec2", "source": "tiny", "epochs": 1}],
           # views exist only with augmentation on, and are cached only for a teacher that hears them
           "distillation": {"teachers": ["cnn"], "teacher_hears": "augmented"},
           "augment": {"enabled": True, "views": 2},
           "training": {"epochs": 1, "batch_size": 32, "device": "cpu"},
           "storage": {"root": str(storage_root)}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate(raw)


@pytest.fixture(scope="module")
def data(small_dataset):
    return load_dataset(small_dataset)


@pytest.fixture(scope="module")
def teachers_root(small_dataset, data, tmp_path_factory):
    """A storage root holding both tiny teachers, fine-tuned once for the module."""
    root = tmp_path_factory.mktemp("teachers")
    config = make_config(small_dataset, root)
    for teacher in config.teachers:
        fit_teacher(config, teacher, data=data)
    return root


@pytest.fixture
def config(small_dataset, teachers_root, tmp_path):
    """A fresh storage root (the teachers copied in, no cache yet) for one test."""
    shutil.copytree(teachers_root / "teachers", tmp_path / "runs" / "teachers")
    return make_config(small_dataset, tmp_path / "runs")


@pytest.fixture
def count_builds(monkeypatch):
    """The (teacher, shard) of every shard built in this process."""
    built, lock, build = [], threading.Lock(), cache.build_shard

    def counting(config, teacher_name, shard, key, **kwargs):
        with lock:
            built.append((teacher_name, shard))
        return build(config, teacher_name, shard, key, **kwargs)

    monkeypatch.setattr(cache, "build_shard", counting)
    return built


def fit_losses(config, data) -> list[dict]:
    reports = []
    fit(config, lambda metrics, _checkpoint: reports.append({k: metrics[k] for k in LOSSES}), data=data)
    return reports


def shard_path(config, name, shard, data) -> Path:
    key = cache.cache_key(config, config.teacher(name), data)
    return Path(config.storage.root) / cache.cache_dir(name, key) / shard


def test_cache_and_live_teachers_give_the_same_losses(config, data):
    # Rule: with the same config and data, distilling from the cache gives the losses of the live teachers (two
    # teachers of both input kinds, combined, over two epochs so two views), to float rounding.
    both = {"distillation": {"teachers": ["cnn", "w2v"], "combine": "confidence"}, "training": {"epochs": 2}}
    live = fit_losses(make_config(data.root, config.storage.root, **both), data)
    both["distillation"]["teacher_mode"] = "cache"
    cached = fit_losses(make_config(data.root, config.storage.root, **both), data)  # builds the cache on first use
    assert len(live) == len(cached) == 2
    for live_epoch, cached_epoch in zip(live, cached, strict=True):
        for name in LOSSES:
            assert cached_epoch[name] == pytest.approx(live_epoch[name], abs=1e-6), name


def test_a_teacher_that_hears_clean_clips_is_cached_once_and_distils_as_live(config, data, count_builds):
    # Rule: with distillation.teacher_hears clean, the live teacher labels each clip from its clean audio while the
    # student hears the augmented view; the cache then holds the clean shard alone, under a key that does not
    # change with the augmentation or seed it does not depend on, and gives the live teacher's losses.
    clean = {"distillation": {"teacher_hears": "clean"}, "training": {"epochs": 2}}
    live = fit_losses(make_config(data.root, config.storage.root, **clean), data)
    heard = fit_losses(make_config(data.root, config.storage.root, training={"epochs": 2}), data)
    assert all(h["distillation_loss"] != c["distillation_loss"] for h, c in zip(heard, live, strict=True))
    clean["distillation"]["teacher_mode"] = "cache"
    cached = fit_losses(make_config(data.root, config.storage.root, **clean), data)
    assert count_builds == [("cnn", cache.CLEAN)]
    for live_epoch, cached_epoch in zip(live, cached, strict=True):
        for name in LOSSES:
            assert cached_epoch[name] == pytest.approx(live_epoch[name], abs=1e-6), name
    teacher = config.teacher("cnn")
    keyed = make_config(data.root, config.storage.root, **clean)
    other = make_config(data.root, config.storage.root, **clean | {"augment": {"gain_db": 3.0},
                                                                   "training": {"epochs": 2, "seed": 1}})
    assert cache.cache_key(other, teacher, data) == cache.cache_key(keyed, teacher, data)


def test_cached_logits_are_the_teacher_on_the_rendered_view(config, data):
    # Rule: shard view_v holds the teacher's logits for exactly render_view(train audio, view=v, seed) and the clean
    # shard those of the clean clips; looking them up by index gives the same rows.
    cache.build_cache(config, ["cnn"], data=data)
    teachers = cache.CachedTeachers.load(config, data)
    log_mel, augment, _ = front_end(config, data.train.of_kind("background"), torch.device("cpu"))
    teacher = load_teacher(config, config.teacher("cnn"))
    index = torch.tensor([3, 0, 7])
    for view in (None, 0, 1):
        audio = data.train.audio if view is None else render_view(data.train.audio, augment, view=view, seed=0)
        expected = cache.teacher_logits(teacher, audio[index], log_mel, batch_size=32, device=torch.device("cpu"))
        assert torch.allclose(teachers({"waveform": audio[index]}, view=view, index=index), expected, atol=1e-6)


def test_straddle_windows_are_cached_under_their_own_key_and_distilled_on(config, data):
    # Rule: the straddle windows change the cache key (the set without them keeps its own) and get cache rows of the
    # teacher's logits like any clip; distilling from them alone at alpha = 1 trains on the KD term only.
    straddled = load_dataset(data.root, straddles_per_positive=2)
    teacher = config.teacher("cnn")
    assert cache.cache_key(config, teacher, straddled) != cache.cache_key(config, teacher, data)
    cache.build_cache(config, ["cnn"], data=straddled)
    teachers = cache.CachedTeachers.load(config, straddled)
    assert teachers.logits.shape[2] == len(straddled.train.labels)
    index = torch.arange(len(straddled.train.labels) - 3, len(straddled.train.labels))  # the last straddle windows
    expected = cache.teacher_logits(load_teacher(config, teacher), straddled.train.audio[index],
                                    front_end(config, data.train.of_kind("background"), torch.device("cpu"))[0],
                                    batch_size=32, device=torch.device("cpu"))
    assert torch.allclose(teachers({"waveform": straddled.train.audio[index]}, view=None, index=index), expected,
                          atol=1e-6)
    mask = straddled.train.labels == UNLABELLED
    only = dataclasses.replace(straddled, train=Split(straddled.train.audio[mask], straddled.train.labels[mask],
                                                      [STRADDLE_KIND] * int(mask.sum())))
    (losses,) = fit_losses(make_config(data.root, config.storage.root,
                                       distillation={"alpha_start": 1.0, "alpha_end": 1.0}), only)
    assert losses["student_loss"] == 0.0 and losses["distillation_loss"] > 0


@pytest.mark.parametrize("change", [{"augment": {"views": 2, "gain_db": 3.0}}, {"training": {"seed": 1}}],
                         ids=["augment", "seed"])
def test_changed_augment_or_seed_gets_a_new_key_and_a_rebuild(config, data, count_builds, change):
    # Rule: when the teacher hears the views, a change to the augmentation or the seed gives another key (the same
    # teacher: it does not augment), so another directory and a full rebuild; a shard built for another key is
    # refused on load and rebuilt, never served.
    cache.build_cache(config, ["cnn"], data=data)
    changed = make_config(data.root, config.storage.root, **change)
    old_key = cache.cache_key(config, config.teacher("cnn"), data)
    new_key = cache.cache_key(changed, changed.teacher("cnn"), data)
    assert new_key != old_key
    count_builds.clear()
    cache.build_cache(changed, ["cnn"], data=data)
    assert sorted(count_builds) == [("cnn", s) for s in cache.shard_names(changed)]
    old_view, new_view = (cache.CachedTeachers.load(c, data).logits[0, 1] for c in (config, changed))
    assert not torch.allclose(old_view, new_view)

    stale = shard_path(changed, "cnn", "view_000", data)
    shutil.rmtree(stale)
    shutil.copytree(shard_path(config, "cnn", "view_000", data), stale)  # verifies, but was built for the old key
    with pytest.raises(CheckpointError, match=old_key[:16]):  # refused as pinned to the old key's directory
        cache.CachedTeachers.load(changed, data)
    count_builds.clear()
    cache.build_cache(changed, ["cnn"], data=data)
    assert count_builds == [("cnn", "view_000")]
    assert torch.equal(cache.CachedTeachers.load(changed, data).logits[0, 1], new_view)


def test_a_cache_of_a_stale_teacher_is_refused_though_it_verifies(config, data):
    # Rule: the cache is built or reused only for teachers current for the config: its shards verify and carry the
    # key of the stored teacher, but another recipe means another teacher, so they are refused in one line.
    cache.build_cache(config, ["cnn"], data=data)
    augmenting = config.replace({"teachers.0.augment": True})
    with pytest.raises(StaleTeacherError, match="^teacher cnn .*kd-tune teacher train CONFIG --only cnn"):
        cache.build_cache(augmenting, ["cnn"], data=data)


def test_tampered_shard_is_refused_and_rebuilt(config, data, count_builds):
    # Rule: a shard whose bytes changed is refused with an error naming the file, and the next build rebuilds it
    # (and only it) to the original logits.
    cache.build_cache(config, ["cnn"], data=data)
    original = cache.CachedTeachers.load(config, data).logits.clone()
    tensor_file = shard_path(config, "cnn", "clean", data) / "logits.safetensors"
    raw = bytearray(tensor_file.read_bytes())
    raw[-1] ^= 0x01
    tensor_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"clean: file logits\.safetensors does not match"):
        cache.CachedTeachers.load(config, data)
    count_builds.clear()
    cache.build_cache(config, ["cnn"], data=data)
    assert count_builds == [("cnn", "clean")]
    assert torch.equal(cache.CachedTeachers.load(config, data).logits, original)


def test_build_resumes_and_a_cache_without_its_marker_is_incomplete(config, data, count_builds):
    # Rule: only missing shards are built again (the others keep their files), and a cache whose index marker is
    # missing is refused as incomplete until a build writes the marker last; one never built says so.
    with pytest.raises(CheckpointError, match="not built yet"):
        cache.CachedTeachers.load(config, data)
    paths = cache.build_cache(config, ["cnn"], data=data)
    assert count_builds == [("cnn", s) for s in cache.shard_names(config)]
    kept = shard_path(config, "cnn", "clean", data) / MANIFEST_NAME
    before = kept.read_bytes()
    shutil.rmtree(shard_path(config, "cnn", "view_001", data))
    shutil.rmtree(Path(paths["cnn"]) / cache.INDEX)
    with pytest.raises(CheckpointError, match="incomplete"):
        cache.CachedTeachers.load(config, data)
    count_builds.clear()
    cache.build_cache(config, ["cnn"], data=data)
    assert count_builds == [("cnn", "view_001")] and kept.read_bytes() == before
    count_builds.clear()
    cache.build_cache(config, ["cnn"], data=data)
    assert count_builds == []


def test_first_users_at_once_build_each_shard_once(config, data, count_builds):
    # Rule: two trials that find no cache at the same time build it once between them (a lock), and both get it.
    cache_config = make_config(data.root, config.storage.root, distillation={"teacher_mode": "cache"})
    results, errors = [], []

    def first_use():
        try:
            results.append(cache.cached_teachers(cache_config, data, torch.device("cpu")))
        except Exception as error:  # broad on purpose: reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2
    assert sorted(count_builds) == sorted(("cnn", s) for s in cache.shard_names(cache_config))
    assert torch.equal(results[0].logits, results[1].logits)


@pytest.mark.slow
def test_ray_build_makes_the_same_shards_as_the_in_process_build(config, data, tmp_path, monkeypatch):
    # Rule: the build distributed over Ray tasks writes the same shards (names, keys, logits) as the in-process one.
    import ray

    from kd_tune.tuning.sweep import shards_on_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    both = ["cnn", "w2v"]
    local = cache.build_cache(config, both, data=data)
    shutil.copytree(Path(config.storage.root) / "teachers", tmp_path / "ray_runs" / "teachers")
    on_ray_config = make_config(data.root, tmp_path / "ray_runs")
    temp_dir = tempfile.mkdtemp(prefix="kdc", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    try:
        on_ray = cache.build_cache(on_ray_config, both, data=data, run=shards_on_ray(ray.put(data)))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    for name in both:
        assert Path(local[name]).name == Path(on_ray[name]).name
        shards = sorted(p.name for p in Path(on_ray[name]).iterdir())
        assert shards == sorted(p.name for p in Path(local[name]).iterdir())
        for shard in shards:
            rel = f"{Path(local[name]).relative_to(config.storage.root)}/{shard}"  # pinned: loaded from its root
            a = load_checkpoint(config.storage.root, rel)
            b = load_checkpoint(on_ray_config.storage.root, rel)
            assert a.manifest["extra"] == b.manifest["extra"]
            for stem in a.tensors:
                for tensor, other in zip(a.tensors[stem].values(), b.tensors[stem].values(), strict=True):
                    # Equal to float32 rounding, not bit for bit: a Ray task runs with OMP_NUM_THREADS=1, the
                    # driver with every core, and oneDNN sums a convolution in another order by thread count (logits
                    # 5.7e-6 apart on an AVX-512 Xeon, identical on other machines).
                    torch.testing.assert_close(tensor, other, rtol=1e-4, atol=1e-5, msg=f"{name}/{shard}")
