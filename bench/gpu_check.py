"""The device check's steps (run by ``bench/gpu_check.sh``; each also runs alone).

    python bench/gpu_check.py STEP [--device cuda] [options]

Steps (``--help`` lists their options):
    env             the device, driver, versions and which optional GPU libraries are present
    parity          capture (float32 and bf16; all heads and ``layerwise:0.25``) of a model
                    whose q/k weights are scaled so attention is peaked, against float32 eager
                    attention: per row KL(eager || capture) and max-abs; with controls (heads
                    rolled by one, softmax temperature off by 50%) that must be caught
    capture-encode  ``capture --encode-with`` against capture then ``encode``, on the device
    train           the real training loop (AMP, fused AdamW, checkpoints): N steps straight
                    and resumed from the middle give the same weights and loss
    encode          encode maps/s of a paper-preset AP-MAE (goal in bench/README.md)
    intervene       per-sample head ablation on the device against a CPU run of the same
                    inferences (same predictions), and ablation changes predictions
    torchrun        capture with 2 torchrun ranks on one GPU (APMAE_RANKS_ON_ONE_GPU=1,
                    gloo) against 1 process: the same run, bit for bit
    cuml            cuML UMAP + HDBSCAN against the cpu backend on separated blobs; torch kNN
                    on the device against the CPU (needs cuml for the first part)
    dask-cuda       clustering through a dask-cuda LocalCUDACluster against one process
    catboost-gpu    CatBoost task_type GPU against CPU on the same data
    summary         every step's status and the goals, measured/goal

Each step writes ``bench/results/gpu_check_<step>-<machine>.{json,md}`` with ``status``:
``passed``, ``failed`` or ``not checked`` (a library or the device is missing; never counted as
passed) and exits 0, 1 or 3 accordingly.  Every figure is a ratio, a difference or a
throughput, with the device named in the record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import importlib  # noqa: E402
import importlib.util  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import zarr  # noqa: E402
from common import RESULTS, child_env, describe_machine, machine_tag, save, sync  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402

from apmae_gpu.capture import llm  # noqa: E402
from apmae_gpu.capture import maps as C
from apmae_gpu.capture.llm import family, load_model  # noqa: E402
from apmae_gpu.capture.maps import (  # noqa: E402
    capture,  # noqa: E402
    choose_heads,
    forward_with_maps,
    parse_heads,
)
from apmae_gpu.classification import classifier  # noqa: E402
from apmae_gpu.clustering import backends as cb  # noqa: E402
from apmae_gpu.clustering import heads as clustering  # noqa: E402
from apmae_gpu.core.store import MapStore  # noqa: E402
from apmae_gpu.encoding.encoder import (
    encode,  # noqa: E402
    encode_maps,  # noqa: E402
)
from apmae_gpu.intervention.ablation import ablate_heads  # noqa: E402
from apmae_gpu.model import training  # noqa: E402
from apmae_gpu.model.network import APMAEModel, preset_config  # noqa: E402
from apmae_gpu.synthetic import (
    synthetic_maps,  # noqa: E402
    synthetic_run,  # noqa: E402
    synthetic_tasks,  # noqa: E402
)

PASSED, FAILED, NOT_CHECKED = "passed", "failed", "not checked"
EXIT = {PASSED: 0, FAILED: 1, NOT_CHECKED: 3}
# Per-row tolerances of capture against eager attention (maps are stored in float16, whose
# spacing near 1 is 2**-11).  float32: every row.  bf16: the two forwards (capture's, eager's)
# drift apart layer by layer, so the bounds are on the rows' distribution.  Measured on this
# repository's CPU machine with a 3-layer StarCoder2-3B-shaped model, q/k scaled x8 (mean row
# peak 0.79), 128 tokens: float32 KL max 4e-4, max-abs 3e-4; bf16 KL mean 0.005, p99 0.05;
# the temperature control (50% off) KL mean 0.04, the neighbour-head control 12.
TOLERANCE = {"float32": {"kl_max": 1e-3, "max_abs": 4e-3},
             "bfloat16": {"kl_mean": 2e-2, "kl_p99": 0.2}}
# Goals (bench/README.md): capture overhead vs a plain forward, AP-MAE paper preset's share of
# the bf16 peak, encode maps/s.
GOALS = {"capture_overhead": 0.25, "train_fraction_of_peak": 0.40, "encode_maps_per_s": 20_000}


def _record(step: str, status: str, row: dict, why: str = "") -> None:

    row = {"step": step, "status": status, "why": why,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           **row}
    save(f"gpu_check_{step}", {"status": status}, [row])
    if status != PASSED:
        print(f"gpu_check {step}: {status}{': ' + why if why else ''}", file=sys.stderr)
    sys.exit(EXIT[status])


def _device(args) -> str | None:

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return None
    return args.device


def _has(module: str) -> bool:

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- env
def env(args) -> None:

    row = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "cupy": _has("cupy"),
           "cuml": _has("cuml"), "dask_cuda": _has("dask_cuda"), "catboost": _has("catboost")}
    try:
        row["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                        "--format=csv,noheader"], capture_output=True,
                                       text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        row["driver"] = None
    if not torch.cuda.is_available():
        _record("env", NOT_CHECKED, row, "torch sees no CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    row.update(gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
               memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    _record("env", PASSED, row)


# --------------------------------------------------------------------------- parity
def scale_qk(lm, factor: float) -> int:
    """Multiply every q/k projection (weights and biases) by ``sqrt(factor)``: attention
    logits grow ``factor``-fold, so random-weight attention (nearly uniform with init std
    0.02) is peaked and a head-order, scaling or GQA error shows.  Returns how many
    projections it scaled."""

    n = 0
    with torch.no_grad():
        for name, module in lm.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):
                module.weight.mul_(factor ** 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.mul_(factor ** 0.5)
                n += 1
    return n


def row_metrics(got, ref) -> dict:
    """Per attention row (one query position of one map; keys up to it): KL(ref || got) and
    the largest absolute difference.  ``got``, ``ref``: [..., T, T] probabilities."""

    T = ref.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ref.device).tril()
    ref, got = ref.double(), got.double()
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    eps = 1e-7
    kl = torch.where(causal, ref * (ref.clamp_min(eps).log() - got.clamp_min(eps).log()),
                     zero).sum(-1).flatten()
    diff = torch.where(causal, (got - ref).abs(), zero).amax(-1).flatten()
    sample = kl if kl.numel() <= 2**24 else kl[:: kl.numel() // 2**24 + 1]
    return {"rows": int(kl.numel()), "kl_mean": float(kl.mean()),
            "kl_p99": float(sample.float().quantile(0.99)), "kl_max": float(kl.max()),
            "max_abs": float(diff.max()), "peak_mean": float(ref.amax(-1).mean())}


def within(metrics: dict, dtype: str) -> bool:
    return all(metrics[k] <= v for k, v in TOLERANCE[dtype].items())


def _eager_maps(lm, ids) -> "torch.Tensor":  # noqa: F821
    """Eager attention [B, L, H, T, T] as float32 (one prompt at a time: eager maps are
    large)."""

    lm.set_attn_implementation("eager")
    out = []
    with torch.inference_mode():
        for b in range(ids.shape[0]):
            att = lm(input_ids=ids[b:b + 1], output_attentions=True, use_cache=False).attentions
            out.append(torch.stack([a[0].float() for a in att]))
    return torch.stack(out)


def _gather(ref_all, chosen, window: int):
    """The reference maps of the chosen heads (per layer [B, K] indices, or None: all)."""

    if chosen[0] is None:
        return ref_all
    return torch.stack([ref_all[:, i].gather(1, h[:, :, None, None].expand(-1, -1, window,
                                                                          window))
                        for i, h in enumerate(chosen)], dim=1)


def _controls(got, ref, wrong_head, dtype: str) -> dict:
    """The same comparison against references with an injected error (``wrong_head``: each
    head's neighbour; a softmax temperature off by 50%): the check must fail them (a check
    that passes a wrong capture proves nothing)."""
    rolled = within(row_metrics(got, wrong_head), dtype)
    hot = ref.clamp_min(1e-30) ** 1.5
    temp = within(row_metrics(got, hot / hot.sum(-1, keepdim=True)), dtype)
    return {"control_heads_rolled_caught": not rolled, "control_temperature_caught": not temp}


PARITY_IMPL = "apmae_parity_check"


def _same_forward(lm, fam, ids, chosen):
    """One capture forward in which every layer also runs the model's own eager attention
    (its module's ``eager_attention_forward``) in float32 on the very q/k/v that the capture
    sees: (capture maps [B, L, K, T, T] float16, eager maps of the same heads, float32, and
    of each head's neighbour: the control).
    In bf16 this separates the capture from the drift between two bf16 forwards (SDPA and
    eager kernels round differently, and peaked attention carries that from layer to layer)."""



    refs: dict = {}

    def both(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        eager = importlib.import_module(type(module).__module__).eager_attention_forward
        T, S = query.shape[2], key.shape[2]
        causal = torch.full((T, S), float("-inf"), device=query.device).triu(S - T + 1)
        _, w = eager(module, query.float(), key.float(), value.float(), causal[None, None],
                     scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
                     dropout=0.0)
        h = chosen[module._apmae_layer]
        pick = (lambda x: x) if h is None else (lambda x: x.gather(
            1, h.to(x.device)[:, :, None, None].expand(-1, -1, T, S)))
        refs[module._apmae_layer] = (pick(w), pick(w.roll(1, dims=1)))
        return C._capture_attention(module, query, key, value, attention_mask,
                                    scaling=scaling, dropout=dropout, **kw)

    C._register()
    AttentionInterface.register(PARITY_IMPL, both)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PARITY_IMPL, sdpa_mask)
    B, T = ids.shape
    with C.capturing(lm, fam, chosen, "none", B, T) as session, torch.inference_mode():
        lm.set_attn_implementation(PARITY_IMPL)
        lm(input_ids=ids, logits_to_keep=1, use_cache=False)
    ref, wrong = (torch.stack([refs[i][j] for i in range(fam.n_layers)], dim=1) for j in (0, 1))
    return session.buffer[:, :, :ref.shape[2]], ref, wrong


def _layer_kl(got, ref) -> list[float]:
    """Mean row KL per layer (got/ref [B, L, K, T, T])."""
    return [round(row_metrics(got[:, i], ref[:, i])["kl_mean"], 6) for i in range(ref.shape[1])]


def parity_rows(model: str, device: str, prompts: int, window: int, qk_scale: float,
                dtypes: list[str], heads: list[str], seed: int = 0) -> list[dict]:
    """Capture vs eager attention of the same (q/k-scaled) random weights, for every dtype x
    head choice, two ways: ``separate`` (a second, eager forward of the same weights; gates
    float32, and in bf16 measures the drift between two bf16 forwards) and ``same`` (eager
    attention in float32 on the q/k/v the capture itself sees, layer by layer; gates every
    dtype)."""


    lm = llm.load_model(model, device=device, dtype=torch.float32, seed=seed)
    fam = llm.family(lm)
    scaled = scale_qk(lm, qk_scale)
    ids = torch.randint(100, 40000, (prompts, window),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    rows = []
    for dtype in dtypes:
        lm.to(getattr(torch, dtype))
        ref_all = _eager_maps(lm, ids)
        for spec in heads:
            chosen = choose_heads(range(prompts), fam.n_layers, fam.n_heads,
                                  parse_heads(spec, "analysis"), seed)
            chosen = [None if h is None else h.to(device) for h in chosen]
            base = {"model": model, "dtype": dtype, "heads": spec, "qk_scale": qk_scale,
                    "qk_projections_scaled": scaled, "prompts": prompts, "window": window}
            _, maps = forward_with_maps(lm, fam, ids, chosen, "none")
            ref = _gather(ref_all, chosen, window)
            wrong = _gather(ref_all.roll(1, dims=2), chosen, window)
            got = maps.float()
            m = row_metrics(got, ref)
            layers = _layer_kl(got, ref)
            gates = dtype == "float32"
            rows.append({**base, "reference": "separate", **m,
                         "kl_first_layer": layers[0], "kl_last_layer": layers[-1],
                         "gates": gates, "ok": within(m, dtype) if gates else None,
                         **_controls(got, ref, wrong, dtype)})
            del maps, got, ref, wrong
            got, ref, wrong = _same_forward(lm, fam, ids, chosen)
            got = got.float()
            m = row_metrics(got, ref)
            layers = _layer_kl(got, ref)
            rows.append({**base, "reference": "same", **m,
                         "kl_first_layer": layers[0], "kl_last_layer": layers[-1],
                         "gates": True, "ok": within(m, "float32"),
                         **_controls(got, ref, wrong, "float32")})
            del got, ref, wrong
        lm.to(torch.float32)
    return rows


def parity(args) -> None:
    device = _device(args)
    if device is None:
        _record("parity", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    rows = parity_rows(args.model, device, args.prompts, args.window, args.qk_scale,
                       args.dtypes.split(","), args.heads.split("|"))
    ok = all(r["ok"] and r["control_heads_rolled_caught"] and r["control_temperature_caught"]
             for r in rows if r["gates"])
    save("gpu_check_parity_rows", {"device": device}, rows)
    worst = {k: max(r[k] for r in rows if r["gates"]) for k in ("kl_max", "kl_p99", "max_abs")}
    drift = [r["kl_mean"] for r in rows if r["dtype"] != "float32" and r["reference"] == "separate"]
    worst["bf16_two_forwards_kl_mean"] = max(drift) if drift else None
    _record("parity", PASSED if ok else FAILED, {"rows": len(rows), **worst,
                                                "peak_mean": min(r["peak_mean"] for r in rows)},
            "" if ok else "a capture row is out of tolerance or a control was not caught")


# --------------------------------------------------------------------------- capture --encode-with
def _tiny_apmae(path: Path, window: int) -> Path:


    torch.manual_seed(0)
    APMAEModel(preset_config("tiny", image_size=window, patch_size=8)).eval().save_pretrained(path)
    return path


def capture_encode(args) -> None:
    """``capture --encode-with`` (one pass) against capture with maps, then ``encode``."""


    device = _device(args)
    if device is None:
        _record("capture-encode", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    window, opts = 32, dict(per_task=3, batch_size=4, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _tiny_apmae(Path(tmp) / "apmae", window)
        runs = []
        for name in ("one_pass", "two_pass"):
            run = synthetic_tasks(Path(tmp) / name, "random:tiny-starcoder2", n_per_task=12,
                                  window=window)
            t0 = time.perf_counter()
            if name == "one_pass":
                capture(run, "random:tiny-starcoder2", encode_with=ckpt, **opts)
            else:
                capture(run, "random:tiny-starcoder2", **opts)
                encode(run, checkpoint=ckpt, device=device)
            runs.append((zarr.open_group(run / "embeddings.zarr", mode="r"),
                         time.perf_counter() - t0))
        (a, ta), (b, tb) = runs
        ids_equal = bool(np.array_equal(a["inference_id"][:], b["inference_id"][:]))
        diff = float(np.abs(a["embeddings"][:].astype(np.float32)
                            - b["embeddings"][:].astype(np.float32)).max()) if ids_equal else None
    ok = ids_equal and diff is not None and diff <= 2e-2
    _record("capture-encode", PASSED if ok else FAILED,
            {"same_inferences": ids_equal, "max_abs_embedding_diff": diff,
             "one_pass_vs_two_pass_time": round(ta / tb, 3)},
            "" if ok else "capture --encode-with differs from capture + encode")


# --------------------------------------------------------------------------- training
def train(args) -> None:
    """The real loop on a synthetic run: ``steps`` straight, and killed at the middle then
    resumed (deterministic): the same final weights and loss."""


    device = _device(args)
    if device is None:
        _record("train", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    steps, half = args.steps, args.steps // 2
    cfg = dict(image_size=64, patch_size=8)
    opts = dict(preset="tiny", batch_size=32, device=device, model_config=cfg, lr=1e-3,
                save_every=half, eval_every=steps, log_every=None, deterministic=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp) / "run", window=64, n_train=200)
        t0 = time.perf_counter()
        straight = training.train(run, steps=steps, out=Path(tmp) / "a", **opts)
        seconds = time.perf_counter() - t0
        shutil.copytree(Path(tmp) / "a", Path(tmp) / "b")
        shutil.rmtree(Path(tmp) / "b" / "final")
        for ck in sorted((Path(tmp) / "b" / "checkpoints").glob("step-*"))[1:]:
            shutil.rmtree(ck)
        resumed = training.train(run, steps=steps, out=Path(tmp) / "b", resume=True, **opts)
        a, b = (load_file(next((Path(tmp) / d / "final").glob("*.safetensors")))
                for d in ("a", "b"))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_loss = straight["final_loss"] == resumed["final_loss"]
    ok = same and same_loss and np.isfinite(straight["final_loss"])
    _record("train", PASSED if ok else FAILED,
            {"steps": steps, "resumed_at": half, "precision": straight["precision"],
             "same_weights": same, "same_loss": same_loss, "final_loss": straight["final_loss"],
             "maps_per_s": round(steps * 32 / seconds, 1)},
            "" if ok else "a resumed run differs from the uninterrupted one")


# --------------------------------------------------------------------------- encode
def encode_speed(args) -> None:


    device = _device(args)
    if device is None:
        _record("encode", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    model = APMAEModel(preset_config("paper")).eval().to(device)
    maps, _ = synthetic_maps(min(args.maps, 2048), 256, seed=0)
    reps = max(1, args.maps // len(maps))
    host = torch.from_numpy(maps)
    encode_maps(model, host[:args.batch_size], batch_size=args.batch_size)     # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        encode_maps(model, host, batch_size=args.batch_size)
    sync(device)
    rate = reps * len(maps) / (time.perf_counter() - t0)
    _record("encode", PASSED, {"maps": reps * len(maps), "batch_size": args.batch_size,
                               "maps_per_s": round(rate, 1),
                               "vs_goal": round(rate / GOALS["encode_maps_per_s"], 3)})


# --------------------------------------------------------------------------- intervene
def _zeroed_logits(lm, fam, ids, masks) -> "torch.Tensor":  # noqa: F821
    """The reference ablation, one prompt at a time: the masked heads' input columns of each
    layer's output projection set to zero in the weights (no hook), last-position logits."""

    projs = list(fam.out_proj)            # nn.Linear: weight [out, heads x head_dim]
    saved = [p.weight.detach().clone() for p in projs]
    D = fam.head_dim
    out = []
    try:
        with torch.inference_mode():
            for i in range(ids.shape[0]):
                for layer, p in enumerate(projs):
                    p.weight.copy_(saved[layer])
                    for h in np.flatnonzero(masks[i, layer]):
                        p.weight[:, h * D:(h + 1) * D] = 0
                out.append(lm(input_ids=ids[i:i + 1], logits_to_keep=1,
                              use_cache=False).logits[0, -1].float())
    finally:
        with torch.no_grad():
            for p, w in zip(projs, saved):
                p.weight.copy_(w)
    return torch.stack(out)


def intervene(args) -> None:
    """Per-sample head ablation on the device (one batch, a different mask per prompt, the
    pipeline's hooks) against an independent ablation of the same model on the same device
    (masked heads' columns of the output projection zeroed in the weights, one prompt at a
    time): the same last-position logits (float32) and first tokens; a mask shifted to the
    neighbouring heads (a control) must not match, and the masks must change predictions.
    (A CPU run is no reference here: random weights have near-tied logits, and CPU and GPU
    float32 kernels round differently.)"""


    device = _device(args)
    if device is None:
        _record("intervene", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    n = args.prompts
    ids = torch.randint(100, 40000, (n, args.window),
                        generator=torch.Generator().manual_seed(0)).to(device)
    lm = load_model(args.model, device=device, dtype=torch.float32, seed=0)
    fam = family(lm)
    masks = np.zeros((n, fam.n_layers, fam.n_heads), bool)
    for i in range(n):
        masks[i].flat[np.random.default_rng(i).choice(masks[i].size, masks[i].size // 2,
                                                      replace=False)] = True
    with torch.inference_mode():
        plain = lm(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1].float()
        with ablate_heads(lm, masks, fam=fam):
            hooked = lm(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1].float()
    ref = _zeroed_logits(lm, fam, ids, masks)
    wrong = _zeroed_logits(lm, fam, ids, np.roll(masks, 1, axis=2))
    scale = float(ref.std())

    def rel(a, b) -> float:
        return float((a - b).abs().max()) / scale

    diff, control, effect = rel(hooked, ref), rel(wrong, ref), rel(plain, ref)
    same_tokens = float((hooked.argmax(-1) == ref.argmax(-1)).float().mean())
    changed = float((plain.argmax(-1) != ref.argmax(-1)).float().mean())
    ok = diff <= 1e-3 and control > 100 * max(diff, 1e-6) and effect > 100 * max(diff, 1e-6)
    _record("intervene", PASSED if ok else FAILED,
            {"model": args.model, "prompts": n, "window": args.window,
             "max_logit_diff_vs_zeroed_weights": diff, "control_neighbour_heads_diff": control,
             "ablation_effect_diff": effect, "same_first_token": same_tokens,
             "first_token_changed_by_ablation": changed, "logit_std": scale},
            "" if ok else "hooked ablation differs from zeroed output-projection columns, or "
                          "the control / the ablation's effect is not larger than that")


# --------------------------------------------------------------------------- torchrun
def _cli(args_: list[str], nproc: int, extra_env: dict) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "apmae_gpu.cli"] if nproc > 1
                else [sys.executable, "-m", "apmae_gpu.cli"])
    return subprocess.run([*launcher, *args_], env=child_env(**extra_env), capture_output=True,
                          text=True, timeout=240)


def torchrun(args) -> None:
    """2 ranks on one GPU (gloo) against one process: the same inferences and maps."""

    device = _device(args)
    if device is None:
        _record("torchrun", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    opts = ["--model", "random:tiny-llama", "--per-task", "3", "--batch-size", "2",
            "--device", "cuda" if device.startswith("cuda") else device]
    stores, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            run = synthetic_tasks(Path(tmp) / f"n{nproc}", "random:tiny-llama", n_per_task=14,
                                  window=32)
            t0 = time.perf_counter()
            out = _cli(["capture", str(run), *opts], nproc, {"APMAE_RANKS_ON_ONE_GPU": "1",
                                                              "APMAE_DIST_TIMEOUT_S": "120"})
            seconds.append(time.perf_counter() - t0)
            if out.returncode != 0:
                _record("torchrun", FAILED, {"nproc": nproc}, out.stdout[-500:] + out.stderr[-1500:])
            s = MapStore(run)
            stores.append((s.inferences(), s.read(np.arange(s.n_maps))))
    same_rows = stores[0][0].drop(columns=[c for c in stores[0][0] if "time" in c or "seconds" in c]
                                  ).equals(stores[1][0].drop(columns=[
                                      c for c in stores[1][0] if "time" in c or "seconds" in c]))
    same_maps = stores[0][1].shape == stores[1][1].shape and np.array_equal(
        stores[0][1].view(np.uint16), stores[1][1].view(np.uint16))
    ok = same_rows and same_maps
    _record("torchrun", PASSED if ok else FAILED,
            {"ranks": 2, "same_inferences": same_rows, "same_maps": same_maps,
             "two_ranks_vs_one_time": round(seconds[1] / seconds[0], 3)},
            "" if ok else "2 ranks wrote another run than 1 process")


# --------------------------------------------------------------------------- cuML, dask-cuda
def _blobs(n: int = 3000, dim: int = 32, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 6
    labels = rng.integers(0, k, n)
    return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def cuml(args) -> None:
    from sklearn.metrics import adjusted_rand_score


    device = _device(args)
    if device is None:
        _record("cuml", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    X, truth = _blobs()
    idx_gpu, _ = cb.torch_knn(X, 20, "cosine", device)
    idx_cpu, _ = cb.torch_knn(X, 20, "cosine", "cpu")
    recall = float(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(idx_gpu, idx_cpu)]))
    row = {"torch_knn_recall_vs_cpu": recall}
    ok, why = cb.cuml_available()
    if not ok:
        _record("cuml", NOT_CHECKED, row, f"cuML part not checked: {why}")
    t0 = time.perf_counter()
    gpu = cb.CumlClusterer(random_state=0, deterministic=True).fit(X)
    t_gpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu = cb.CpuClusterer(random_state=0).fit(X)
    row.update(ari_cuml_vs_truth=float(adjusted_rand_score(truth, gpu.labels_)),
               ari_cpu_vs_truth=float(adjusted_rand_score(truth, cpu.labels_)),
               cpu_vs_cuml_time=round((time.perf_counter() - t0) / t_gpu, 2))
    torch.cuda.empty_cache()
    good = recall >= 0.99 and row["ari_cuml_vs_truth"] >= 0.9
    _record("cuml", PASSED if good else FAILED, row, "" if good else "cuML clusters or kNN off")


def dask_cuda(args) -> None:


    if _device(args) is None:
        _record("dask-cuda", NOT_CHECKED, {}, "torch sees no CUDA GPU")
    missing = [m for m in ("cuml", "dask_cuda", "distributed") if not _has(m)]
    if missing:
        _record("dask-cuda", NOT_CHECKED, {}, f"{', '.join(missing)} not installed")
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    labels = []
    with tempfile.TemporaryDirectory() as tmp:

        run = synthetic_run(Path(tmp) / "run", window=64)
        encode(run, checkpoint=_tiny_apmae(Path(tmp) / "apmae", 64), device="cuda")
        for scheduler in (None, "dask-cuda"):
            if scheduler is None:
                clustering.cluster(run, backend="cuml", restart=True, figures=False)
            else:
                with LocalCUDACluster(n_workers=1) as lc, Client(lc):
                    clustering.cluster(run, backend="cuml", restart=True, figures=False,
                                       scheduler=lc.scheduler_address)
            labels.append(pd.read_parquet(run / "clusters.parquet"))
    same = labels[0].sort_index(axis=1).equals(labels[1].sort_index(axis=1))
    _record("dask-cuda", PASSED if same else FAILED, {"rows": len(labels[0]), "same": same},
            "" if same else "dask-cuda labels differ from one process")


def catboost_gpu(args) -> None:


    if _device(args) is None or not _has("catboost"):
        _record("catboost-gpu", NOT_CHECKED, {}, "no CUDA GPU or catboost not installed")
    from catboost.utils import get_gpu_device_count

    if get_gpu_device_count() == 0:
        _record("catboost-gpu", NOT_CHECKED, {}, "CatBoost sees no GPU (a CPU-only build?)")
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.integers(0, 8, (args.rows, 40)))
    y = ((X[0] + X[1] % 3) > 6).to_numpy().astype(int)
    acc, secs = {}, {}
    for task_type in ("GPU", "CPU"):
        t0 = time.perf_counter()
        model = classifier.fit_catboost(X, y, classifier.CatBoostSettings(iterations=200), task_type, 0)
        secs[task_type] = time.perf_counter() - t0
        acc[task_type] = float((model.predict(X).astype(int).ravel() == y).mean())
    ok = acc["GPU"] >= 0.9 and abs(acc["GPU"] - acc["CPU"]) <= 0.05
    _record("catboost-gpu", PASSED if ok else FAILED,
            {"rows": args.rows, "accuracy_gpu": acc["GPU"], "accuracy_cpu": acc["CPU"],
             "cpu_vs_gpu_time": round(secs["CPU"] / secs["GPU"], 2)},
            "" if ok else "CatBoost on the GPU learns less than on the CPU")


# --------------------------------------------------------------------------- summary
STEPS = ("env", "parity", "capture", "capture-encode", "train", "train-speed", "encode",
         "intervene", "torchrun", "cuml", "dask-cuda", "catboost-gpu")


def goals(tag: str) -> list[dict]:
    """measured/goal for each goal of bench/README.md whose bench ran."""
    def load(name):
        path = RESULTS / f"{name}-{tag}.json"
        return json.loads(path.read_text()) if path.exists() else None

    out = []
    cap = load("capture")
    if cap:
        ratios = [r["vs_plain"] for r in cap["table"] if r.get("vs_plain") and
                  str(r["path"]).startswith("capture + log scale + to host")]
        if ratios:
            overhead = 1 / max(ratios) - 1
            out.append({"goal": "capture overhead vs plain forward <= 25%",
                        "measured": round(overhead, 3), "measured/goal": round(
                            overhead / GOALS["capture_overhead"], 3)})
    tr = load("bench_train")
    if tr:
        fr = [r.get("fraction_of_peak") for r in tr["table"] if "paper" in str(r.get("section"))
              and r.get("fraction_of_peak")]
        if fr:
            out.append({"goal": "AP-MAE paper preset >= 40% of bf16 peak",
                        "measured": round(max(fr), 3),
                        "measured/goal": round(max(fr) / GOALS["train_fraction_of_peak"], 3)})
    enc = load("gpu_check_encode")
    if enc:
        rate = enc["table"][0]["maps_per_s"]
        out.append({"goal": "encode >= 20,000 maps/s", "measured": rate,
                    "measured/goal": round(rate / GOALS["encode_maps_per_s"], 3)})
    return out


# steps whose figures come from a bench script's own record
BENCH_RECORDS = {"capture": "capture", "train-speed": "bench_train"}


def summary(args) -> None:
    """Every step's status (its record, else the runner's, else the bench script's record for
    this machine) and the goals.  ``--tag`` summarises another machine's records (copied
    back from a device): the summary names that machine, not the one writing it."""
    tag = getattr(args, "tag", None) or machine_tag()
    statuses = json.loads(Path(args.statuses).read_text()) if args.statuses else {}
    table = []
    for step in STEPS:
        path = RESULTS / f"gpu_check_{step}-{tag}.json"
        rec = json.loads(path.read_text())["table"][0] if path.exists() else {}
        bench = RESULTS / f"{BENCH_RECORDS.get(step, '-')}-{tag}.json"
        status = rec.get("status") or statuses.get(step) or (
            PASSED if bench.exists() else NOT_CHECKED)
        table.append({"step": step, "status": status, "why": rec.get("why", ""),
                      "figures": json.dumps({k: v for k, v in rec.items()
                                             if k not in ("step", "status", "why")})})
    table += [{"step": f"goal: {g['goal']}", "status": f"measured/goal {g['measured/goal']}",
               "why": "", "figures": json.dumps(g)} for g in goals(tag)]
    counts = {s: sum(r["status"] == s for r in table) for s in (PASSED, FAILED, NOT_CHECKED)}
    machine, notes = None, []
    if getattr(args, "tag", None):
        env_rec = RESULTS / f"gpu_check_env-{tag}.json"
        machine = json.loads(env_rec.read_text())["machine"] if env_rec.exists() else {"gpu": tag}
        notes.append(f"summarised on {describe_machine().get('cpu', 'another machine')} from "
                     f"the step records of {tag}")
    path = save("gpu_check", counts, table, notes, tag=tag, machine=machine)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in RESULTS.glob(f"*-{tag}.*"):
            shutil.copy2(f, Path(out) / f.name)
    print(f"gpu_check: {counts[PASSED]} passed, {counts[FAILED]} failed, "
          f"{counts[NOT_CHECKED]} not checked; {path}")
    sys.exit(1 if counts[FAILED] else 0)


SECTIONS = {"env": env, "parity": parity, "capture-encode": capture_encode, "train": train,
            "encode": encode_speed, "intervene": intervene, "torchrun": torchrun, "cuml": cuml,
            "dask-cuda": dask_cuda, "catboost-gpu": catboost_gpu, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=list(SECTIONS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="random:starcoder2-3b")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--qk-scale", type=float, default=8.0, help="attention logits x this")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--heads", default="all|layerwise:0.25", help="'|'-separated")
    ap.add_argument("--steps", type=int, default=40, help="train: optimizer steps")
    ap.add_argument("--maps", type=int, default=20000, help="encode: maps timed")
    ap.add_argument("--batch-size", type=int, default=256, help="encode: maps per batch")
    ap.add_argument("--rows", type=int, default=50_000, help="catboost-gpu: rows")
    ap.add_argument("--tag", default=None, help="summary: the machine tag of the records "
                    "(default: this machine's)")
    ap.add_argument("--statuses", default=None, help="summary: JSON of step -> status from "
                    "the runner (steps that died before writing their record)")
    args = ap.parse_args()
    SECTIONS[args.step](args)


if __name__ == "__main__":
    main()
