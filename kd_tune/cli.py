"""`kd-tune`: the command line. Each sub-command validates its input at the edge and calls one library function.

A command imports the modules it runs when it runs (the one place in kd_tune that imports inside functions): so
`kd-tune config check` and `kd-tune detect` load no torch, and only the commands that use Ray load Ray. Every
refusal derives from kd_tune.errors.KdTuneError and is printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

from kd_tune.config import dump_config, load_config
from kd_tune.errors import InputError, KdTuneError, printable, s3_refusal
from kd_tune.metrics import echo_line

MAX_MESSAGE_CHARS = 2000  # a refusal is one line; a longer message is cut rather than flood the terminal


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
    from kd_tune.datasets.synth import synthesize
    from kd_tune.store.storage import check_out_path

    check_out_path(args.out, folder=True, files=("dataset.json", "manifest.jsonl"))
    manifest = synthesize(args.out, wakeword=args.wakeword, seed=args.seed, size=args.size,
                          new_speakers=not args.no_new_speakers, voices=args.voice, train_hours=args.train_hours)
    print(f"data set ready: {manifest}")
    return 0


def cmd_data_add(args: argparse.Namespace) -> int:
    from kd_tune.datasets.userdata import add_recordings

    print(add_recordings(args.source, args.to).format())
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from kd_tune.datasets.data import check

    report = check(args.dir)
    print(printable(report.format()))  # file names may hold escape sequences
    return 0 if report.ok else 1


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from kd_tune.datasets.data import load_data
    from kd_tune.demo import train_teachers
    from kd_tune.training.teachers import check_teacher_store, configured_teachers

    config = _config(args)
    configured_teachers(config, args.only)  # a wrong name or store is refused before the data is read
    check_teacher_store(config)
    train_teachers(config, load_data(config.data), args.only)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kd_tune.training.record import run_training

    def echo(metrics: dict, _checkpoint=None) -> None:
        print(f"train epoch {int(metrics.get('epoch', 0))}: {echo_line(metrics)}", flush=True)

    run = run_training(_config(args), name=args.name, resume=args.resume, overwrite=args.overwrite, echo=echo)
    print(f"run written to {run}\nTensorBoard: tensorboard --logdir {run}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from kd_tune.evaluation.leaderboard import load_experiment
    from kd_tune.space import load_search_space
    from kd_tune.tuning.sweep import sweep

    if args.resume:  # the experiment's own config and space, so a resumed sweep cannot drift from the original
        config, space, name = load_experiment(args.resume, _config(args, check_paths=False))
    else:
        config = _config(args)
        if args.storage:
            config = with_storage(config, args.storage)
        space, name = load_search_space(args.search_space), args.name
        space.check_teachers(config, source=args.search_space)
    rows, errors = sweep(config, space, name=name, address=args.address, resume=bool(args.resume),
                         verbose=args.verbose)
    for error in errors:
        print(f"kd-tune: {error}", file=sys.stderr)
    _results(config, space, name, rows, log=not args.verbose)
    return 1 if errors else 0


def with_storage(config, root: str):
    """--storage: the experiment goes to `root`; the teachers stay where they are."""
    return config.replace({"storage.root": root, "storage.teachers": config.storage.teachers_uri}, source="--storage")


def _results(config, space, name: str, rows: list[dict], *, log: bool, extra: tuple[str, ...] = (), plots: bool = True,
             wide: bool = False, model: str | None = None, test: dict | None = None) -> None:
    """The leaderboard, what else was made, the plots and the log; last, the result block."""
    from kd_tune.evaluation.leaderboard import LOG_NAME, format_leaderboard, result_block
    from kd_tune.store.storage import Storage

    store = Storage.from_config(config.storage)
    written = []
    if plots:  # Optuna and matplotlib cost seconds, and `results` writes into an experiment only when asked
        from kd_tune.evaluation.plots import sweep_plots

        written = sweep_plots(store, name, rows, space, metric=config.tune.metric, mode=config.tune.mode)
    experiment = store.path(name)
    made = [*extra, *(f"plot: {p}" for p in written), *([f"Ray's log: {experiment}/{LOG_NAME}"] if log else [])]
    print(printable(format_leaderboard(rows, config, experiment=experiment, wide=wide)))  # names come from a file
    if made:
        print("\n".join(["", *made]))
    print(printable(result_block(rows, config, experiment=experiment, model=model, test=test)))


def cmd_results(args: argparse.Namespace) -> int:
    from kd_tune.evaluation.leaderboard import load_experiment, read_leaderboard

    config, space, name = load_experiment(args.experiment, _config(args, check_paths=False))
    _results(config, space, name, read_leaderboard(args.experiment, config), log=False, plots=args.plots,
             wide=args.wide)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kd_tune.deploy import export
    from kd_tune.evaluation.source import locate_source
    from kd_tune.store.storage import check_out_path

    out = Path(args.out)
    check_out_path(out, folder=False)  # found now, not after a minute of work
    config = _config(args, check_paths=False)  # only its storage settings (S3 endpoint, region) reach the source
    source = locate_source(args.source, config)
    card = export.export_student(source.load(), out, data=args.data, int8=args.int8, streaming=args.streaming,
                                 source=source.describe())  # a ParityError's message carries the figure
    print(export.summary(card))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from kd_tune.deploy.detect import Detector

    if bool(args.files) == args.mic or (not args.mic and (args.seconds or args.backend != "default")):
        raise InputError(f"detect: got {'FILE and --mic' if args.files else 'FILE' if args.mic else '--mic options'}"
                         "; allowed: audio files, or --mic (with --backend and --seconds)")
    detector = Detector(args.model, threshold=args.threshold)  # a card that is not this model's: main's one line
    if args.mic:
        from kd_tune.deploy.listen import listen_to_microphone

        listen_to_microphone(detector, backend=args.backend, seconds=args.seconds,
                             echo=functools.partial(print, flush=True))  # each detection as it happens, also in a pipe
        return 0
    exit_code = 0
    for file in args.files:
        try:
            times = detector.detect(detector.read(file))
        except ValueError as e:  # one unreadable file does not stop the others
            print(f"kd-tune: {one_line(str(e))}", file=sys.stderr)
            exit_code = max(exit_code, getattr(e, "exit_code", 1))
            continue
        found = "wake word at " + ", ".join(f"{t:.2f} s" for t in times) if times else "no wake word"
        print(printable(f"{file}: {found}"), flush=True)
    return exit_code


def cmd_eval(args: argparse.Namespace) -> int:
    from kd_tune.evaluation.heldout import MAX_LONG_HOURS, OUT_FILES, evaluate_model, summary
    from kd_tune.store.storage import check_out_path

    model = Path(args.model)
    out = Path(args.out) if args.out else model.with_name(f"{model.stem}.eval")
    check_out_path(out, folder=True, files=OUT_FILES)  # refused now, not after minutes of scoring
    hours = args.max_hours or MAX_LONG_HOURS
    grid_only = [name for name, given in (("--baseline", args.baseline), ("--noise", args.noise),
                                          ("--stream-minutes", args.stream_minutes)) if given]
    if grid_only and not args.conditions:
        raise InputError(f"{grid_only[0]}: given without --conditions; allowed: {grid_only[0]} with --conditions GRID")
    if args.conditions:  # refused before the minutes of work below, not after them
        from kd_tune.audio.conditions import NOISE_TYPES, noise_folder, parse_grid

        folders = [noise_folder(item)[0] for item in args.noise]
        parse_grid(args.conditions, (*NOISE_TYPES, *folders, "background"))
    report = evaluate_model(model, Path(args.data), out_dir=out, engine=args.engine, max_long_hours=hours)
    print(printable(f"{summary(report)}\nDET curve: {report['det_png']}\nfigures: {out / 'eval.json'}"), flush=True)
    if args.conditions:
        from kd_tune.evaluation.robustness import run_grid

        grid = run_grid(model, Path(args.data), out, grid=args.conditions, baseline=args.baseline,
                        noise=dict(noise_folder(item) for item in args.noise),
                        stream_minutes=args.stream_minutes, engine=args.engine, max_long_hours=hours)
        print(f"{grid['summary']}\ntable: {grid['md']}\nplot: {grid['png']}\nfigures: {out / 'conditions.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kd_tune.evaluation.compare import best_of_config, compare, table
    from kd_tune.store.storage import check_out_path

    check_out_path(args.out, folder=True, files=("compare.json", "compare.md"))
    if args.conditions:  # refused now, not after the first arm has trained
        from kd_tune.audio.conditions import NOISE_TYPES, parse_grid

        parse_grid(args.conditions, (*NOISE_TYPES, "background"))
    if args.best_of:  # the config (its storage settings) only locates the trial
        storage = [item for item in args.set if item.startswith("storage.")]
        config = best_of_config(args.best_of, load_config(args.config, overrides=storage, check_paths=False), args.set)
    else:
        config = _config(args)
    teachers = args.teachers or [t.name for t in config.teachers]
    out = Path(args.out)
    rows = compare(config, teachers, seeds=args.seeds, name=args.name, out=out, conditions=args.conditions)
    print(f"{table(rows)}\nfigures: {out / 'compare.json'}, table: {out / 'compare.md'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kd_tune.tuning.bench import format_report, run_bench

    report = run_bench(_config(args), clips=args.clips, teacher_source=args.teacher_source)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kd_tune.demo import run_demo

    out = Path(args.out or ("runs/demo" if args.size == "default" else f"runs/demo_{args.size}")).resolve()
    config, space, rows, errors, made = run_demo(out, size=args.size, search_space=args.search_space,
                                                 overrides=args.set, verbose=args.verbose)
    for error in errors:
        print(f"kd-tune: {error}", file=sys.stderr)
    _results(config, space, "sweep", rows, log=not args.verbose, extra=made,
             model=str(out / "model.onnx") if made else None,
             test=json.loads((out / "eval" / "eval.json").read_text()) if made else None)
    return 1 if errors else 0


def _number(kind: type, *, low: float, high: float = math.inf, allowed: str):
    """An argparse type: `kind(text)` in [low, high], else argparse's error naming what is allowed."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan  # refused below, with the same message
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"got {text}; allowed: {allowed}")
        return value
    return parse


