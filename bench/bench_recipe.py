"""AP-MAE's two recipes on the same maps and budget: validation MSE against the trivial
predictors and against each other, time per step, over seeds.

    python bench/bench_recipe.py RUN [--seeds 0,1,2] [--steps 200] [--batch-size 64]
        [--variant name:key=value:key=value ...]

RUN holds captured training maps (e.g. the demo's: ``apmae pipeline --config
configs/demo.yaml`` with ``stages: [mine, capture_train]``).  Each variant trains the
``tiny`` preset (or ``--preset``) from scratch per seed into ``--work`` and reads the
validation MSE and the baselines training logs on the same validation maps and masks.
Writes ``bench/results/recipe-<machine>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apmae_gpu.model import training  # noqa: E402
from bench.common import save  # noqa: E402

DEFAULT_VARIANTS = ["reference:recipe=reference", "improved:recipe=improved"]


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> tuple[str, dict]:
    name, *items = spec.split(":")
    return name, {k: _value(v) for k, v in (i.split("=", 1) for i in items)}


def run_variant(run: str, work: Path, name: str, kw: dict, seed: int, args) -> dict:
    settings = dict(preset=args.preset, steps=args.steps, batch_size=args.batch_size, **kw)
    t0 = time.perf_counter()
    s = training.train(run, out=work / f"{name}-{seed}", device=args.device, seed=seed,
                       **settings)
    seconds = time.perf_counter() - t0
    best = min(s["val_visible_mean"], s["val_dataset_mean"])
    return {"variant": name, "seed": seed, "val_mse": s["val_loss"],
            "visible_mean": s["val_visible_mean"], "dataset_mean": s["val_dataset_mean"],
            "vs_best_trivial": s["val_loss"] / best - 1, "seconds": seconds,
            "s_per_step": seconds / args.steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("bench/out/recipe"))
    ap.add_argument("--variant", action="append", default=None)
    args = ap.parse_args(argv)
    rows = [run_variant(args.run, args.work, name, kw, int(seed), args)
            for name, kw in map(parse_variant, args.variant or DEFAULT_VARIANTS)
            for seed in args.seeds.split(",")]
    figures = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        vals = [r["val_mse"] for r in rows if r["variant"] == name]
        rel = [r["vs_best_trivial"] for r in rows if r["variant"] == name]
        figures[name] = {"val_mse_mean": statistics.mean(vals),
                         "vs_best_trivial_mean": statistics.mean(rel),
                         "wins": sum(x < 0 for x in rel), "seeds": len(rel)}
    save("recipe", figures, rows, notes=[f"{args.preset}, {args.steps} steps x "
                                         f"{args.batch_size} maps, run {args.run}"])


if __name__ == "__main__":
    main()
