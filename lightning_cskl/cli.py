"""The ``cskl`` command: parser and dispatch. Whole continual-learning runs from a YAML config, every key
overridable.

    cskl run                                       # the embedded default: Split Digits, class-incremental, CsKO
    cskl run --config configs/fmnist_class.yaml    # a shipped config
    cskl run --engine.channel_ratio 0.5 --method naive --train.epochs 3
    cskl run --config configs/digits.yaml --print_config

A subcommand is one function taking one config dataclass, registered in :data:`SUBCOMMANDS`; jsonargparse
turns the dataclass into ``--group.key`` options, ``--config FILE.yaml`` and ``--print_config`` (LightningCLI
conventions). Bad input ends with one line on stderr and exit status 2, never a traceback. The work itself
lives elsewhere: :func:`lightning_cskl.avalanche.job.run` (``run``), :func:`lightning_cskl.experiments.bench.bench`
(``bench``), :func:`lightning_cskl.experiments.study.run_study` (``study``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from .experiments.bench import BenchConfig, bench
from .experiments.study import StudyConfig, run_study
from .options import DataOptions, ModelOptions, RunConfig, StrategyOptions, TrainOptions, UsageError, WandbOptions

__all__ = ["BenchConfig", "DataOptions", "ModelOptions", "RunConfig", "StrategyOptions", "TrainOptions",
           "WandbOptions", "bench", "main", "run"]


def run(config: RunConfig) -> dict[str, Any]:
    """``cskl run``: :func:`lightning_cskl.avalanche.job.run` with every method of the comparison registry."""
    import functools

    from .avalanche.job import run as run_job
    from .experiments.baselines import METHODS, build_method

    return run_job(config, {name: functools.partial(build_method, name) for name in METHODS})


# ---------------------------------------------------------------------------------------------- the command
SUBCOMMANDS: dict[str, tuple[type, Callable[[Any], Any], str]] = {
    "run": (RunConfig, run, "a continual-learning run (default: Split Digits, class-incremental, CsKO)"),
    "bench": (BenchConfig, bench, "every method side by side: accuracy, memory, FLOPs, step time (tables + plots)"),
    "study": (StudyConfig, run_study, "knowledge intensity of each kernel tap per depth: table, heatmaps"),
}


def build_parser():
    """The ``cskl`` parser: one subcommand per entry of :data:`SUBCOMMANDS`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="cskl", description="Center-Sensitive Kernel Optimization: continual learning runs",
                            exit_on_error=False)
    commands = parser.add_subcommands(required=True, dest="subcommand")
    for command, (config_type, _, help_text) in SUBCOMMANDS.items():
        sub = ArgumentParser(prog=f"cskl {command}", description=help_text, exit_on_error=False)
        sub.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config (configs/*.yaml)")
        sub.add_class_arguments(config_type, nested_key=None, fail_untyped=True)
        commands.add_subcommand(command, sub, help=help_text)
    return parser


def _without_empty_configs(args: list[str]) -> list[str]:
    """Drop ``--config FILE`` arguments whose file is empty or holds only comments: an empty config sets nothing
    (jsonargparse would answer ``Unexpected config:``)."""
    def empty(path: str) -> bool:
        try:
            return not any(line.strip() and not line.lstrip().startswith("#") for line in Path(path).read_text().splitlines())
        except (OSError, UnicodeDecodeError):
            return False  # missing or unreadable: jsonargparse says so itself

    kept: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-c", "--config") and index + 1 < len(args) and empty(args[index + 1]):
            index += 2
            continue
        if arg.startswith("--config=") and empty(arg.split("=", 1)[1]):
            index += 1
            continue
        kept.append(arg)
        index += 1
    return kept


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``cskl`` console script (``argv`` for in-process use, e.g. tests)."""
    from jsonargparse import ArgumentError

    os.environ.setdefault("WANDB_SILENT", "true")
    parser = build_parser()
    args = _without_empty_configs(list(sys.argv[1:] if argv is None else argv))
    try:
        parsed = parser.parse_args(args)
        command = parsed.subcommand
        config_type, function, _ = SUBCOMMANDS[command]
    except ArgumentError as error:
        _fail("cskl", str(error))
    try:
        instantiated = parser.instantiate(parsed)[command]
    except ValueError as error:  # a config dataclass refused a value in __post_init__ (e.g. channel_ratio)
        _fail(f"cskl {command}", str(error))
    values = {k: v for k, v in instantiated.items() if k in config_type.__dataclass_fields__}
    try:
        config = config_type(**values)
    except ValueError as error:  # __post_init__ checks of the config dataclass
        _fail(f"cskl {command}", str(error))
    _execute(f"cskl {command}", function, config)


def _execute(prog: str, function: Callable[[Any], Any], config: Any) -> None:
    from .avalanche import CheckpointError, EmptyExperienceError, NoDataError
    from .core import NoEligibleLayerError
    from .data import DataNotFoundError

    try:
        function(config)
    except (DataNotFoundError, NoDataError, EmptyExperienceError, NoEligibleLayerError, UsageError,
            CheckpointError) as error:
        _fail(prog, str(error))
    except OSError as error:  # a file could not be written (a full disk, a read-only folder)
        _fail(prog, error.strerror if error.strerror and "could not write" in error.strerror else str(error))


if __name__ == "__main__":
    main()
