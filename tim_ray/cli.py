"""`tim-ray`: the command line. Each subcommand parses its arguments and hands over to the module that does the work.

Exit codes: 0 success; 2 usage or config error (one line on stderr, no traceback); 1 runtime failure.
"""
from __future__ import annotations

import argparse
import sys

from tim_ray.config import ConfigError, Derived, dump_toml, load_config

USAGE_ERROR = 2
RUNTIME_ERROR = 1


class UsageError(ValueError):
    """A bad command line that argparse cannot see (e.g. a missing file). Printed as one line, exit 2."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a TOML recipe (default: the built-in quickstart)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied in order")


def _resolve(args) -> tuple:
    """Split `CONFIG override...`: a first positional that contains '=' is an override, not a file."""
    positional = [a for a in [args.config, *args.overrides] if a is not None]
    config = None
    if positional and "=" not in positional[0]:
        config, positional = positional[0], positional[1:]
    return load_config(config, positional), config


def cmd_config_show(args) -> int:
    cfg, _ = _resolve(args)
    print(dump_toml(cfg), end="")
    return 0


def cmd_config_validate(args) -> int:
    cfg, source = _resolve(args)
    derived = Derived.of(cfg)
    print(f"{source or 'built-in quickstart'}: valid (global batch {derived.global_batch}, lr {derived.lr:g})")
    return 0


def cmd_train(args) -> int:
    cfg, _ = _resolve(args)
    from tim_ray.train.launch import launch, resolve_resume

    if args.dry_run:
        from tim_ray.train.plan import describe_plan

        print(describe_plan(cfg, resolve_resume(cfg, args.resume), args.address))
        return 0
    return launch(cfg, address=args.address, resume=args.resume)


def cmd_precompute(args) -> int:
    cfg, _ = _resolve(args)
    from tim_ray.data.precompute import run_precompute
    from tim_ray.train.launch import start_ray

    print(f"tim-ray precompute: {start_ray(cfg, args.address)}", flush=True)
    manifest = run_precompute(cfg, args.out)
    print(f"tim-ray precompute: wrote {args.out} ({manifest['rows']} rows); train on it with "
          f"data.precomputed={args.out}")
    return 0


def cmd_env(args) -> int:
    from tim_ray.env_report import environment_report

    print(environment_report(args.address))
    return 0


def cmd_export(args) -> int:
    from tim_ray.train.export import export_checkpoint, read_export_info

    out = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    step = read_export_info(out)["state"]["step"]
    print(f"tim-ray export: wrote {out} ({'EMA' if args.ema else 'trained'} weights of step {step})")
    return 0


def _not_built(issue: str):
    def run(args) -> int:
        print(f"tim-ray {args.command}: not built yet ({issue})", file=sys.stderr)
        return RUNTIME_ERROR

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tim-ray",
        description="Train Transition Models (TiM) on Ray: any-step text-to-image generation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a TiM (default: the built-in CPU quickstart)")
    _add_config_args(p)
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: ray.address, then RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue this run from its latest checkpoint (default); never: refuse to touch an "
                        "existing run; PATH: start from that checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check everything, print the plan, and exit without training or writing")
    p.set_defaults(run=cmd_train)

    for name, text, issue in [
        ("sample", "draw images from a checkpoint at any number of steps", "the sampling/eval issue"),
        ("eval", "score a checkpoint at several step counts", "the sampling/eval issue"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(run=_not_built(issue))
    p = sub.add_parser("tune", help="sweep the (t, r) sampling distribution with Ray Tune")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=_not_built("the Ray Tune issue"))
    p = sub.add_parser("export", help="gather a distributed checkpoint into one safetensors file")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, config.toml, export.json)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("precompute", help="encode a dataset once into parquet shards (+ manifest.json)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (must not hold a precompute already)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    p.set_defaults(run=cmd_precompute)

    p = sub.add_parser("config", help="show or validate a resolved config")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = csub.add_parser("show", help="print the resolved config as TOML")
    _add_config_args(q)
    q.set_defaults(run=cmd_config_show)
    q = csub.add_parser("validate", help="check a config without running anything")
    _add_config_args(q)
    q.set_defaults(run=cmd_config_validate)

    p = sub.add_parser("env", help="versions, devices and the Ray cluster in use (paste this in bug reports)")
    p.add_argument("--address", default=None, help="the Ray cluster address to report on (default: RAY_ADDRESS)")
    p.set_defaults(run=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, UsageError) as exc:
        print(f"tim-ray: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("tim-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
