"""The `spec-harness` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)`: it adds a parser and sets `func` (a callable taking the parsed args and
returning an exit status)."""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.errors import UserError

# Modules that provide subcommands, in the order `spec-harness --help` lists them.
COMMANDS = (
    "harness.run_cli",
    "harness.reports.summary", "harness.reports.report", "harness.reports.specbench", "harness.calibrate", "harness.profile",
    "harness.selfspec_search",
    "harness.training.train_head", "harness.drafters.interop", "harness.targets.subset", "harness.meter.ngram_base", "harness.meter.surplus", "harness.meter.probe",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spec-harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"spec-harness: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spec-harness: interrupted; finished prompts are kept (rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
