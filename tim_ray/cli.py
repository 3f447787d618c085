"""`tim-ray`: the command line. Each subcommand parses its arguments and hands over to the module that does the work.

Exit codes: 0 success; 2 usage or config error (one line on stderr, no traceback); 1 runtime failure (a damaged or
incomplete checkpoint or export, a file or directory the system refuses, and an object store or hub that cannot be
reached or does not answer within data.connect_timeout_s are one line on stderr too).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tim_ray import version
from tim_ray.artifacts.checksums import CheckpointError
from tim_ray.config import ConfigError, Derived, dump_toml, load_config
from tim_ray.data.records import StoreUnreachable

USAGE_ERROR = 2
RUNTIME_ERROR = 1


class UsageError(ValueError):
    """A bad command line that argparse cannot see (e.g. a missing file). Printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one line (argparse prints its usage block first); subcommand
    parsers are of this class too (add_subparsers uses the parent's)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a TOML file or built-in recipe name (`tim-ray config list`; default: "
                                            "the quickstart)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied in order")


def _resolve(args) -> tuple:
    """Split `CONFIG override...`: a first positional that contains '=' is an override, not a file."""
    positional = [a for a in [args.config, *args.overrides] if a is not None]
    config = None
    if positional and "=" not in positional[0]:
        config, positional = positional[0], positional[1:]
    if config is not None and not Path(config).exists():
        from tim_ray.recipes import find

        config = find(config) or config  # a built-in recipe's name; else load_config names the missing file
    return load_config(config, positional), config


def cmd_config_list(args) -> int:
    from tim_ray.recipes import description, recipes

    found = recipes()
    width = max(map(len, found))
    for name, path in found.items():
        print(f"{name:<{width}}  {description(path)}")
    return 0


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
    return launch(cfg, address=args.address, resume=args.resume, init_from=args.init_from,
                  init_ema=False if args.init_no_ema else None, verbose=args.verbose)


def cmd_precompute(args) -> int:
    cfg, _ = _resolve(args)
    from tim_ray.data.precompute import prepare_precompute, run_precompute
    from tim_ray.train.launch import start_ray

    data = prepare_precompute(cfg, args.out)  # before Ray starts: a bad source fails in seconds, writes nothing
    print(f"tim-ray precompute: {data.describe()}; {start_ray(cfg, args.address, args.verbose)}", flush=True)
    manifest = run_precompute(cfg, args.out, data=data)
    print(f"tim-ray precompute: wrote {args.out} ({manifest['rows']} rows); train on it with "
          f"data.precomputed={args.out}")
    return 0


def cmd_env(args) -> int:
    from tim_ray.env_report import environment_report

    print(environment_report(args.address))
    return 0


def _pair(text: str, flag: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} must be two numbers LO,HI, got '{text}'") from None
    return [lo, hi]


def _sample_settings(cfg, args, nfe: int | None = None):
    """cfg.sample with the command line's values, checked by the config's own rules."""
    from tim_ray.config import from_dict, to_dict

    given = {"nfe": nfe, "cfg_scale": args.cfg_scale, "stochasticity": args.stochasticity,
             "seed": args.seed, "mode": args.mode,
             "cfg_interval": _pair(args.cfg_interval, "--cfg-interval") if args.cfg_interval else None}
    tree = to_dict(cfg)
    tree["sample"].update({k: v for k, v in given.items() if v is not None})
    return from_dict(tree, source="the command line").sample


def _positive(**flags: int) -> None:
    for flag, value in flags.items():
        if value <= 0:
            raise UsageError(f"{flag} must be > 0, got {value}")


def _read_prompts(path: str) -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompts file '{path}': {exc.strerror if isinstance(exc, OSError) else exc}")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file '{path}' has no prompts (one per line)")
    return prompts


def cmd_sample(args) -> int:
    from tim_ray.eval.generate import ImagePipeline
    from tim_ray.eval.samples import SampleRequest, default_conditions, write_samples

    prompts = _read_prompts(args.prompts) if args.prompts else list(args.prompt or [])
    labels = list(args.labels or [])
    _positive(**{"--num": args.num, "--batch-size": args.batch_size})
    pipeline = ImagePipeline.open(args.checkpoint, ema=False if args.no_ema else None, device=args.device)
    cfg = pipeline.config
    settings = _sample_settings(cfg, args, args.nfe)
    if not prompts and not labels:
        prompts, labels = default_conditions(cfg)
    request = SampleRequest(prompts=prompts, labels=labels, per_condition=args.num,
                            height=cfg.data.height if args.height is None else args.height,
                            width=cfg.data.width if args.width is None else args.width,
                            config=settings, batch_size=args.batch_size)
    manifest = write_samples(pipeline, request, args.out)
    print(f"tim-ray sample: {len(manifest['images'])} images of {request.height}x{request.width} at "
          f"{settings.nfe} steps, cfg {settings.cfg_scale:g}, seed {settings.seed}, {manifest['weights']} weights "
          f"of step {manifest['step']} -> {args.out} (grid: {manifest['grid']})")
    return 0


