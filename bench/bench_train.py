"""AP-MAE training throughput, FLOPs, loader speed, and whether the small presets learn.

Sections (each printed and saved under bench/results/bench_train-<machine>.{json,md}):

1. Training-step throughput (maps/s) of the ``paper`` preset: ``apmae_gpu.model.network`` (bf16
   autocast on CUDA, fused AdamW, SDPA, optional ``torch.compile``) against a baseline written
   the way the paper's reference package writes its model (float32, attention by explicit
   matmul + softmax, einops rearranges, a decoder over all 8x8 grid positions), same batch,
   same run, ratio printed.
2. FLOPs per training map: analytic (``model.train_flops_per_map``) and counted by
   ``torch.utils.flop_counter``; achieved TFLOP/s and the fraction of ``--peak-tflops``
   (default 989 = H100 SXM dense bf16 on CUDA; none on CPU unless given).
3. The data loader alone (``loader.MapLoader``: whole-chunk reads, window shuffle) on a
   256x256 store: ``--data RUN`` or a synthetic store built here.
4. On CPU: ``apmae train --preset tiny`` for ``--learn-steps`` on that store; validation MSE
   against the mean-of-visible-patches and dataset-mean-patch baselines.

    python bench/bench_train.py                       # CPU: few steps, tiny learns
    python bench/bench_train.py --steps 50 --compile  # a GPU: bf16, compiled
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import os

from common import save, sync
from torch.utils.flop_counter import FlopCounterMode

from apmae_gpu.core.devices import resolve_device
from apmae_gpu.core.splits import split_maps
from apmae_gpu.core.store import MapStore
from apmae_gpu.model.evaluation import evaluate
from apmae_gpu.model.loader import MapLoader
from apmae_gpu.model.network import APMAEModel, parameter_counts, preset_config, train_flops_per_map
from apmae_gpu.model.training import train
from apmae_gpu.synthetic import synthetic_run


# --------------------------------------------------------------------------- reference-style baseline
class RefAttention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        return self.to_out(rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)"))


class RefTransformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([
            RefAttention(dim, heads, dim_head),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)),
        ]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class RefMAE(nn.Module):
    """The reference package's structure (with its decoder scatter done right): all G*G grid
    patches embedded, the lower-triangle ones sampled, the decoder over 1 + G*G tokens."""

    def __init__(self, c):
        super().__init__()
        self.p, self.g = c.patch_size, c.image_size // c.patch_size
        n, pp, d = self.g ** 2, c.patch_size ** 2, c.hidden_size
        self.num_masked = round(c.mask_ratio * c.num_patches)
        self.embed = nn.Sequential(nn.LayerNorm(pp), nn.Linear(pp, d), nn.LayerNorm(d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = RefTransformer(d, c.num_hidden_layers, c.num_attention_heads, c.head_dim,
                                      c.intermediate_size)
        dd = c.decoder_hidden_size
        self.mask_token = nn.Parameter(torch.randn(dd))
        self.dec_pos = nn.Parameter(torch.randn(1, n + 1, dd))
        self.decoder = RefTransformer(dd, c.decoder_num_hidden_layers,
                                      c.decoder_num_attention_heads, c.decoder_head_dim,
                                      c.decoder_intermediate_size)
        self.to_pixels = nn.Linear(dd, pp)
        rows, cols = torch.tril_indices(self.g, self.g)
        self.register_buffer("tril_ids", rows * self.g + cols)

    def forward(self, x):  # x [B, 1, W, W] float32
        b = x.shape[0]
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.p, p2=self.p)
        tokens = self.embed(patches) + self.pos[:, 1:]
        shuffled = self.tril_ids[torch.rand(b, len(self.tril_ids), device=x.device).argsort(-1)]
        masked, unmasked = shuffled[:, :self.num_masked], shuffled[:, self.num_masked:]
        sel = tokens.gather(1, repeat(unmasked, "b n -> b n d", d=tokens.shape[-1]))
        enc = self.encoder(torch.cat([(self.cls + self.pos[:, :1]).expand(b, -1, -1), sel], 1))
        dec = torch.zeros(b, self.g ** 2, enc.shape[-1], device=x.device, dtype=enc.dtype)
        dec = dec.scatter(1, repeat(unmasked, "b n -> b n d", d=dec.shape[-1]), enc[:, 1:])
        dec = dec.scatter(1, repeat(masked, "b n -> b n d", d=dec.shape[-1]),
                          repeat(self.mask_token, "d -> b n d", b=b, n=self.num_masked))
        out = self.to_pixels(self.decoder(torch.cat([enc[:, :1], dec], 1) + self.dec_pos))[:, 1:]
        target = patches.gather(1, repeat(masked, "b n -> b n d", d=patches.shape[-1]))
        pred = out.gather(1, repeat(masked, "b n -> b n d", d=out.shape[-1]))
        return F.mse_loss(pred, target)


# --------------------------------------------------------------------------- timing
def time_interleaved(steps_fns: dict, warmup: int, steps: int, device: str) -> dict[str, float]:
    """Median seconds per step of each function, timed in alternation (so a shared machine's
    load hits both alike), after ``warmup`` untimed steps of each."""
    for fn in steps_fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps_fns}
    for _ in range(steps):
        for name, fn in steps_fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def counted_flops(fn) -> float:

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def throughput(args, device: str) -> tuple[list[dict], dict]:
    cuda = device.startswith("cuda")
    c = preset_config("paper")
    b = args.batch_size or (512 if cuda else 8)
    figs = {"batch": b}
    x16 = (torch.rand(b, 256, 256, device=device) * -18.4).to(torch.float16)  # stored log maps
    x32 = torch.rand(b, 1, 256, 256, device=device)
    noise_gen = torch.Generator(device=device).manual_seed(0)

    torch.manual_seed(0)
    ours = APMAEModel(c).to(device).train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.05, **({"fused": True} if cuda else {}))
    net = torch.compile(ours) if args.compile else ours
    ref = RefMAE(c).to(device).train()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)

    def ours_step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = net(x16, noise=torch.rand(b, 36, device=device, generator=noise_gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ref_step():
        loss = ref(x32)
        ropt.zero_grad(set_to_none=True)
        loss.backward()
        ropt.step()

    def ours_fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = ours(x16[:2])
        loss.backward()

    figs["ours_params"] = parameter_counts(ours)
    figs["ref_params"] = sum(p.numel() for p in ref.parameters())
    figs["flops_per_map_analytic"] = train_flops_per_map(c)
    figs["flops_per_map_counted"] = counted_flops(ours_fwd_bwd) / 2
    figs["ref_flops_per_map_counted"] = counted_flops(lambda: ref(x32[:2]).backward()) / 2
    sec = time_interleaved({"ours": ours_step, "ref": ref_step}, args.warmup, args.steps, device)
    rows = []
    for key, name, prec, flops in (
            ("ours", "apmae_gpu" + (" compiled" if args.compile else ""),
             "bf16 autocast" if cuda else "fp32", figs["flops_per_map_analytic"]),
            ("ref", "reference-style baseline", "fp32", figs["ref_flops_per_map_counted"])):
        rate = b / sec[key]
        rows.append({"model": name, "precision": prec, "batch": b, "s_per_step": sec[key],
                     "maps_per_s": rate, "gflop_per_map": flops / 1e9,
                     "achieved_tflops": rate * flops / 1e12})
    figs["speedup_vs_reference"] = sec["ref"] / sec["ours"]
    peak = args.peak_tflops if args.peak_tflops else (989.0 if cuda else None)
    figs["peak_tflops"] = peak
    for r in rows:
        r["fraction_of_peak"] = (r["achieved_tflops"] / peak) if peak else None
    return rows, figs


# --------------------------------------------------------------------------- data
def bench_store(args, tmp: Path) -> Path:
    if args.data:
        return Path(args.data)

    run = tmp / "synthetic256"
    t = time.perf_counter()
    synthetic_run(run, n_layers=4, n_heads=8, window=256, n_train=args.synthetic_inferences,
                  n_per_task=1, tasks=("identifiers",), chunk_maps=32, seed=0)
    print(f"built a synthetic 256x256 store in {time.perf_counter() - t:.0f} s", flush=True)
    return run


def loader_rate(run: Path, batch: int, workers: int, n_batches: int) -> dict:

    store = MapStore(run)
    ids, _, _ = split_maps(store, 0.1)
    loader = MapLoader(store, ids, batch, seed=0, buffer_maps=2048, workers=workers)
    it = loader.batches(0)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(n_batches):
        _, _, maps = next(it)
        torch.from_numpy(maps)  # what the trainer does before the device copy
    rate = n_batches * batch / (time.perf_counter() - t1)
    it.close()
    return {"maps": int(ids.size), "batch": batch, "workers": workers,
            "first_batch_s": first, "maps_per_s": rate,
            "mb_per_s_decoded": rate * store.info.window ** 2 * 2 / 1e6}


def learns(run: Path, args, device: str, tmp: Path) -> dict:

    out = tmp / "tiny"
    t = time.perf_counter()
    s = train(run, preset=args.learn_preset, steps=args.learn_steps,
              batch_size=args.learn_batch, out=out, device=device, seed=0,
              eval_every=max(1, args.learn_steps // 4))
    seconds = time.perf_counter() - t
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {}
    if args.ablation:  # the paper's log-vs-raw ablation, compared in the common log space

        train(run, preset=args.learn_preset, steps=args.learn_steps, batch_size=args.learn_batch,
              out=tmp / "raw", device=device, seed=0, raw=True,
              eval_every=max(1, args.learn_steps // 4))
        table = evaluate([out / "final", tmp / "raw" / "final"], [run], out=tmp / "ev",
                         device=device, figure_maps=0)
        result["ablation"] = table[["checkpoint_name", "method", "input_scaling", "mse_mean",
                                    "mse_log_mean", "n_maps"]].to_dict(orient="records")
    return {**result, "preset": args.learn_preset, "steps": args.learn_steps,
            "batch": args.learn_batch,
            "lr": s["lr"], "seconds": seconds, "maps_per_s": s["maps_per_s"],
            "val_mse": s["val_loss"], "visible_mean_mse": s.get("val_visible_mean"),
            "dataset_mean_mse": s.get("val_dataset_mean"),
            "val_curve": [(r["step"], r["val_loss"]) for r in curve if r["kind"] == "val"],
            "n_train_maps": s["n_train_maps"], "n_val_maps": s["n_val_maps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CPU 2, GPU 30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (CPU 1, GPU 10)")
    ap.add_argument("--batch-size", type=int, default=None, help="CPU 8, GPU 512")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--data", default=None, help="a run with 256x256 train maps")
    ap.add_argument("--synthetic-inferences", type=int, default=64, help="x32 maps")
    ap.add_argument("--loader-batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--learn-preset", default="tiny")
    ap.add_argument("--learn-steps", type=int, default=300)
    ap.add_argument("--learn-batch", type=int, default=32)
    ap.add_argument("--ablation", action="store_true", help="also train on raw probabilities "
                    "(apmae train --raw) and compare both in log-min-max space")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-learn", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    args.steps = args.steps or (30 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    workers = args.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    table, figures, notes = [], {"device": device, "torch_threads": torch.get_num_threads()}, []
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        if not args.skip_throughput:
            rows, figs = throughput(args, device)
            figures.update(figs)
            table += [{"section": "train step, paper preset", **r} for r in rows]
            notes.append(f"paper preset: {figs['ours_params']['encoder'] / 1e6:.1f}M encoder + "
                         f"{figs['ours_params']['decoder'] / 1e6:.1f}M decoder parameters; "
                         f"{figs['flops_per_map_analytic'] / 1e9:.1f} GFLOP per training map "
                         f"(analytic; counted {figs['flops_per_map_counted'] / 1e9:.1f}); "
                         f"reference-style baseline "
                         f"{figs['ref_flops_per_map_counted'] / 1e9:.1f} GFLOP (decoder over "
                         "all 64 grid positions)")
            notes.append(f"speed-up over the reference-style baseline: "
                         f"{figs['speedup_vs_reference']:.2f}x")
        run = bench_store(args, tmp)
        lr = loader_rate(run, 64, workers, args.loader_batches)
        figures["loader"] = lr
        table.append({"section": "loader alone", "model": f"MapLoader ({workers} reader "
                      "thread(s))", "batch": 64, "maps_per_s": lr["maps_per_s"]})
        notes.append(f"loader: {lr['maps_per_s']:.0f} maps/s ({lr['mb_per_s_decoded']:.0f} MB/s "
                     f"of fp16 maps decoded), first batch after {lr['first_batch_s']:.2f} s")
        if not args.skip_learn:
            ln = learns(run, args, device, tmp)
            figures["learn"] = ln
            table.append({"section": f"{ln['preset']} learns", "model": ln["preset"],
                          "batch": ln["batch"], "maps_per_s": ln["maps_per_s"],
                          "s_per_step": ln["seconds"] / ln["steps"]})
            notes.append(f"{ln['preset']}: {ln['steps']} steps x {ln['batch']} maps in "
                         f"{ln['seconds']:.0f} s (LR {ln['lr']:.2g}); validation MSE "
                         f"{ln['val_mse']:.4g} vs mean of visible patches "
                         f"{ln['visible_mean_mse']:.4g} and dataset mean patch "
                         f"{ln['dataset_mean_mse']:.4g} ({ln['n_val_maps']} maps); curve "
                         + ", ".join(f"{s}: {v:.4g}" for s, v in ln["val_curve"]))
            if ln.get("ablation"):
                notes.append("log vs raw ablation (validation MSE x1e-3, own space / common "
                             "log-min-max space): " + "; ".join(
                                 f"{r['input_scaling']} {r['method']} {r['mse_mean'] * 1e3:.2f}"
                                 f" / {r['mse_log_mean'] * 1e3:.2f}" for r in ln["ablation"]))
        notes.append(f"data: {'--data ' + str(args.data) if args.data else 'synthetic store'}; "
                     "the machine is shared with other jobs, so CPU figures are lower bounds")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save("bench_train", figures, table, notes)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
