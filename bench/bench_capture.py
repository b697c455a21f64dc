"""Capture throughput: maps captured and scaled on the device, persisted to Zarr, against the
plain forward pass and against the reference approach (eager ``output_attentions=True``, maps
moved to the host as float32, one write per map), side by side in one run.

    python bench/bench_capture.py                       # embedded model on this CPU
    python bench/bench_capture.py --model random:starcoder2-3b --batch-size 16   # on a GPU

Prints a table and saves bench/results/capture-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss_mib, save, sync  # noqa: E402


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn, device, repeat):
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    import torch
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    from apmae_gpu import llm
    from apmae_gpu.capture import forward_with_maps, scale_maps
    from apmae_gpu.runs import resolve_device
    from apmae_gpu.store import MapStore

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="default: smollm2 on CPU, "
                    "random:starcoder2-3b on a GPU")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference-batches", type=int, default=1, help="0: skip the reference")
    args = ap.parse_args()
    device = resolve_device("auto")
    model = args.model or ("random:starcoder2-3b" if device == "cuda" else "smollm2")
    B = args.batch_size or (16 if device == "cuda" else 4)
    W = args.window
    lm = llm.load_model(model, device=device)
    fam = llm.family(lm)
    maps_per_inf = fam.n_layers * fam.n_heads
    ids = torch.randint(100, 40000, (B, W), generator=torch.Generator().manual_seed(0)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    table, figures = [], {"model": model, "device": device, "dtype": str(lm.dtype),
                          "batch_size": B, "window": W, "maps_per_inference": maps_per_inf}

    # 1. plain forward with the model's fastest kernel (sdpa), logits at the last position.
    def plain():
        with torch.inference_mode():
            lm(input_ids=ids, logits_to_keep=1, use_cache=False)

    t_plain = _timed(plain, device, args.repeat)
    table.append({"path": "plain forward (sdpa)", "inferences_per_s": B / t_plain,
                  "maps_per_s": None, "vs_plain": 1.0})

    # 2. capture: probabilities from q/k, log-scaled on the device, one copy to the host.
    holder = {}

    def cap():
        _, maps = forward_with_maps(lm, fam, ids, [None] * fam.n_layers, "log")
        holder["maps"] = maps.cpu()

    t_cap = _timed(cap, device, args.repeat)
    table.append({"path": "capture + log scale + to host (fp16)", "inferences_per_s": B / t_cap,
                  "maps_per_s": B * maps_per_inf / t_cap, "vs_plain": t_plain / t_cap})
    figures["capture_overhead_pct"] = 100 * (t_cap / t_plain - 1)

    # 3. persistence of those maps, per codec and chunking.
    maps = holder["maps"].numpy().reshape(-1, W, W)
    raw = maps.nbytes
    persist = []
    for name, codec, chunk in [("zstd-1", ZstdCodec(level=1), 8), ("zstd-1", ZstdCodec(level=1), 32),
                               ("zstd-1", ZstdCodec(level=1), 128), ("zstd-3", ZstdCodec(level=3), 32),
                               ("blosc-lz4", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), 32)]:
        tmp = Path(tempfile.mkdtemp())
        arr = zarr.create_array(store=str(tmp / "m.zarr"), shape=maps.shape, chunks=(chunk, W, W),
                                dtype="float16", compressors=codec, fill_value=math.log(1e-8))
        t0 = time.perf_counter()
        arr[:] = maps
        dt = time.perf_counter() - t0
        size = _dir_bytes(tmp / "m.zarr")
        shutil.rmtree(tmp)
        persist.append({"codec": name, "chunk_maps": chunk, "MB_per_s": raw / dt / 1e6,
                        "maps_per_s": len(maps) / dt, "ratio": raw / size,
                        "KB_per_map": size / len(maps) / 1024})
    figures["persistence"] = persist
    figures["cpu_threads_for_zarr"] = os.cpu_count()

    # 4. end to end through the store (what `apmae capture` does per batch).
    tmp = Path(tempfile.mkdtemp())
    store = MapStore.create_or_open(tmp, window=W, scaler="log", fill_value=math.log(1e-8),
                                    floor=1e-8)
    import pandas as pd
    import pyarrow as pa

    from apmae_gpu.store import INFERENCE_SCHEMA

    def e2e():
        _, m = forward_with_maps(lm, fam, ids, [None] * fam.n_layers, "log")
        host = m.cpu().numpy().reshape(-1, W, W)
        idx = pd.DataFrame({"inference_id": np.repeat(np.arange(B), maps_per_inf),
                            "layer": np.tile(np.repeat(np.arange(fam.n_layers), fam.n_heads), B),
                            "head": np.tile(np.arange(fam.n_heads), B * fam.n_layers)})
        rows = pd.DataFrame({"inference_id": np.arange(B), "split": "analysis", "has_maps": True})
        store.commit(host, idx, rows, inference_schema=pa.schema(
            [INFERENCE_SCHEMA.field(c) for c in ("inference_id", "split", "has_maps")]))

    t_e2e = _timed(e2e, device, args.repeat)
    figures["store_bytes_per_map"] = _dir_bytes(tmp / "maps.zarr") / store.n_maps
    shutil.rmtree(tmp)
    table.append({"path": "capture + write to maps.zarr (serial)", "inferences_per_s": B / t_e2e,
                  "maps_per_s": B * maps_per_inf / t_e2e, "vs_plain": t_plain / t_e2e})

    # 5. the reference approach: eager output_attentions, float32 to host, one write per map
    #    (--reference-batches 0 skips it: minutes for a 3B model).
    if args.reference_batches < 1:
        figures["peak_rss_mib"] = peak_rss_mib()
        if device == "cuda":
            figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        save("capture", figures, table, [
            f"{model} ({fam.n_layers} layers x {fam.n_heads} heads, {lm.dtype}), batch {B}, "
            f"window {W}, device {device}; reference approach skipped",
            f"capture overhead over the plain forward: {figures['capture_overhead_pct']:.1f}%"])
        return
    tmp = Path(tempfile.mkdtemp())
    ref = zarr.create_array(store=str(tmp / "r.zarr"), shape=(B * maps_per_inf * args.reference_batches, W, W),
                            chunks=(1, W, W), dtype="float32", compressors=ZstdCodec(level=1))

    def reference():
        lm.set_attn_implementation("eager")
        try:
            pos = 0
            for _ in range(args.reference_batches):
                with torch.inference_mode():
                    out = lm(input_ids=ids, output_attentions=True, use_cache=False)
                for layer in out.attentions:
                    host = layer.float().cpu().numpy()
                    for b in range(host.shape[0]):
                        for h in range(host.shape[1]):
                            ref[pos] = np.log(np.maximum(host[b, h], 1e-8))
                            pos += 1
        finally:
            lm.set_attn_implementation("sdpa")

    t0 = time.perf_counter()
    reference()
    sync(device)
    t_ref = (time.perf_counter() - t0) / args.reference_batches
    shutil.rmtree(tmp)
    table.append({"path": "reference: eager output_attentions, fp32 host, 1 write/map",
                  "inferences_per_s": B / t_ref, "maps_per_s": B * maps_per_inf / t_ref,
                  "vs_plain": t_plain / t_ref})
    figures["speedup_vs_reference_end_to_end"] = t_ref / t_e2e
    figures["peak_rss_mib"] = peak_rss_mib()
    if device == "cuda":
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # scaling alone, on the device
    p = torch.softmax(torch.randn(B * 4, W, W, device=device), -1).tril()
    t_scale = _timed(lambda: scale_maps(p, "log").half(), device, args.repeat)
    figures["scale_maps_per_s_on_device"] = B * 4 / t_scale
    notes = [f"{model} ({fam.n_layers} layers x {fam.n_heads} heads, {lm.dtype}), batch {B}, "
             f"window {W}, device {device}",
             f"capture overhead over the plain forward: {figures['capture_overhead_pct']:.1f}%",
             f"end to end vs the reference approach: {figures['speedup_vs_reference_end_to_end']:.1f}x",
             "persistence (one thread per chunk, zarr's own pool): " + "; ".join(
                 f"{p['codec']}/{p['chunk_maps']}: {p['MB_per_s']:.0f} MB/s, ratio {p['ratio']:.2f}, "
                 f"{p['KB_per_map']:.0f} KB/map" for p in persist),
             f"peak RSS {figures['peak_rss_mib']:.0f} MiB"]
    save("capture", figures, table, notes)


if __name__ == "__main__":
    main()
