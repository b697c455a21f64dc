"""Capture on N torchrun ranks against one process, on this machine's CPU cores.

    python bench/bench_capture_ranks.py [--model smollm2] [--window 256] [--per-task 4]

Builds a run of random prompts whose targets are half the model's own greedy choice
(``synthetic_tasks``), captures its analysis split with one process (torch's default threads
and 1 thread) and with ``torchrun --nproc_per_node=2`` (1 thread per rank), checks the
three runs are identical, and writes bench/results/capture-ranks-<machine>.{json,md}: wall
time per launch and, per rank, its capture seconds and the merge.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from common import child_env, save  # noqa: E402

from apmae_gpu.capture import llm  # noqa: E402
from apmae_gpu.core.store import MapStore  # noqa: E402
from apmae_gpu.synthetic import synthetic_tasks  # noqa: E402


def launch(run: Path, args, nproc: int, threads: int | None) -> dict:
    env = child_env()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cli = [sys.executable, "-m", "apmae_gpu.cli", "capture", str(run), "--model", args.model,
           "--per-task", str(args.per_task), "--batch-size", str(args.batch_size),
           "--device", "cpu"]
    if nproc > 1:
        cli = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cli[1:]]
    t0 = time.perf_counter()
    subprocess.run(cli, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    man = json.loads((run / "manifest.json").read_text())["capture"]
    info = man["splits"]["analysis"]
    return {"launch": f"{nproc} process{'es' if nproc > 1 else ''} x "
                      f"{threads or 'default'} thread(s)", "wall_s": round(wall, 1),
            "attempts": sum(t["attempts"] for t in info["tasks"].values()),
            "kept": sum(t["kept"] for t in info["tasks"].values()),
            "capture_s_per_rank": (info["this_call"]["seconds"] if "this_call" in info else
                                   {k: v["seconds"] for k, v in info["shards"].items()}),
            "attempts_per_rank": (info["this_call"]["attempts"] if "this_call" in info else
                                  {k: v["attempts"] for k, v in info["shards"].items()}),
            "surplus_attempts": info.get("surplus_attempts", 0),
            "merge_s": man.get("merge_seconds")}


def snapshot(run: Path):

    s = MapStore(run)
    return s.inferences(), s.read(np.arange(s.n_maps))


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--per-task", type=int, default=4)
    ap.add_argument("--n-per-task", type=int, default=24, help="candidates per task")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    base = synthetic_tasks(root / "base", args.model, n_per_task=args.n_per_task,
                           window=args.window)
    rows, snaps = [], []
    for nproc, threads in ((1, None), (1, 1), (2, 1)):
        run = root / f"run-{nproc}-{threads}"
        shutil.copytree(base, run)
        rows.append(launch(run, args, nproc, threads))
        print(rows[-1], flush=True)
        snaps.append(snapshot(run))
    same = all(a[0].equals(snaps[0][0]) and np.array_equal(a[1].view(np.uint16),
                                                          snaps[0][1].view(np.uint16))
               for a in snaps[1:])

    fam = llm.family(llm.load_model(args.model, device="cpu"))
    figures = {"model": args.model, "window": args.window, "per_task": args.per_task,
               "batch_size": args.batch_size, "maps_per_inference": fam.n_layers * fam.n_heads,
               "identical_runs": bool(same),
               "speedup_2_ranks_vs_1_process": round(rows[0]["wall_s"] / rows[2]["wall_s"], 2)}
    save("capture-ranks", figures, rows, [
        f"{args.model}, {args.window}-token prompts, analysis split, --per-task {args.per_task} "
        f"--batch-size {args.batch_size}; the three runs are {'identical' if same else 'DIFFERENT'}"
        " (inferences and maps, bit for bit)",
        "wall_s includes interpreter start, model load (per rank) and, for torchrun, the merge"])
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
