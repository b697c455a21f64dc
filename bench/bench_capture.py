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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from common import peak_rss_mib, save, sync  # noqa: E402

from apmae_gpu.capture import llm  # noqa: E402
from apmae_gpu.capture.maps import forward_with_maps, scale_maps  # noqa: E402
from apmae_gpu.core.devices import (
    resolve_device,  # noqa: E402
    to_host,  # noqa: E402
)
from apmae_gpu.core.store import INFERENCE_SCHEMA, MapStore  # noqa: E402


@dataclass
class Bench:
    """The model under test and its input batch."""

    model: str
    device: str
    lm: object
    fam: llm.Family
    ids: torch.Tensor               # [B, W] token ids
    repeat: int

    @property
    def B(self) -> int:
        return self.ids.shape[0]

    @property
    def W(self) -> int:
        return self.ids.shape[1]

    @property
    def maps_per_inf(self) -> int:
        return self.fam.n_layers * self.fam.n_heads

    def timed(self, fn) -> float:
        return _timed(fn, self.device, self.repeat)

    def row(self, path: str, seconds: float, t_plain: float) -> dict:
        return {"path": path, "inferences_per_s": self.B / seconds,
                "maps_per_s": self.B * self.maps_per_inf / seconds, "vs_plain": t_plain / seconds}


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


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="default: smollm2 on CPU, "
                    "random:starcoder2-3b on a GPU")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference-batches", type=int, default=1, help="0: skip the reference")
    return ap.parse_args()


def _setup(args: argparse.Namespace) -> Bench:
    device = resolve_device("auto")
    model = args.model or ("random:starcoder2-3b" if device == "cuda" else "smollm2")
    B = args.batch_size or (16 if device == "cuda" else 4)
    lm = llm.load_model(model, device=device)
    fam = llm.family(lm)
    ids = torch.randint(100, 40000, (B, args.window),
                        generator=torch.Generator().manual_seed(0)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return Bench(model, device, lm, fam, ids, args.repeat)


def _plain(b: Bench) -> float:
    """1. plain forward with the model's fastest kernel (sdpa), logits at the last position."""
    def plain():
        with torch.inference_mode():
            b.lm(input_ids=b.ids, logits_to_keep=1, use_cache=False)

    return b.timed(plain)


def _capture(b: Bench) -> tuple[float, np.ndarray]:
    """2. capture: probabilities from q/k, log-scaled on the device, one copy to the host.
    Returns the seconds per batch and the maps [B * maps_per_inf, W, W]."""
    holder = {}

    def cap():
        _, maps = forward_with_maps(b.lm, b.fam, b.ids, [None] * b.fam.n_layers, "log")
        holder["maps"] = to_host(maps)      # as capture does: through pinned memory on CUDA

    t_cap = b.timed(cap)
    return t_cap, holder["maps"].reshape(-1, b.W, b.W)


def _on_device(b: Bench) -> tuple[float, float, float]:
    """2a. where the capture's time goes: the capture kept on the device (no host copy), and
    the device-to-host copy of its maps alone, into pageable and into pinned memory.
    Returns seconds per batch for each."""
    holder = {}

    def cap():
        holder["maps"] = forward_with_maps(b.lm, b.fam, b.ids, [None] * b.fam.n_layers, "log")[1]

    t_dev = b.timed(cap)
    maps = holder["maps"]
    t_page = b.timed(lambda: maps.cpu())
    pinned = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=b.device == "cuda")
    t_pin = b.timed(lambda: pinned.copy_(maps, non_blocking=True))
    return t_dev, t_page, t_pin


def _persistence(maps: np.ndarray, W: int) -> list[dict]:
    """3. persistence of those maps, per codec and chunking."""
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
    return persist


def _end_to_end(b: Bench) -> tuple[float, float]:
    """4. end to end through the store (what `apmae capture` does per batch).  Returns the
    seconds per batch and the store's bytes per map."""
    B, W, fam = b.B, b.W, b.fam
    tmp = Path(tempfile.mkdtemp())
    store = MapStore.create_or_open(tmp, window=W, scaler="log", fill_value=math.log(1e-8),
                                    floor=1e-8)

    def e2e():
        _, m = forward_with_maps(b.lm, fam, b.ids, [None] * fam.n_layers, "log")
        host = to_host(m).reshape(-1, W, W)
        idx = pd.DataFrame({"inference_id": np.repeat(np.arange(B), b.maps_per_inf),
                            "layer": np.tile(np.repeat(np.arange(fam.n_layers), fam.n_heads), B),
                            "head": np.tile(np.arange(fam.n_heads), B * fam.n_layers)})
        rows = pd.DataFrame({"inference_id": np.arange(B), "split": "analysis", "has_maps": True})
        store.commit(host, idx, rows, inference_schema=pa.schema(
            [INFERENCE_SCHEMA.field(c) for c in ("inference_id", "split", "has_maps")]))

    t_e2e = b.timed(e2e)
    bytes_per_map = _dir_bytes(tmp / "maps.zarr") / store.n_maps
    shutil.rmtree(tmp)
    return t_e2e, bytes_per_map


