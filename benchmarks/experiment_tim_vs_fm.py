"""Issues 8 and 18: TiM vs flow matching, model guidance and MeanFlow at equal training compute (docs/results.md).

The models are trained with `tim-ray train` and scored with `tim-ray eval`; this script only drives the evals,
computes the noise floors, and turns the eval.json files into tables and plots.

    .venv/bin/python benchmarks/experiment_tim_vs_fm.py eval RUN [RUN ...]   # tim-ray eval per run and seed
    .venv/bin/python benchmarks/experiment_tim_vs_fm.py floor                # real-vs-real FID/KID/agreement
    .venv/bin/python benchmarks/experiment_tim_vs_fm.py report               # tables (stdout) + docs/img plots
    .venv/bin/python benchmarks/experiment_tim_vs_fm.py check-fm-consistency # the FM's consistency with r := t
    .venv/bin/python benchmarks/experiment_tim_vs_fm.py compute              # each config's forwards per step

RUN is a config name in configs/experiments/ (<dataset>_<objective> for dataset fmnist or shapes and objective
tim, tim_mg, fm or meanflow); its run directory is /tmp/exp/RUN (train.output_dir of those configs) and its evals
go to /tmp/exp/eval/RUN/seed<k>/. Each config's steps give every run the same forward-equivalents
(transition.objectives' forwards_per_row x steps; `compute` prints them); the measured step cost decides.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXP = Path("/tmp/exp")
NFE = [1, 2, 4, 8, 16, 32]
SEEDS = [0, 1, 2]
SAMPLES = 256
METRICS = {"fmnist": ["fid", "kid", "class_agreement", "consistency"], "shapes": ["shapes"]}
HEADLINE = {"fmnist": ["fid", "class_agreement"], "shapes": ["shapes"]}
LOWER_IS_BETTER = {"fid", "kid", "consistency"}
RUNS = {"TiM": "tim", "TiM+MG": "tim_mg", "FM": "fm", "MeanFlow": "meanflow"}  # label -> config suffix
STYLES = ["o-", "^-", "s--", "d:"]


def eval_command(run: str, seed: int, ema: bool = False) -> list[str]:
    """The trained weights by default (--no-ema), the same choice for both models: an EMA of decay 0.99 holds
    0.99^k of the zero-initialised output after k steps, which skews short runs (docs/results.md); --ema evaluates
    the EMA weights into eval_ema/."""
    dataset = run.split("_")[0]
    return [str(ROOT / ".venv/bin/tim-ray"), "eval", str(EXP / run), "--nfe", ",".join(map(str, NFE)),
            "--metric", ",".join(METRICS[dataset]), "--num-samples", str(SAMPLES), "--seed", str(seed),
            "--batch-size", "128", *([] if ema else ["--no-ema"]),
            "--out", str(EXP / ("eval_ema" if ema else "eval") / run / f"seed{seed}")]


def cmd_eval(runs: list[str], seeds: list[int], ema: bool = False) -> None:
    for run in runs:
        for seed in seeds:
            command = eval_command(run, seed, ema)
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            log = EXP / ("eval_ema" if ema else "eval") / run / f"seed{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(" ".join(command) + "\n" + done.stdout + done.stderr)
            print(f"{run} seed {seed}: rc {done.returncode}, {seconds:.0f} s", flush=True)
            with open(EXP / "eval_walltimes.txt", "a") as f:
                f.write(f"{run} seed{seed}{' ema' if ema else ''} rc={done.returncode} wall_s={seconds:.1f}\n")


def cmd_floor() -> None:
    """Real vs real at the eval's sample count: SAMPLES training-split images (three disjoint slices) against the
    10,000 test images that `tim-ray eval` compares with, through the same feature network; and the classifier's
    agreement on those real images. What a perfect generator would score here."""
    import torch

    from tim_ray.eval.distances import extract_features, feature_distances
    from tim_ray.eval.evaluate import REFERENCE_IMAGES
    from tim_ray.eval.fashion import class_agreement, load_feature_net, reference_images

    net = load_feature_net()
    real, _ = reference_images("test", REFERENCE_IMAGES, 32, 32)
    real_features = extract_features(net, real)
    train, labels = reference_images("train", 3 * SAMPLES, 32, 32)
    rows = []
    for k in range(3):
        part = slice(k * SAMPLES, (k + 1) * SAMPLES)
        scores = feature_distances(real_features, extract_features(net, train[part]), ("fid", "kid"), seed=k)
        scores["class_agreement"] = class_agreement(net, train[part], labels[part].tolist())
        rows.append(scores)
        print(f"train images {part.start}-{part.stop - 1} vs test split: {scores}")
    out = {name: [r[name] for r in rows] for name in rows[0]}
    (EXP / "floor.json").write_text(json.dumps({"num_samples": SAMPLES, **out}, indent=1))
    print({k: f"{statistics.mean(v):.3g} ± {statistics.stdev(v):.2g}" for k, v in out.items()})
    del torch


def load_results(run: str) -> list[dict]:
    return [json.loads((EXP / "eval" / run / f"seed{s}" / "eval.json").read_text()) for s in SEEDS
            if (EXP / "eval" / run / f"seed{s}" / "eval.json").is_file()]


def summary(results: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(mean, std) over seeds per NFE; NFE-independent metrics are repeated across NFE."""
    means, stds = [], []
    for n in NFE:
        values = [r["nfe_independent"][metric] if metric in r["nfe_independent"] else r["by_nfe"][str(n)][metric]
                  for r in results]
        means.append(statistics.mean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else float("nan"))
    return means, stds


