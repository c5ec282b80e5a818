"""`kd-tune`: the command line. Each sub-command validates its input at the edge and calls one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_tune.config import ConfigError, dump_config, load_config

EXIT_INVALID = 2


def _config(args: argparse.Namespace, *, check_paths: bool = True):
    return load_config(args.config, overrides=args.set, check_paths=check_paths)


def cmd_config_check(args: argparse.Namespace) -> int:
    load_config(args.file, check_paths=not args.no_path_check)
    print(f"{args.file}: valid")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.file, check_paths=False)), end="")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from kd_tune.data import synthesize

    manifest = synthesize(args.out, wakeword=args.wakeword, seed=args.seed, size=args.size)
    print(f"data set ready: {manifest}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from kd_tune.data import check

    report = check(args.dir)
    print(report.format())
    return 0 if report.ok else 1


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from kd_tune.data import load_dataset
    from kd_tune.train import fit_teacher

    config = _config(args)
    names = args.only or [t.name for t in config.teachers]
    data = load_dataset(config.data.root)
    for name in names:
        metrics = fit_teacher(config, config.teacher(name), data=data, report=_print_epoch(f"teacher {name}"))
        print(f"teacher {name}: " + _format_metrics(metrics))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kd_tune.train import run_training

    config = _config(args)
    run = run_training(config, name=args.name, resume=args.resume, echo=_print_epoch("train"))
    print(f"run written to {run}\nTensorBoard: tensorboard --logdir {run}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from kd_tune import tune

    if args.resume:  # the experiment's own config and space, so a resumed sweep cannot drift from the original
        config, space, name = tune.load_experiment(args.resume, _config(args, check_paths=False))
    else:
        config = _config(args)
        if args.storage:
            config = config.model_copy(update={"storage": config.storage.model_copy(update={"root": args.storage})})
        space, name = tune.load_search_space(args.search_space), args.name
        space.check_teachers(config, source=args.search_space)
    rows, errors = tune.sweep(config, space, name=name, address=args.address, resume=bool(args.resume))
    print(tune.format_leaderboard(rows, metric=config.tune.metric))
    experiment = f"{config.storage.root.rstrip('/')}/{name}"
    print(f"\nexperiment: {experiment}\nTensorBoard: tensorboard --logdir {experiment}")
    for error in errors:
        print(f"kd-tune: {error}", file=sys.stderr)
    return 1 if errors else 0


def cmd_results(args: argparse.Namespace) -> int:
    from kd_tune import tune

    config = _config(args)
    print(tune.format_leaderboard(tune.read_leaderboard(args.experiment, config), metric=config.tune.metric))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kd_tune.demo import demo

    demo(Path(args.out))
    return 0


def _format_metrics(metrics: dict) -> str:
    keys = ("total_loss", "student_loss", "distillation_loss", "accuracy", "auc", "eer", "frr_at_target_fa",
            "fa_per_hour")
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def _print_epoch(prefix: str):
    def echo(metrics: dict, _checkpoint=None) -> None:
        print(f"{prefix} epoch {int(metrics.get('epoch', 0))}: {_format_metrics(metrics)}", flush=True)
    return echo


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-tune", description="Knowledge distillation sweeps for tiny wake-word models")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(q: argparse.ArgumentParser) -> None:
        q.add_argument("config", nargs="?", help="YAML config (default: the embedded default)")
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one value, e.g. --set training.epochs=3 (repeatable)")

    config = sub.add_parser("config", help="validate or show a configuration").add_subparsers(dest="action",
                                                                                             required=True)
    q = config.add_parser("check", help="validate a file without running anything (exit 2 when invalid)")
    q.add_argument("file")
    q.add_argument("--no-path-check", action="store_true", help="do not require data.root to exist")
    q.set_defaults(func=cmd_config_check)
    q = config.add_parser("show", help="print the resolved config (default: the embedded default)")
    q.add_argument("file", nargs="?")
    q.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="build or check a data set").add_subparsers(dest="action", required=True)
    q = data.add_parser("synth", help="synthesize a wake-word data set offline (needs the `synth` extra)")
    q.add_argument("--wakeword", default="hey nova")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--size", choices=("small", "default"), default="default")
    q.set_defaults(func=cmd_data_synth)
    q = data.add_parser("check", help="list unreadable, silent, clipped, too short or too long files")
    q.add_argument("dir")
    q.set_defaults(func=cmd_data_check)

    teacher = sub.add_parser("teacher", help="fine-tune teachers").add_subparsers(dest="action", required=True)
    q = teacher.add_parser("train", help="fine-tune the configured teachers and store them")
    with_config(q)
    q.add_argument("--only", action="append", metavar="NAME", help="train only this teacher (repeatable)")
    q.set_defaults(func=cmd_teacher_train)

    q = sub.add_parser("train", help="one distillation run, in this process")
    with_config(q)
    q.add_argument("--name", default="train", help="run name under storage.root (default: train)")
    q.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("sweep", help="search alpha schedule, temperature and teacher with Ray Tune + Optuna")
    with_config(q)
    q.add_argument("--search-space", default="search_spaces/default.yaml", help="YAML search space (or a name "
                   "under search_spaces/, e.g. smoke)")
    q.add_argument("--storage", help="PATH_OR_URI for the experiment (default: storage.root of the config)")
    q.add_argument("--name", default="sweep", help="experiment name: written to PATH_OR_URI/NAME")
    q.add_argument("--resume", metavar="EXPERIMENT", help="continue PATH_OR_URI/NAME after its driver died "
                   "(finished trials are not rerun)")
    q.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    q.set_defaults(func=cmd_sweep)

    q = sub.add_parser("results", help="print an experiment's leaderboard")
    q.add_argument("experiment", help="PATH_OR_URI/NAME")
    q.add_argument("--config", help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_results, set=[])

    q = sub.add_parser("demo", help="the whole job on the embedded default")
    q.add_argument("--out", default="runs/demo")
    q.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"kd-tune: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("kd-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