def _reference(b: Bench, batches: int) -> float:
    """5. the reference approach: eager output_attentions, float32 to host, one write per map.
    Returns the seconds per batch."""
    W = b.W
    tmp = Path(tempfile.mkdtemp())
    ref = zarr.create_array(store=str(tmp / "r.zarr"), shape=(b.B * b.maps_per_inf * batches, W, W),
                            chunks=(1, W, W), dtype="float32", compressors=ZstdCodec(level=1))

    def reference():
        b.lm.set_attn_implementation("eager")
        try:
            pos = 0
            for _ in range(batches):
                with torch.inference_mode():
                    out = b.lm(input_ids=b.ids, output_attentions=True, use_cache=False)
                for layer in out.attentions:
                    host = layer.float().cpu().numpy()
                    for i in range(host.shape[0]):
                        for h in range(host.shape[1]):
                            ref[pos] = np.log(np.maximum(host[i, h], 1e-8))
                            pos += 1
        finally:
            b.lm.set_attn_implementation("sdpa")

    t0 = time.perf_counter()
    reference()
    sync(b.device)
    t_ref = (time.perf_counter() - t0) / batches
    shutil.rmtree(tmp)
    return t_ref


def _peaks(b: Bench, figures: dict) -> None:
    figures["peak_rss_mib"] = peak_rss_mib()
    if b.device == "cuda":
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    args = _args()
    b = _setup(args)
    setting = (f"{b.model} ({b.fam.n_layers} layers x {b.fam.n_heads} heads, {b.lm.dtype}), "
               f"batch {b.B}, window {b.W}, device {b.device}")
    figures = {"model": b.model, "device": b.device, "dtype": str(b.lm.dtype),
               "batch_size": b.B, "window": b.W, "maps_per_inference": b.maps_per_inf}
    t_plain = _plain(b)
    table = [{"path": "plain forward (sdpa)", "inferences_per_s": b.B / t_plain,
              "maps_per_s": None, "vs_plain": 1.0}]
    t_cap, maps = _capture(b)
    table.append(b.row("capture + log scale + to host (fp16)", t_cap, t_plain))
    figures["capture_overhead_pct"] = 100 * (t_cap / t_plain - 1)
    t_dev, t_page, t_pin = _on_device(b)
    table.append(b.row("capture + log scale, kept on the device", t_dev, t_plain))
    table.append(b.row("device-to-host copy of those maps alone (pageable)", t_page, t_plain))
    table.append(b.row("device-to-host copy of those maps alone (pinned)", t_pin, t_plain))
    figures["capture_on_device_overhead_pct"] = 100 * (t_dev / t_plain - 1)
    figures["host_copy_GB_per_s"] = {"pageable": b.B * b.maps_per_inf * b.W ** 2 * 2 / t_page / 1e9,
                                     "pinned": b.B * b.maps_per_inf * b.W ** 2 * 2 / t_pin / 1e9}
    persist = figures["persistence"] = _persistence(maps, b.W)
    figures["cpu_threads_for_zarr"] = os.cpu_count()
    t_e2e, figures["store_bytes_per_map"] = _end_to_end(b)
    table.append(b.row("capture + write to maps.zarr (serial)", t_e2e, t_plain))
    overhead = f"capture overhead over the plain forward: {figures['capture_overhead_pct']:.1f}%"
    if args.reference_batches < 1:   # skips the reference: minutes for a 3B model
        _peaks(b, figures)
        save("capture", figures, table, [f"{setting}; reference approach skipped", overhead])
        return
    t_ref = _reference(b, args.reference_batches)
    table.append(b.row("reference: eager output_attentions, fp32 host, 1 write/map", t_ref,
                       t_plain))
    figures["speedup_vs_reference_end_to_end"] = t_ref / t_e2e
    _peaks(b, figures)
    # scaling alone, on the device
    p = torch.softmax(torch.randn(b.B * 4, b.W, b.W, device=b.device), -1).tril()
    t_scale = b.timed(lambda: scale_maps(p, "log").half())
    figures["scale_maps_per_s_on_device"] = b.B * 4 / t_scale
    notes = [setting, overhead,
             f"end to end vs the reference approach: {figures['speedup_vs_reference_end_to_end']:.1f}x",
             "persistence (one thread per chunk, zarr's own pool): " + "; ".join(
                 f"{p['codec']}/{p['chunk_maps']}: {p['MB_per_s']:.0f} MB/s, ratio {p['ratio']:.2f}, "
                 f"{p['KB_per_map']:.0f} KB/map" for p in persist),
             f"peak RSS {figures['peak_rss_mib']:.0f} MiB"]
    save("capture", figures, table, notes)


if __name__ == "__main__":
    main()
