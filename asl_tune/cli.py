"""`asl-tune`: parses arguments and calls one function per command. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from asl_tune import api
from asl_tune.config import SPLITS, TrialConfig, check_value
from asl_tune.errors import AslTuneError, Stopped
from asl_tune.synth import DEFAULT_PER_CLASS

# Every character str.splitlines breaks a line at, as its escape: a refusal stays one line whatever the user typed (a name "a\rb").
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}

# CPU-friendly defaults for a single `train`: the seed's optimiser, at 64 px for a few epochs (the rest: TrialConfig's).
TRAIN_DEFAULTS = {"image_size": 64, "epochs": 3}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message.translate(_LINE_BREAKS)}", file=sys.stderr)
        sys.exit(2)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _trial_config(args: argparse.Namespace) -> TrialConfig:
    """A TrialConfig from the options given; every out-of-range value is named in one message."""
    values = {k: getattr(args, k) for k in TrialConfig.field_names() if getattr(args, k, None) is not None}
    problems = [f"{_option(k)}: {why}, got {v}" for k, v in values.items() if (why := check_value(k, v))]
    if problems:
        raise AslTuneError("; ".join(problems))
    return TrialConfig(**values)


def _add_trial_options(p: argparse.ArgumentParser) -> None:
    """One option per TrialConfig field, named, typed, documented and defaulted by the field itself."""
    for f in dataclasses.fields(TrialConfig):
        default = TRAIN_DEFAULTS.get(f.name, f.default)
        kind = TrialConfig.field_type(f.name)
        choices = SPLITS if f.name == "split" else None
        p.add_argument(
            _option(f.name),
            dest=f.name,
            type=kind,
            choices=choices,
            default=default,
            help=f"{TrialConfig.field_help(f.name)} (default {default})",
        )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        type=Path,
        help="dataset folder: the Kaggle ASL Alphabet layout or any folder per class (default: the embedded synthetic dataset, rendered on first use)",
    )
    p.add_argument(
        "--external", type=Path, help="extra evaluation set, reported as external_accuracy: the Kaggle test folder or a folder per class"
    )


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    """analyze's --speed-on and --threads: which speed figures the front uses, and how they are taken."""
    p.add_argument(
        "--speed-on",
        dest="speed_on",
        default="cpu",
        metavar="cpu|cuda|training",
        help="where the speed figures that the front, plots, 30-fps verdict and report use come from (infer_img_per_s, latency_ms_p50/p95, keeps_up_30fps). cpu or cuda: each distinct architecture among the finished trials (head width, image size, classes) is timed once, alone, on this machine's CPU or GPU (3 warm-up runs, then 20 batches of 64 timed in 5 groups, the median group kept, and 100 single images) and kept in RESULTS/NAME/speed.parquet, so the next analyze on this machine measures nothing; the trials' own figures stay as under_load_*. training: the figures each trial took in its first epoch, while other trials shared its cores or GPU. Default cpu: a figure of the model alone, the same for every trial of one architecture, as for a deployment that runs on a CPU",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads while timing with --speed-on cpu or cuda (default: torch's own choice on this machine)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface.

    Long: one add_argument per option, read as a list; the formatter gives each long help text its own lines.
    """
    parser = _Parser(
        prog="asl-tune",
        description="Hyperparameter search for DexNet on the ASL alphabet: Ray Tune schedules, Optuna searches, Parquet keeps the results.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train and evaluate one configuration, without Ray",
        description="Train and evaluate one DexNet configuration on one machine, without Ray.",
    )
    _add_data_options(p)
    _add_trial_options(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument(
        "--out",
        type=Path,
        help="write trials/epochs/confusion/per_class Parquet files here, as a sweep does, and the trained weights to OUT/<trial id>/checkpoint.pt (load them with asl_tune.train.load_trained)",
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object on the last stdout line")
    p.set_defaults(func=cmd_train)

    _add_sweep_parser(sub)

    p = sub.add_parser(
        "resume",
        help="finish a sweep whose driver died",
        description="Continue an interrupted sweep: finished trials are kept, interrupted trials continue from their last checkpoint, the searcher keeps what it learned, and the sweep ends with exactly the trials it asked for.",
    )
    p.add_argument("name", help="the sweep's name (its folder under --results)")
    p.add_argument(
        "--results",
        default="results",
        help="where sweep folders are (default results/): a folder, or the URI the sweep was started with, whose files are first copied to this machine's working copy, so any driver machine can resume it",
    )
    p.add_argument("--address", help="Ray cluster to run on (default: the one the sweep used, else a local instance)")
    _add_ship_code_option(p)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray Tune's own status tables and log lines instead of asl-tune's one line per trial event and its status line",
    )
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "analyze",
        help="summaries, Pareto fronts and plots from sweeps' Parquet results",
        description="Read sweeps' Parquet results (finished, running or copied back from a cluster) and write RESULTS/NAME/report/: report.md, pareto_front.parquet, and the Pareto, learning-curve, confusion, pair and importance plots. Several names also write a comparison report with their fronts overlaid. When --results is a URI, the Parquet files are copied to the cache folder ($ASL_TUNE_CACHE, else $XDG_CACHE_HOME/asl-tune or ~/.cache/asl-tune, under sweeps/<hash>/.analyze/NAME/) and the report is written there, not to the URI; its path is printed.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="sweep name(s), folders under --results")
    p.add_argument(
        "--results",
        default="results",
        help="where sweep folders are (default results/): a folder, or a URI a sweep's --results named (s3://, gs://, file:///...)",
    )
    p.add_argument(
        "--objectives",
        help="comma-separated metric:max|min pairs for the front (default val_accuracy:max,infer_img_per_s:max); flops_per_image and n_parameters are exact costs, free of timing noise",
    )
    _add_speed_options(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "evaluate",
        help="score trained weights on another set of images",
        description="Score a trained network (a trial's checkpoint: the `checkpoint` column of trials.parquet, or asl-tune train --out's) on another set of images, such as other people's hands: accuracy, the most confused pairs and the classes recalled worst. Images are resized to the size the network was trained at.",
    )
    p.add_argument(
        "weights", metavar="WEIGHTS", help="checkpoint.pt, the folder holding it, or a URI pyarrow opens (s3://, gs://, file://)"
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DIR",
        help="the images: the Kaggle test folder (<class>_test.jpg) or a folder per class, named as the network's classes",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "slurm",
        help="print a Slurm batch script that runs a sweep over a job's nodes",
        description="Print a Slurm batch script (save it, edit its #SBATCH lines and settings, sbatch it): Ray's head on the job's first node and a worker on each other node, then the sweep; Slurm sends it SIGTERM before the time limit (--signal), the sweep stops cleanly and the job is requeued (--requeue), and the next run of the job resumes the sweep.",
    )
    p.set_defaults(func=cmd_slurm)

    data = sub.add_parser("data", help="inspect or generate datasets").add_subparsers(
        dest="data_command", required=True, parser_class=_Parser
    )
    p = data.add_parser("check", help="decode a dataset (through the cache) and report classes, counts, splits and skipped files")
    p.add_argument("folder", type=Path, help="dataset folder (Kaggle layout or folder per class)")
    p.add_argument(
        "--image-size",
        dest="image_size",
        type=int,
        default=64,
        help="decode size in px (default 64); the cache for this size is reused by trials",
    )
    p.add_argument("--split", choices=["blocked", "random"], default="blocked", help="split to report sizes for (default blocked)")
    p.add_argument(
        "--space",
        help="also report the decoded size at each image size this search space uses (a YAML file or a name in search_spaces/): what a sweep of it holds once per node",
    )
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("synth", help="render the embedded synthetic fingerspelling dataset in the Kaggle layout")
    p.add_argument("out", type=Path, help="folder to create")
    p.add_argument(
        "--per-class",
        dest="per_class",
        type=int,
        default=DEFAULT_PER_CLASS,
        help=f"images per class (default {DEFAULT_PER_CLASS}, the embedded default's; the Kaggle set has 3,000)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_data_synth)
    return parser


def _add_sweep_parser(sub) -> None:
    """`asl-tune sweep` and its options.

    Long: one add_argument per option of `asl-tune sweep`, read as a list.
    """
    p = sub.add_parser(
        "sweep",
        help="search a space of configurations with Ray Tune and Optuna",
        description="Run a hyperparameter sweep: Optuna proposes settings from a search space, Ray Tune runs the trials (here or on a cluster) and stops weak ones early (ASHA), and every result lands in Parquet under RESULTS/NAME. With no options: the cpu-quick space on the embedded synthetic dataset, into results/cpu-quick.",
    )
    p.add_argument("--space", default=None, help="search-space YAML file, or the name of one in search_spaces/ (default cpu-quick)")
    _add_data_options(p)
    p.add_argument("--name", help="sweep name, the folder under --results (default: the space's name)")
    p.add_argument(
        "--results",
        default="results",
        help="where sweep folders go (default results/): a folder (on a cluster, one every node shares), or a URI pyarrow's filesystems open (s3://bucket/path, gs://bucket/path, file:///path): the sweep then runs in a working copy in the cache folder ($ASL_TUNE_CACHE, else $XDG_CACHE_HOME/asl-tune or ~/.cache/asl-tune, under sweeps/) and its sweep.json, space.yaml, study.log and Parquet files are copied to URI/NAME/ as they change; Ray's checkpoints go to URI/NAME/run-K/. s3:// and gs:// go through pyarrow's filesystem layer and have not been tested against a real bucket",
    )
    p.add_argument(
        "--num-samples", dest="num_samples", type=int, help="trials to run (default: the space's num_samples); with --extend, trials to add"
    )
    p.add_argument(
        "--max-concurrent", dest="max_concurrent", type=int, help="most trials at once (default: as many as the resources allow)"
    )
    p.add_argument(
        "--cpus-per-trial", dest="cpus_per_trial", type=float, default=1.0, help="CPUs per trial; torch uses this many threads (default 1)"
    )
    p.add_argument(
        "--gpus-per-trial",
        dest="gpus_per_trial",
        type=float,
        help="GPUs per trial, fractions allowed: 0.25 packs four trials on a GPU (default 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument("--address", help="join a running Ray cluster at host:port (or auto) instead of starting one on 127.0.0.1")
    p.add_argument(
        "--storage",
        help="where trials keep checkpoints, as a URI Ray supports (s3://bucket/path, gs://...), under STORAGE/NAME/; for a cluster whose nodes share no filesystem with a folder --results (default: inside the sweep folder, or URI/NAME/ when --results is a URI)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the searcher, the split (the same for every trial) and each trial's weights and order, unless the space fixes or searches seed (default 0)",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="add --num-samples trials to the existing sweep NAME; the searcher learns from all earlier trials",
    )
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1 (off by default; it has no authentication)")
    _add_ship_code_option(p)
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write each trial's per-epoch figures and final metrics as TensorBoard event files under RESULTS/NAME/tensorboard/TRIAL_ID/, for `tensorboard --logdir RESULTS/NAME` (off by default; kept for resume)",
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help="also log each trial as an MLflow run at this tracking URI (a server, http://host:5000, or a store), in an experiment named after the sweep: its settings as params, per-epoch and final metrics, tagged asl_tune_trial_id; needs pip install 'asl-tune[mlflow]' (off by default; kept for resume)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray Tune's own status tables and log lines instead of asl-tune's one line per trial event and its status line",
    )
    p.set_defaults(func=cmd_sweep)


def _add_ship_code_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-ship-code",
        dest="ship_code",
        action="store_false",
        help="with --address: run the asl_tune installed on the cluster's nodes; by default the driver sends its own asl_tune package to the workers (Ray runtime_env py_modules), so nodes need only the dependencies",
    )


def _dataset_dir(args: argparse.Namespace) -> Path:
    if args.data is not None:
        return args.data
    from asl_tune.synth import ensure_default_dataset

    return ensure_default_dataset()


def cmd_train(args: argparse.Namespace) -> None:
    """asl-tune train: one trial, printed and optionally written as Parquet."""
    from asl_tune.data import load_dataset, load_external
    from asl_tune.results import save_trial
    from asl_tune.train import pick_device, train_trial

    config = _trial_config(args)
    if args.threads is not None and args.threads < 1:
        raise AslTuneError(f"--threads: must be >= 1, got {args.threads}")
    device = pick_device()  # refuses a bad ASL_TUNE_DEVICE before anything is decoded or created
    made = _outermost_missing(args.out) if args.out else None  # what making --out creates, --out's missing parents too
    weights = _weights_folder(args.out, time.strftime("train-%Y%m%d-%H%M%S")) if args.out else None
    try:
        dataset = load_dataset(_dataset_dir(args), config.image_size)
        external = load_external(args.external, dataset.classes, config.image_size) if args.external else None
        result = train_trial(config, dataset, external, threads=args.threads, checkpoint_dir=weights, device=device)
    except BaseException:
        if weights is not None:  # leave --out as it was: no weights folder without its results row
            shutil.rmtree(made or weights, ignore_errors=True)
        raise
    if args.out:
        path = save_trial(args.out, result, trial_id=weights.name, checkpoint=str(weights.resolve()))
        print(f"results written to {path}; weights in {weights}", file=sys.stderr)
    print_result(result.final, as_json=args.json)


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder that making `path` would create (a/b/c with only a/ there: a/b), or None when path exists."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _weights_folder(out: Path, trial_id: str) -> Path:
    """A new folder OUT/<trial id>/ for the trial's checkpoint.pt, made before training so an unwritable --out fails at once."""
    for n in range(1, 100):
        folder = out / (trial_id if n == 1 else f"{trial_id}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise AslTuneError(f"--out: cannot write to {out}: {e.strerror or e}") from None
    raise AslTuneError(f"--out: {out} already holds 99 trials named {trial_id}*")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """asl-tune evaluate: a trained network's accuracy and confusions on another set of images."""
    from asl_tune.data import load_external
    from asl_tune.evaluate import score
    from asl_tune.train import load_trained, pick_device

    try:
        net = load_trained(args.weights)
    except AslTuneError as e:
        raise AslTuneError(f"WEIGHTS: {e}") from None
    images = load_external(args.data, net.classes, net.config.image_size, option="--data")
    judged = score(net.model, images.images, images.labels, net.classes, pick_device())
    metrics = judged["metrics"]
    if args.json:
        print_result({**metrics, "per_class": judged["per_class"]}, as_json=True)
        return
    print(
        f"accuracy           {metrics['accuracy']:.4f} on {metrics['images']} images ({len(net.classes)} classes; chance {1 / len(net.classes):.4f})"
    )
    print_pairs(metrics)
    present = [r for r in judged["per_class"] if r["support"]]
    worst = sorted(present, key=lambda r: r["recall"])[:5]
    print("worst recall       " + ", ".join(f"{r['class_name']} {r['recall']:.1%}" for r in worst))


def print_result(final: dict, as_json: bool) -> None:
    """The final metrics: a short table, or one JSON object on the last line."""
    if as_json:
        print(json.dumps(_json_safe(final)))
        return
    for key in (
        "status",
        "val_accuracy",
        "test_accuracy",
        "external_accuracy",
        "train_img_per_s",
        "infer_img_per_s",
        "latency_ms_p50",
        "latency_ms_p95",
        "keeps_up_30fps",
        "n_parameters",
        "flops_per_image",
        "device",
    ):
        if key in final:
            v = final[key]
            print(f"{key:<18} {v:.4f}" if isinstance(v, float) else f"{key:<18} {v}")
    print_pairs(final)


def _json_safe(value):
    """value with every non-finite float, however deeply nested, as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_pairs(metrics: dict) -> None:
    """The confusion pairs that happened, most frequent first: "confusions  U->R 12.0%, ..."."""
    pairs = {k: v for k, v in metrics.items() if k.startswith("pair_") and isinstance(v, float) and v > 0}
    if pairs:
        print(
            "confusions        "
            + ", ".join(f"{k[5:].replace('_as_', '->')} {v:.1%}" for k, v in sorted(pairs.items(), key=lambda kv: -kv[1]))
        )


def cmd_sweep(args: argparse.Namespace) -> None:
    """asl-tune sweep: run (or extend) a sweep (api.sweep, which prints its progress)."""
    api.sweep(
        space=args.space,
        data=args.data,
        results=args.results,
        name=args.name,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        address=args.address,
        storage=args.storage,
        seed=args.seed,
        extend=args.extend,
        external=args.external,
        dashboard=args.dashboard,
        verbose=args.verbose,
        tensorboard=args.tensorboard,
        mlflow=args.mlflow,
        ship_code=args.ship_code,
    )


def cmd_resume(args: argparse.Namespace) -> None:
    """asl-tune resume: finish an interrupted sweep (api.resume)."""
    api.resume(args.name, args.results, args.address, verbose=args.verbose, ship_code=args.ship_code)


def cmd_slurm(args: argparse.Namespace) -> None:
    """asl-tune slurm: print the sbatch script (sweep/slurm.py)."""
    from asl_tune.sweep.slurm import script

    print(script(), end="")


def cmd_analyze(args: argparse.Namespace) -> None:
    """asl-tune analyze: write the reports (api.analyze) and print their summary."""
    print(api.analyze(args.names, args.results, args.objectives or None, args.speed_on, args.threads).text)


def cmd_data_check(args: argparse.Namespace) -> None:
    """asl-tune data check: decode through the cache and describe."""
    from asl_tune.data import describe, load_dataset

    if (why := check_value("image_size", args.image_size)) is not None:
        raise AslTuneError(f"--image-size: {why}, got {args.image_size}")
    sizes = [64, 200]
    if args.space is not None:  # checked before anything is decoded
        from asl_tune.sweep.request import image_sizes
        from asl_tune.sweep.space import load_space, resolve

        sizes += image_sizes(load_space(resolve(args.space)))
    print(describe(load_dataset(args.folder, args.image_size, what="folder"), split=args.split, sizes=tuple(sizes)))


def cmd_data_synth(args: argparse.Namespace) -> None:
    """asl-tune data synth: render the synthetic dataset."""
    from asl_tune.synth import render_dataset

    print(f"rendered {render_dataset(args.out, per_class=args.per_class, seed=args.seed)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one command; user errors become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except Stopped as e:
        print(f"asl-tune: stopped: {str(e).translate(_LINE_BREAKS)}", file=sys.stderr)
        return e.status
    except AslTuneError as e:  # bad input (2), trials errored (3), Ray failed (4): errors.py
        print(f"asl-tune: error: {str(e).translate(_LINE_BREAKS)}", file=sys.stderr)
        return e.status
    except OSError as e:  # a path the system refuses wherever it is first touched (a name too long): the path and why
        print(f"asl-tune: error: {str(e.filename or '').translate(_LINE_BREAKS)}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asl-tune: interrupted", file=sys.stderr)
        return 130
    return 0
