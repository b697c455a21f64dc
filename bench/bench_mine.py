"""Mining throughput (tasks/s, files/s) on the JDK sources with the embedded tokenizer.

    python bench/bench_mine.py [--corpus SRC] [--per-task 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from common import save, timer  # noqa: E402

from apmae_gpu.capture.llm import load_tokenizer  # noqa: E402
from apmae_gpu.mining.corpus import default_jdk_src  # noqa: E402
from apmae_gpu.mining.tasks import mine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", default=default_jdk_src())
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--per-task", type=int, nargs="+", default=[50, 200])
    args = ap.parse_args()
    if not args.corpus:
        sys.exit("no corpus: install openjdk-17-source or pass --corpus")
    load_tokenizer(args.model)  # convert/cache once, outside the timings
    table = []
    for n in args.per_task:
        with tempfile.TemporaryDirectory() as tmp, timer() as t:
            df = mine(Path(tmp) / "run", corpus=args.corpus, model=args.model, per_task=n, seed=0,
                      train_per_task=0)
            man = json.loads((Path(tmp) / "run" / "manifest.json").read_text())["mine"]
        table.append({"per_task": n, "tasks": len(df), "files_read": man["files_read"],
                      "seconds": round(t["seconds"], 2),
                      "tasks_per_s": len(df) / t["seconds"],
                      "files_per_s": man["files_read"] / t["seconds"],
                      "skipped": sum(man["skipped"].values())})
    save("mine", {"corpus": args.corpus, "model": args.model}, table,
         ["one process; time includes opening the corpus, parsing with tree-sitter, "
          "tokenizing windows and writing tasks.parquet"])


if __name__ == "__main__":
    main()
