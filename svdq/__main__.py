"""Command line: python -m svdq {demo,info,build} ..."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from .format import CheckpointError, inspect_checkpoint
    try:
        config, quant, layers = inspect_checkpoint(args.path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kinds = {}
    for spec in layers.values():
        kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
    print(json.dumps({"config": config.to_dict(), "quant": quant, "layers": kinds}, indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m svdq", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="quantize a tiny FLUX model and render an image (no downloads)",
                   add_help=False)
    sub.add_parser("build", help="prebuild the CUDA kernels (same as python -m svdq.build)",
                   add_help=False)
    p = sub.add_parser("info", help="validate a checkpoint and print its header")
    p.add_argument("path")
    if argv and argv[0] in ("demo", "build"):
        rest = argv[1:]
        if argv[0] == "demo":
            from . import demo
            return demo.main(rest) or 0
        from . import build
        return build.main(rest) or 0
    args = parser.parse_args(argv)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
