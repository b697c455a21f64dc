"""The parts of ``bench/gpu_check.sh`` that no other bench covers, and its summary.

    python bench/gpu_check.py parity [--model random:starcoder2-3b] [--prompts 4] [--window 256]
        bf16 capture (the model's own q/k, probabilities in float32) against float32 eager
        attention (``output_attentions``) of the same random weights; the same greedy token.
    python bench/gpu_check.py encode [--maps 20000] [--batch-size 256]
        encode maps/s of an (untrained) paper-preset AP-MAE, bf16 autocast, 256x256 maps.
    python bench/gpu_check.py summary
        collects the results of the check into bench/results/gpu_check-<gpu>.{json,md}.

Each section writes ``bench/results/gpu_check_<section>-<machine>.json``; on a machine without
CUDA every section stops with a one-line message (exit code 2).
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

from common import RESULTS, machine_tag, save, sync  # noqa: E402


def _need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU (check nvidia-smi, CUDA_VISIBLE_DEVICES and "
              "that torch is a CUDA build)", file=sys.stderr)
        sys.exit(2)


def parity(args) -> dict:
    import torch

    from apmae_gpu import llm
    from apmae_gpu.capture import forward_with_maps

    _need_cuda()
    ids = torch.randint(100, 40000, (args.prompts, args.window),
                        generator=torch.Generator().manual_seed(0)).cuda()
    lm = llm.load_model(args.model, device="cuda", seed=0)          # bf16 on a GPU
    fam = llm.family(lm)
    logits, maps = forward_with_maps(lm, fam, ids, [None] * fam.n_layers, "none")
    got = maps.float().cpu()
    top_bf16 = logits.argmax(-1).cpu()
    del lm, maps
    torch.cuda.empty_cache()
    ref_lm = llm.load_model(args.model, device="cuda", seed=0, dtype=torch.float32,
                            attn_implementation="eager")
    ref_maps = []
    with torch.inference_mode():
        for b in range(args.prompts):   # one prompt at a time: eager fp32 maps are large
            out = ref_lm(input_ids=ids[b:b + 1], output_attentions=True, use_cache=False)
            ref_maps.append(torch.stack([a[0].float().cpu() for a in out.attentions]))
            top_ref = out.logits[0, -1].argmax().item()
            ref_maps[-1] = (ref_maps[-1], top_ref)
    ref = torch.stack([m for m, _ in ref_maps])
    diff = (got - ref).abs()
    row = {"model": args.model, "prompts": args.prompts, "window": args.window,
           "layers": fam.n_layers, "heads": fam.n_heads,
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "rows_sum_max_err": float((got.sum(-1) - 1).abs().max()),
           "same_top_token": int(sum(int(top_bf16[b]) == t for b, (_, t) in enumerate(ref_maps)))}
    row["ok"] = bool(np.isfinite(row["max_abs_diff"]) and row["max_abs_diff"] < 0.1
                     and row["rows_sum_max_err"] < 0.02)
    return row


def encode(args) -> dict:
    import torch

    from apmae_gpu.encoding import encode_maps
    from apmae_gpu.model import APMAEModel, preset_config
    from apmae_gpu.synthetic import synthetic_maps

    _need_cuda()
    model = APMAEModel(preset_config("paper")).eval().cuda()
    maps, _ = synthetic_maps(min(args.maps, 2048), 256, seed=0)
    reps = max(1, args.maps // len(maps))
    host = torch.from_numpy(maps)
    encode_maps(model, host[:args.batch_size], batch_size=args.batch_size)     # warm-up
    sync("cuda")
    t0 = time.perf_counter()
    for _ in range(reps):
        encode_maps(model, host, batch_size=args.batch_size)
    sync("cuda")
    seconds = time.perf_counter() - t0
    return {"maps": reps * len(maps), "batch_size": args.batch_size, "seconds": round(seconds, 2),
            "maps_per_s": round(reps * len(maps) / seconds, 1)}


def summary(_args) -> dict:
    tag = machine_tag()
    out = {}
    for name in ("gpu_check_parity", "gpu_check_encode", "capture", "bench_train"):
        path = RESULTS / f"{name}-{tag}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else None
    cluster = RESULTS / "cluster.json"
    if cluster.exists():
        out["gpu_knn"] = [r for r in json.loads(cluster.read_text())["rows"]
                          if r["section"].startswith("gpu_")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=("parity", "encode", "summary"))
    ap.add_argument("--model", default="random:starcoder2-3b")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--maps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    if args.section == "summary":
        res = summary(args)
        table = []
        if res.get("gpu_check_parity"):
            table.append({"check": "bf16 capture vs fp32 eager", "result": json.dumps(
                res["gpu_check_parity"]["table"][0])})
        if res.get("capture"):
            for row in res["capture"]["table"]:
                table.append({"check": f"capture: {row['path']}", "result": json.dumps(
                    {k: row[k] for k in ("inferences_per_s", "maps_per_s", "vs_plain")})})
        if res.get("bench_train"):
            for row in res["bench_train"]["table"]:
                if "paper" in str(row.get("section", "")):
                    table.append({"check": "train, paper preset", "result": json.dumps(row)})
        if res.get("gpu_check_encode"):
            table.append({"check": "encode", "result": json.dumps(
                res["gpu_check_encode"]["table"][0])})
        for row in res.get("gpu_knn", []):
            table.append({"check": row["section"], "result": json.dumps(row)})
        save("gpu_check", {"sources": sorted(k for k, v in res.items() if v)}, table)
        return
    row = parity(args) if args.section == "parity" else encode(args)
    save(f"gpu_check_{args.section}", row, [row])
    if args.section == "parity" and not row["ok"]:
        print(f"gpu_check parity FAILED: {row}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
