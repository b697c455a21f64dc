"""Where one capture forward spends its device time: torch.profiler's top operators for
``forward_with_maps`` (all heads, log scaler) against the plain forward of the same batch.

    python bench/profile_capture.py [--model random:starcoder2-3b] [--batch-size 4] [--rows 12]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import REPO  # noqa: E402,F401  (puts the repository on the path)

from apmae_gpu.capture import llm  # noqa: E402
from apmae_gpu.capture.maps import forward_with_maps  # noqa: E402
from apmae_gpu.core.devices import resolve_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:starcoder2-3b")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    device = resolve_device("auto")
    lm = llm.load_model(args.model, device=device)
    fam = llm.family(lm)
    ids = torch.randint(100, 40000, (args.batch_size, args.window),
                        generator=torch.Generator().manual_seed(0)).to(device)
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    for name, fn in [("plain", lambda: lm(input_ids=ids, logits_to_keep=1, use_cache=False)),
                     ("capture", lambda: forward_with_maps(lm, fam, ids, [None] * fam.n_layers,
                                                           "log"))]:
        with torch.inference_mode():
            fn()
            with torch.profiler.profile(activities=acts) as prof:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
        print(f"== {name} ({args.model}, batch {args.batch_size}, window {args.window}, {device})")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