def cmd_export(args) -> int:
    from tim_ray.artifacts.export import export_checkpoint, read_export_info

    out = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    step = read_export_info(out)["state"]["step"]
    print(f"tim-ray export: wrote {out} ({'EMA' if args.ema else 'trained'} weights of step {step})")
    return 0


def cmd_import(args) -> int:
    from tim_ray.train.importer import import_weights

    out = import_weights(args.source, args.out, ema=not args.no_ema, official_config=args.official_config,
                         arch=args.arch, keep_projector=args.keep_projector, overrides=args.overrides)
    print(f"tim-ray import: wrote {out} ({'trained' if args.no_ema else 'EMA'} weights of {args.source}); sample "
          f"with `tim-ray sample {out}`, fine-tune with `tim-ray train RECIPE --init-from {out}`")
    return 0


def _add_import_parser(sub) -> None:
    p = sub.add_parser("import", help="turn released TiM weights into an export that sample/eval/train take")
    p.add_argument("source", help="a .safetensors/.pt/.bin file or directory, or a hub id owner/name[/file]")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config keys to set in the export (e.g. model.codec=/path/to/vae)")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, config.toml, export.json)")
    p.add_argument("--config", dest="official_config", metavar="YAML",
                   help="the official training config (configs/c2i/*.yaml or configs/t2i/*.yaml of the TiM repo)")
    p.add_argument("--arch", help="the architecture, without an official config (tim-tiny, B/4, XL/2, XL/1, T2I-XL/1)")
    p.add_argument("--no-ema", action="store_true",
                   help="import the trained (raw) weights; default the EMA weights")
    p.add_argument("--keep-projector", action="store_true", help="keep the REPA projector (default: drop it)")
    p.set_defaults(run=cmd_import)


def _add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a checkpoint at any number of steps")
    p.add_argument("checkpoint", help="a checkpoint, run or export directory")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for more)")
    given.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")
    given.add_argument("--class", dest="labels", action="append", type=int, metavar="K",
                       help="a class label of a class-conditional model (repeat for more)")
    _add_sampling_args(p)
    p.add_argument("--nfe", type=int, help="sampling steps (default: the checkpoint's sample.nfe)")
    p.add_argument("--height", type=int, help="image height (default: the training data.height)")
    p.add_argument("--width", type=int, help="image width (default: the training data.width)")
    p.add_argument("--num", type=int, default=1, help="images per prompt or label (default 1)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=cmd_sample)


def _add_sampling_args(p) -> None:
    """Flags that sample and eval share; each defaults to the checkpoint's [sample] section."""
    p.add_argument("--cfg", dest="cfg_scale", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-interval", metavar="LO,HI", help="guide only for LO·T_max < t <= HI·T_max")
    p.add_argument("--stochasticity", type=float, help="noise injected per step (0 = deterministic, OT-FM only)")
    p.add_argument("--mode", help="transition (jump t -> next time) or diffusion (Euler on F(x, t, t))")
    p.add_argument("--seed", type=int, help="seed of the starting noise")
    p.add_argument("--batch-size", type=int, default=16, help="images per network batch (default 16)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights even when EMA weights exist")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got '{text}'") from None


def cmd_eval(args) -> int:
    from pathlib import Path

    from tim_ray.eval.evaluate import EvalRequest, evaluate
    from tim_ray.eval.generate import ImagePipeline
    from tim_ray.eval.report import table, write_report

    nfe = _int_list(args.nfe, "--nfe") if args.nfe else None
    metrics = [m.strip() for text in args.metric or [] for m in text.split(",") if m.strip()]
    _positive(**{"--batch-size": args.batch_size})
    pipeline = ImagePipeline.open(args.checkpoint, ema=False if args.no_ema else None, device=args.device)
    cfg, loaded = pipeline.config, pipeline.loaded
    request = EvalRequest(nfe=nfe or list(cfg.eval.nfe), metrics=metrics or list(cfg.eval.metrics),
                          num_samples=cfg.eval.num_samples if args.num_samples is None else args.num_samples,
                          seed=cfg.sample.seed if args.seed is None else args.seed,
                          sample=_sample_settings(cfg, args), batch_size=args.batch_size, inception=args.inception)
    if args.out:
        out = Path(args.out)
    elif loaded.run_dir is not None:
        out = loaded.run_dir / "eval" / f"step_{loaded.state.step:07d}"
    else:
        out = Path("eval") / f"{cfg.train.name}-step{loaded.state.step}"
    print(f"tim-ray eval: {loaded.source} ({loaded.weights} weights, step {loaded.state.step}): "
          f"{', '.join(request.metrics)} at NFE {request.nfe}, {request.num_samples} samples", flush=True)
    results, rows = evaluate(pipeline, request, progress=lambda line: print(line, flush=True))
    tracker = write_report(results, rows, cfg, loaded, out, args.tracking_uri)
    print(table(results))
    print(f"tim-ray eval: wrote {out}/ (eval.json, quality_vs_nfe.png, samples.png); mlflow run {tracker.run_id} "
          f"at {tracker.uri}")
    return 0


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a checkpoint at several step counts")
    p.add_argument("checkpoint", help="a checkpoint, run or export directory")
    p.add_argument("--nfe", metavar="N,N,...", help="step counts (default: the checkpoint's eval.nfe)")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="fid, kid, class_agreement, fid_inception, kid_inception, shapes, consistency "
                        "(repeat or comma-separate; default: the checkpoint's eval.metrics)")
    p.add_argument("--num-samples", type=int, help="images per NFE (default: the checkpoint's eval.num_samples)")
    p.add_argument("--inception", metavar="PATH", help="a TorchScript Inception for fid_inception/kid_inception")
    p.add_argument("--tracking-uri", help="MLflow URI for the eval run (default: the training run's store if "
                                          "recorded, else a sqlite file in --out)")
    p.add_argument("--out", help="output directory (default: <run dir>/eval/step_<step>)")
    _add_sampling_args(p)
    p.set_defaults(run=cmd_eval)


def cmd_tune(args) -> int:
    cfg, _ = _resolve(args)
    from tim_ray.tune.sweep import SweepRequest, run_sweep

    request = SweepRequest(space=args.space, num_samples=args.num_samples, scheduler=args.scheduler,
                           search=args.search, max_concurrent=args.max_concurrent, resume=args.resume, seed=args.seed)
    return run_sweep(cfg, request, address=args.address, verbose=args.verbose)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="sweep the (t, r) sampling distribution with Ray Tune")
    _add_config_args(p)
    p.add_argument("--space", required=True, metavar="SPACE.toml", help="the config keys to sweep and their ranges")
    p.add_argument("--num-samples", type=int, default=8, metavar="N", help="trials (default 8)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha: stop poor trials at evaluations (default); fifo: train every trial to the end")
    p.add_argument("--search", choices=("optuna", "random"), default="optuna", help="how trials are drawn")
    p.add_argument("--max-concurrent", type=int, default=1, metavar="K",
                   help="trials at a time (default 1; Tune does not count the Train workers of a trial)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's draws (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this train.name")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    _add_verbose_arg(p)
    p.set_defaults(run=cmd_tune)