POSITIVE = _number(float, low=math.ulp(0.0), high=sys.float_info.max, allowed="a number > 0")  # finite


def one_line(message: str) -> str:
    """A message as one line of at most MAX_MESSAGE_CHARS: the single line a refusal promises."""
    flat = printable(" ".join(message.split()))  # a file name's escape sequences never reach the terminal
    return flat if len(flat) <= MAX_MESSAGE_CHARS else flat[:MAX_MESSAGE_CHARS - 3] + "..."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-tune", description="Knowledge distillation sweeps for tiny wake-word models")
    p.add_argument("--debug", action="store_true", help="show the traceback of a refusal instead of one line")
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
    q.add_argument("--size", choices=("small", "default", "large"), default="default")
    q.add_argument("--train-hours", type=POSITIVE, metavar="HOURS", help="long/train/'s length (default: the size's, "
                   "1 h at the default size; 3 h trains a better model, measured)")
    q.add_argument("--no-new-speakers", action="store_true", help="keep the voices as the engines speak them (no "
                   "pitch, formant or speed changes)")
    q.add_argument("--voice", action="append", default=[], metavar="PATH", help="a piper voice model (.onnx, its "
                   ".onnx.json beside it) to speak with too; a multi-speaker model speaks as random speakers "
                   "(repeatable)")
    q.set_defaults(func=cmd_data_synth)
    q = data.add_parser("add", help="copy your recordings (positive/, negative/, hard_negative/, background/, "
                        "long/<split>/) into a data set with a manifest")
    q.add_argument("source", help="a folder laid out like a folder data set")
    q.add_argument("--to", required=True, metavar="DATASET", help="the data set (its manifest.jsonl) to add them to")
    q.set_defaults(func=cmd_data_add)
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
    q.add_argument("--overwrite", action="store_true", help="start a run of another config over under this name "
                   "(its checkpoints and TensorBoard events are deleted)")
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("sweep", help="search alpha schedule, temperature and teacher with Ray Tune + Optuna")
    with_config(q)
    q.add_argument("--search-space", default="default", help="a YAML search space, or a built-in one by name: "
                   "default, smoke (default: default)")
    q.add_argument("--storage", help="PATH_OR_URI for the experiment (default: storage.root of the config)")
    q.add_argument("--name", default="sweep", help="experiment name: written to PATH_OR_URI/NAME")
    q.add_argument("--resume", metavar="EXPERIMENT", help="continue PATH_OR_URI/NAME after its driver died "
                   "(finished trials are not rerun)")
    q.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    q.add_argument("--verbose", action="store_true", help="show Ray's own tables and actor logs on the console "
                   "(default: in the experiment's sweep.log)")
    q.set_defaults(func=cmd_sweep)

    q = sub.add_parser("results", help="print an experiment's leaderboard and result (read-only)")
    q.add_argument("experiment", help="PATH_OR_URI/NAME")
    with_config(q)
    q.add_argument("--wide", action="store_true", help="every shown metric and the checkpoint paths, at any width")
    q.add_argument("--plots", action="store_true", help="also (re)write the experiment's plots/*.png")
    q.set_defaults(func=cmd_results)

    q = sub.add_parser("export", help="export a trained student to ONNX (front end inside) with its model.json")
    q.add_argument("source", help="a checkpoint directory, or an experiment PATH_OR_URI/NAME (its best trial)")
    q.add_argument("--out", required=True, help="the .onnx file to write; model.json goes beside it")
    q.add_argument("--config", help="YAML config for the storage settings (S3 endpoint, region) of the source")
    q.add_argument("--int8", action="store_true", help="also write a statically quantized <out>.int8.onnx")
    q.add_argument("--streaming", action="store_true", help="also write <out>.stream.onnx, one hop of audio and a "
                   "state in: detect and eval then compute only what each hop adds")
    q.add_argument("--data", help="data set whose val split calibrates the threshold (default: the checkpoint's "
                   "data.root)")
    q.set_defaults(func=cmd_export, set=[])

    q = sub.add_parser("detect", help="find the wake word in audio files, or live, with an exported model")
    q.add_argument("model", help="a .onnx file written by `kd-tune export` (its .json beside it)")
    q.add_argument("files", nargs="*", metavar="FILE", help="audio files (any rate and channel count)")
    q.add_argument("--mic", action="store_true", help="listen to the microphone instead (needs kd-tune[mic])")
    q.add_argument("--backend", default="default", help="with --mic, miniaudio's audio backend: default, alsa, "
                   "pulseaudio, jack, coreaudio, wasapi, or null (silence: a dry run)")
    q.add_argument("--seconds", type=POSITIVE, help="with --mic, stop after this much audio (default: at Ctrl-C)")
    q.add_argument("--threshold", type=float, help="override the calibrated threshold from the model's .json")
    q.set_defaults(func=cmd_detect)

    q = sub.add_parser("eval", help="measure an exported model on held-out audio: FRR at its threshold, false "
                       "activations per hour, clip ROC AUC, DET curve")
    q.add_argument("model", help="a .onnx file written by `kd-tune export` (its .json beside it)")
    q.add_argument("data", help="a folder with positive/, negative/ and long/ (long negative recordings), or a "
                   "kd_tune data set (its test split)")
    q.add_argument("--out", help="folder for eval.json and det.png (default: <model>.eval beside the model)")
    q.add_argument("--engine", choices=("piper", "espeak", "user"), help="a data set's speech of this engine alone, "
                   "from every split: for a model trained with data.exclude_engines=[ENGINE]")
    q.add_argument("--conditions", metavar="GRID", help="also measure under a grid of acoustic conditions: default "
                   "(noise types x SNR, rooms, levels, microphones), clean, or comma-separated condition names; "
                   "writes conditions.md, .json and .png")
    q.add_argument("--baseline", choices=("pocketsphinx",), help="with --conditions, also score a spotter that was "
                   "never trained (needs pip install 'kd-tune[baseline]')")
    q.add_argument("--noise", action="append", default=[], metavar="NAME=FOLDER", help="with --conditions, one more "
                   "noise type from a folder of your recordings (repeatable)")
    q.add_argument("--stream-minutes", type=POSITIVE, metavar="MINUTES", help="with --conditions, score at "
                   "most this much long audio per condition (default: all of it)")
    q.add_argument("--max-hours", type=POSITIVE, metavar="HOURS", help="score at most this much long "
                   "audio, read a recording at a time, in name order (default: 8)")
    q.set_defaults(func=cmd_eval)

    q = sub.add_parser("compare", help="what KD is worth: alpha = 0 against KD from each teacher, over seeds, "
                       "measured on the held-out test split")
    with_config(q)
    q.add_argument("--teachers", nargs="+", metavar="NAME", help="teachers or '+'-joined ensembles to distil from "
                   "(default: every configured teacher)")
    q.add_argument("--seeds", type=_number(int, low=1, high=100, allowed="1 to 100"), default=3,
                   help="seeds per arm (default: 3)")
    q.add_argument("--conditions", metavar="GRID", help="also measure every run under this condition grid (see "
                   "`kd-tune eval --conditions`), 20 minutes of the test stream per condition")
    q.add_argument("--best-of", metavar="EXPERIMENT", help="start from the config of this sweep's best trial")
    q.add_argument("--name", default="compare", help="runs go to <storage.root>/NAME (default: compare)")
    q.add_argument("--out", default="runs/compare", help="exported models, figures and table (default: runs/compare)")
    q.set_defaults(func=cmd_compare)

    q = sub.add_parser("bench", help="measure the teacher cache vs a live teacher, Ray Train's overhead, the front "
                       "end and the exported student's latency on this machine")
    with_config(q)
    q.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    q.add_argument("--clips", type=_number(int, low=1, allowed="an integer >= 1"), default=256,
                   help="training clips drawn from data.root (default: 256)")
    q.add_argument("--teacher-source", choices=("base", "tiny"), default="base",
                   help="size of the wav2vec2 teacher, random init (default: base, ~95M parameters)")
    q.set_defaults(func=cmd_bench)

    q = sub.add_parser("demo", help="the whole job on the embedded default")
    q.add_argument("--size", choices=("small", "default", "large"), default="default",
                   help="small: a smoke run (a few minutes, figures meaningless); default: the README's figures "
                        "(~23-29 min on 2 cores, measured); large: a real run (hours)")
    q.add_argument("--out", help="default: runs/demo, or runs/demo_<size> for another size")
    q.add_argument("--search-space", default="default", help="a YAML search space, or a built-in one by name")
    q.add_argument("--verbose", action="store_true", help="show Ray's own tables and actor logs on the console "
                   "(default: in <out>/sweep/sweep.log)")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    q.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (KdTuneError, OSError) as e:  # the message says what went wrong and what to do
        refusal = e if isinstance(e, (KdTuneError, FileNotFoundError)) else s3_refusal(e)  # S3's bare OSErrors
        if args.debug or refusal is None:
            raise
        print(f"kd-tune: {one_line(str(refusal))}", file=sys.stderr)
        return getattr(refusal, "exit_code", 1)
    except KeyboardInterrupt:
        print("kd-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