def cmd_report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for dataset in ("fmnist", "shapes"):
        runs = {name: load_results(f"{dataset}_{suffix}") for name, suffix in RUNS.items()}
        runs = {name: results for name, results in runs.items() if results}
        if "TiM" not in runs or len(runs) < 2:
            print(f"{dataset}: evals missing")
            continue
        per_nfe = [m for m in METRICS[dataset] if m != "consistency"]
        print(f"\n## {dataset} (seeds " + " / ".join(f"{name} {[r['seed'] for r in res]}" for name, res in runs.items())
              + f", {runs['TiM'][0]['num_samples']} samples per NFE)")
        print("| NFE | " + " | ".join(f"{m} {name}" for m in per_nfe for name in runs) + " |")
        print("|---|" + "---|" * len(per_nfe) * len(runs))
        stats = {(name, m): summary(res, m) for name, res in runs.items() for m in per_nfe}
        for i, n in enumerate(NFE):
            cells = []
            for m in per_nfe:
                for name in runs:
                    mean, std = stats[(name, m)][0][i], stats[(name, m)][1][i]
                    fmt = ".3f" if m in ("class_agreement", "shapes") else ".2f"
                    cells.append(f"{mean:{fmt}} ± {std:{fmt}}")
            print(f"| {n} | " + " | ".join(cells) + " |")
        if dataset == "shapes":
            categories = sorted(k for k in runs["TiM"][0]["by_nfe"]["1"] if k.startswith("shapes."))
            print(f"\nper category (mean over seeds), {' / '.join(runs)}:")
            print("| NFE | " + " | ".join(c.split(".", 1)[1] for c in categories) + " |")
            print("|---|" + "---|" * len(categories))
            for n in NFE:
                cells = [" / ".join(f"{summary(res, c)[0][NFE.index(n)]:.2f}" for res in runs.values())
                         for c in categories]
                print(f"| {n} | " + " | ".join(cells) + " |")
        for name, res in runs.items():
            for key in res[0]["nfe_independent"]:
                if "." not in key:
                    values = [r["nfe_independent"][key] for r in res]
                    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else " (one seed)"
                    print(f"{name} {key}: {statistics.mean(values):.4f}{spread}")
        headline = HEADLINE[dataset]
        fig, axes = plt.subplots(1, len(headline), figsize=(4.6 * len(headline), 3.6), squeeze=False)
        floor = json.loads((EXP / "floor.json").read_text()) if (EXP / "floor.json").is_file() else None
        for ax, m in zip(axes[0], headline):
            for name, style in zip(runs, STYLES):
                mean, std = stats[(name, m)]
                ax.errorbar(NFE, mean, yerr=std, fmt=style, capsize=3, label=name)
            if dataset == "fmnist" and floor and m in floor:
                ax.axhline(statistics.mean(floor[m]), color="grey", lw=0.8, ls=":", label="real data")
            ax.set_xscale("log", base=2)
            ax.set_xticks(NFE, [str(n) for n in NFE])
            ax.set_xlabel("sampling steps (NFE before CFG doubling)")
            ax.set_title(f"{m} ({'lower' if m in LOWER_IS_BETTER else 'higher'} is better)")
            ax.legend()
        fig.suptitle(f"{dataset}: {', '.join(runs)} at equal training compute "
                     f"(mean ± std over {len(runs['TiM'])} eval seeds)", fontsize=9)
        fig.tight_layout()
        out = ROOT / "docs" / "img" / f"results_{dataset}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")


def cmd_check_fm_consistency() -> None:
    """tim-ray's consistency metric queries F(x, t, r) with r < t. A flow-matching net never saw r ≠ t, so that
    reads its untrained Δt embedding. Here the FM's consistency is also computed the way its sampler uses it:
    the jump t → r taken with r := t inside the network (Euler with the instantaneous velocity)."""
    import torch

    from tim_ray.eval.consistency import composition_error
    from tim_ray.eval.evaluate import eval_targets
    from tim_ray.eval.generate import ImagePipeline

    for run in ("fmnist_fm", "fmnist_tim"):
        pipeline = ImagePipeline.open(EXP / run, device="cpu")
        targets = eval_targets(pipeline.config, 64)
        cond, _ = pipeline.conditions(targets.prompts, targets.labels)
        model = pipeline.model

        def as_velocity(x, t, r, **c):
            return model(x, t, t, **c)

        for seed in SEEDS:
            noise = pipeline.noise(64, 32, 32, seed)
            with torch.no_grad():
                native = composition_error(model, pipeline.path, noise, cond)["consistency"]
                euler = composition_error(as_velocity, pipeline.path, noise, cond)["consistency"]
            print(f"{run} seed {seed}: consistency with F(x,t,r) {native:.4f}; with F(x,t,t) (Euler jumps) {euler:.4f}")


def cmd_compute() -> None:
    """Forward-equivalents per row of a step (docs/math.md §7) and in the whole run, per experiment config."""
    from tim_ray.config import load_config
    from tim_ray.transition.objectives import get_objective

    for path in sorted((ROOT / "configs" / "experiments").glob("*.toml")):
        cfg = load_config(path)
        per_row = get_objective(cfg.transition.objective).forwards_per_row(cfg.transition)
        print(f"{path.stem}: {cfg.transition.objective}, {per_row:g} forwards per row x {cfg.train.steps} steps = "
              f"{per_row * cfg.train.steps:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["eval", "floor", "report", "check-fm-consistency", "compute"])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--ema", action="store_true", help="eval: the EMA weights (default: the trained weights)")
    args = parser.parse_args()
    if args.command == "eval":
        cmd_eval(args.runs, [int(s) for s in args.seeds.split(",")], args.ema)
    elif args.command == "floor":
        cmd_floor()
    elif args.command == "report":
        cmd_report()
    elif args.command == "compute":
        cmd_compute()
    else:
        cmd_check_fm_consistency()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
