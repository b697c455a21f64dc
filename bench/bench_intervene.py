"""Intervention throughput: held-out inferences judged per second with per-sample head
ablation masks, against the same forwards without hooks.

    python bench/bench_intervene.py                 # tiny-llama and the embedded smollm2
    python bench/bench_intervene.py --models random:tiny-llama --batches 2

Each row: one model, batch size and mode (first token, or greedy multi-token completion with
the KV cache); prompts of ``--window`` random tokens; every sample of a batch gets its own
random set of ``k`` ablated heads (as when many conditions share a batch).  Writes
bench/results/intervene.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from apmae_gpu.capture.llm import family, load_model  # noqa: E402
from apmae_gpu.core.devices import (
    describe_machine,
    resolve_device,  # noqa: E402
)
from apmae_gpu.core.logs import versions
from apmae_gpu.intervention import ablation as I  # noqa: E402

OUT = Path(__file__).parent / "results"


def measure(model, fam, batch: int, n_batches: int, window: int, k: int, mode_tokens: int,
            ablate: bool, device: str, repeats: int = 3, seed: int = 0) -> float:
    """Inferences per second over ``n_batches`` timed batches (after one warm-up batch); the
    best of ``repeats`` timings (the machine is shared)."""
    rng = np.random.default_rng(seed)
    L, H = fam.n_layers, fam.n_heads
    n = batch * (n_batches + 1)
    inputs = [rng.integers(0, 49152, window).tolist() for _ in range(n)]
    masks = None
    if ablate:
        masks = np.zeros((n, L, H), dtype=bool)
        for i in range(n):
            masks[i].flat[rng.choice(L * H, k, replace=False)] = True
    n_tok = np.full(n, mode_tokens)
    multi = mode_tokens > 1
    I.predict(model, fam, inputs[:batch], n_tok[:batch],
              None if masks is None else masks[:batch], batch, device, multi)   # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        I.predict(model, fam, inputs[batch:], n_tok[batch:],
                  None if masks is None else masks[batch:], batch, device, multi)
        if device.startswith("cuda"):

            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return (n - batch) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="random:tiny-llama,smollm2")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batches", type=int, default=1, help="timed batches per row")
    ap.add_argument("--repeats", type=int, default=3, help="timings per row (best kept)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    for spec in args.models.split(","):
        t0 = time.perf_counter()
        model = load_model(spec, device=device)
        fam = family(model)
        load_s = round(time.perf_counter() - t0, 1)
        k = max(1, fam.n_layers * fam.n_heads // 10)
        plan = [(1, 1, False), (1, 1, True), (8, 1, False), (8, 1, True), (8, 4, True)]
        for batch, tokens, ablate in plan:
            ips = measure(model, fam, batch, args.batches, args.window, k, tokens, ablate, device,
                          args.repeats)
            rows.append(dict(model=spec, layers=fam.n_layers, heads=fam.n_heads, device=device,
                             window=args.window, batch=batch,
                             mode="first_token" if tokens == 1 else f"greedy {tokens} tokens",
                             ablation=f"per-sample k={k}" if ablate else "none",
                             inferences_per_s=round(ips, 2), load_s=load_s))
            print(rows[-1], flush=True)
        del model
    result = dict(machine=describe_machine(), versions=versions(), rows=rows,
                  notes="Random prompts (throughput does not depend on the tokens); best of "
                        f"{args.repeats} timings of {args.batches} batch(es) after a warm-up. The "
                        "machine is shared with other jobs: these are lower bounds on throughput.")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "intervene.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["model", "device", "window", "batch", "mode", "ablation", "inferences_per_s"]
    md = ["# Intervention throughput", "",
          f"Machine: {result['machine'].get('cpu', '?')}, {result['machine']['cpu_count']} cores"
          f"{', ' + result['machine']['gpu'] if 'gpu' in result['machine'] else ', no GPU'}.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    md += ["", result["notes"], ""]
    (OUT / "intervene.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
