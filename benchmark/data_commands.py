"""``python -m benchmark data verify|convert``: check a dataset folder, convert raw downloads to the canonical forms."""
from __future__ import annotations

import argparse

from core.errors import EXIT_USER_ERROR


def add_parser(commands) -> None:
    data = commands.add_parser("data", help="verify a dataset folder or convert raw downloads (`data verify --help`)")
    actions = data.add_subparsers(dest="data_command", required=True)

    verify = actions.add_parser("verify", help="check a folder against the dataset's layout, lists, shapes, dtypes and labels")
    verify.add_argument("dataset", help="a dataset name (`list datasets`)")
    verify.add_argument("root", help="the dataset folder (what DATA_ROOT would be)")
    verify.add_argument("--layout-only", action="store_true", help="lists and file existence only (what every run checks)")
    verify.add_argument("--all", action="store_true", help="print every problem (default: the first 20)")
    verify.add_argument("--set", dest="options", action="append", default=[], metavar="data.KEY=VALUE",
                        help="one of the dataset's own data options, as for a run (endovis17: data.fold=1, "
                             "data.crop_black_borders=false, data.test_set=released); repeatable")

    from benchmark.catalogue import catalogue

    converters = catalogue()["converters"]  # without importing the datamodules (a fast --help)
    convert = actions.add_parser("convert", help="convert a raw public download into the form the suite trains on")
    convert.add_argument("kind", choices=sorted(converters), help="; ".join(f"{k}: {c['help']}" for k, c in sorted(converters.items())))
    convert.add_argument("source", help="the raw download's folder")
    convert.add_argument("target", help="the output folder (created; must be empty if it exists)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the random crop margins (LA) and list order")


def command_data(args: argparse.Namespace) -> int:
    if args.data_command == "verify":
        from datamodules import get_dataset
        from datamodules.verify import format_report, verify

        entry = get_dataset(args.dataset)  # an unknown name is a usage error, not a data problem
        result = verify(args.dataset, args.root, deep=not args.layout_only, options=data_options(args.dataset, entry, args.options))
        print(format_report(result, max_problems=10**9 if args.all else 20))
        return 0 if result.ok else EXIT_USER_ERROR
    from datamodules.convert import CONVERTERS

    written = CONVERTERS[args.kind].run(args.source, args.target, seed=args.seed)
    print(f"written: {written}")
    print(f"check it: python -m benchmark data verify {CONVERTERS[args.kind].dataset} {args.target}")
    return 0



def data_options(dataset: str, entry, overrides: list[str]) -> dict:
    """The dataset's data options with ``--set data.KEY=VALUE`` applied, type-checked by the run's own config
    machinery against the dataset's preset (so the verifier reads the split a run with the same options reads)."""
    from benchmark.config import parse_override, resolve_config
    from core.errors import UserError

    known = entry.datamodule.data_options
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] != "data" or len(path) != 2 or path[1] not in known:
            raise UserError(f"'{text}' is not a data option of {dataset}",
                            fix=f"its options: {', '.join(f'data.{k}' for k in sorted(known)) or 'none'}")
    data = resolve_config(dataset, "supervised", "paper", overrides, family=entry.family)["data"]
    return {key: data[key] for key in known if key in data}
