"""The trainer's command line, generated from :class:`~examples.engine.config.TrainConfig`.

Each config field with ``cli`` metadata becomes one option, with the field's default and help;
the few options that are not config fields (``--preset``, ``--fold`` with ``all``,
``--folds``, ``--verify-data``) are added here. :func:`config_for` turns the parsed arguments
back into one fold's and one method's `TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from examples.engine.config import GROUPS, PRESETS, TrainConfig

__all__ = ["build_parser", "config_for", "parse_args"]


def _dest(f: dataclasses.Field[Any]) -> str:
    """The argparse destination of a config field: ``no_fpa`` for ``fpa``'s ``--no-fpa``."""
    meta = f.metadata["cli"]
    return meta["flag"][2:].replace("-", "_") if meta["flag"] else f.name


def _add(group: Any, f: dataclasses.Field[Any]) -> None:
    meta = f.metadata["cli"]
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    action = meta["action"]
    if action in ("invert", "store_true"):
        group.add_argument(flag, action="store_true", help=meta["help"])
    elif action == "optional":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
    else:
        kind = meta["kind"] or type(f.default)
        group.add_argument(flag, type=kind, default=f.default, choices=meta["choices"], metavar=meta["metavar"],
                           help=meta["help"])


def build_parser(description: str | None = None, preset: str = "paper") -> argparse.ArgumentParser:
    """The parser of ``python -m examples.train_busi``, with ``preset``'s values as defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="named settings applied first, any flag given overrides them: 'paper' (the defaults below, a GPU "
                        "job) or 'cpu' (" + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["cpu"].items()) + ")")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        if "cli" in f.metadata:
            _add(groups[f.metadata["cli"]["group"]], f)
    data = groups["data"]
    data.add_argument("--fold", default="0", help="fold index, or 'all' for every fold (default %(default)s)")
    data.add_argument("--folds", choices=["all"], default=None,
                      help="'all': run every fold of the split and print the paper's table, mean ± std over folds "
                           "(same as --fold all)")
    data.add_argument("--verify-data", action="store_true",
                      help="decode every image and mask once before training (a progress bar), so a corrupt file "
                           "stops the run at the start with its name instead of in the middle")
    p.set_defaults(**PRESETS[preset])
    return p


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The trainer's arguments: ``--preset`` first, then every other flag over its values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p = build_parser(description, pre.parse_known_args(argv)[0].preset)
    args = p.parse_args(argv)
    if args.head_channels < 1:
        p.error(f"--head-channels must be >= 1, got {args.head_channels}")
    if not 0.0 <= args.ema < 1.0:
        p.error(f"--ema must be in [0, 1) (0: off), got {args.ema}")
    if args.average_epochs < 1:
        p.error(f"--average-epochs must be >= 1, got {args.average_epochs}")
    if args.precise_bn < 0:
        p.error(f"--precise-bn must be >= 0, got {args.precise_bn}")
    if args.fpa_kv_stride < 1:
        p.error(f"--fpa-kv-stride must be >= 1, got {args.fpa_kv_stride}")
    if not 0.0 <= args.phantom_hyperechoic <= 1.0:
        p.error(f"--phantom-hyperechoic must be in [0, 1], got {args.phantom_hyperechoic}")
    if not 0.0 <= args.unsup_weight < float("inf"):
        p.error(f"--unsup-weight must be a finite number >= 0, got {args.unsup_weight}")
    if args.unsup_rampup < 0:
        p.error(f"--unsup-rampup must be >= 0 (0: off), got {args.unsup_rampup}")
    if args.lesion_threshold is not None and not 0.0 <= args.lesion_threshold <= 1.0:
        p.error(f"--lesion-threshold must be in [0, 1], got {args.lesion_threshold}")
    if args.lesion_threshold is not None and args.reliability != "threshold":
        p.error(f"--lesion-threshold needs --reliability threshold, got {args.reliability}")
    return args


def config_for(args: argparse.Namespace, method: str, fold: int) -> TrainConfig:
    """One run's `TrainConfig` from the parsed arguments: every field from its option, and the
    three rules that are not one-to-one (the evaluation side falls back to ``--resize``, and
    SupOnly has no pre-training)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if "cli" in f.metadata:
            value = getattr(args, _dest(f))
            values[f.name] = (not value) if f.metadata["cli"]["action"] == "invert" else value
    config = TrainConfig(**{**values, "method": method, "fold": fold, "eval_size": args.eval_size or args.resize})
    if not config.semi_supervised:
        config.pretrain_epochs = 0
    return config