def _add_verbose_arg(p) -> None:
    """train, tune and precompute: what they show of Ray's output is set in one place (tim_ray.ray_output)."""
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output (its workers' logs, '(raylet)' messages, Ray Tune's and Ray "
                        "Data's progress, INFO lines); by default it stays in Ray's log files and tim-ray prints "
                        "its own lines only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tim-ray",
        description="Train Transition Models (TiM) on Ray: any-step text-to-image generation.",
    )
    parser.add_argument("--version", action="version", version=f"tim-ray {version()}")
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
    p.add_argument("--init-from", metavar="EXPORT_OR_CHECKPOINT",
                   help="start from these weights (an export, checkpoint or run directory) with a fresh optimizer "
                        "at step 0: fine-tuning")
    p.add_argument("--init-no-ema", action="store_true",
                   help="with --init-from: take the trained weights even when EMA weights exist")
    _add_verbose_arg(p)
    p.set_defaults(run=cmd_train)

    _add_import_parser(sub)
    _add_sample_parser(sub)
    _add_eval_parser(sub)
    _add_tune_parser(sub)
    p = sub.add_parser("export", help="gather a distributed checkpoint into one safetensors file")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, config.toml, export.json)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("precompute", help="encode a dataset once into parquet shards (+ manifest.json)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (must not hold a precompute already)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    _add_verbose_arg(p)
    p.set_defaults(run=cmd_precompute)

    p = sub.add_parser("config", help="show or validate a resolved config")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = csub.add_parser("list", help="the built-in recipes, with what each is for")
    q.set_defaults(run=cmd_config_list)
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `tim-ray train CFG --dry-run a=b`: argparse ends the positionals at the first option; overrides after it
    # are still overrides.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except (ConfigError, UsageError) as exc:
        print(f"tim-ray: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (CheckpointError, StoreUnreachable) as exc:
        print(f"tim-ray: error: {exc}", file=sys.stderr)
        return RUNTIME_ERROR
    except OSError as exc:
        if exc.errno is None:  # not the system's refusal but a library's own error: keep its traceback
            raise
        # A file or directory the system refused: an --out that is read-only, a full disk (its error names no
        # file), a path that vanished.
        print(f"tim-ray: error: {f'{exc.filename}: ' if exc.filename else ''}{exc.strerror}", file=sys.stderr)
        return RUNTIME_ERROR
    except KeyboardInterrupt:
        print("tim-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
