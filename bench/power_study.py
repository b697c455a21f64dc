"""Power of the findings' tests at the study's shape (``configs/study.yaml``, docs/study.md),
simulated for the tests the findings actually run (``apmae_gpu.report.findings_stats``).

    python bench/power_study.py [--n 600] [--pairs 300] [--sims 4000]
    python bench/power_study.py --run runs/study   # the power a finished study achieved


Claim 4: per task, the one-sided Fisher test of balanced accuracy at alpha 0.05/5 (Holm's
first step over the five tasks: a lower bound on Holm's power), at a balanced accuracy of
0.58, for each task's share correct; pooled, the Cochran-Mantel-Haenszel test over the five
tasks at 0.53.  Claims 6/7: the one-sided McNemar score test on the pairs pooled over the
intervened tasks, at +-10 points, for several shares of discordant pairs.  Writes
``bench/results/power_study.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repository on the path: no install needed)

import pandas as pd  # noqa: E402

from apmae_gpu.core import layout  # noqa: E402
from apmae_gpu.core.frames import read_parquet  # noqa: E402
from apmae_gpu.report import findings_stats as S  # noqa: E402

# SmolLM2-135M's share correct per task on the JDK (the first study's attempts,
# docs/findings-smollm2.md): the classes a task's n splits into when every attempt is kept
PRIORS = {"identifiers": 0.48, "boolean_literals": 0.45, "string_literals": 0.38,
          "end_of_line": 0.78, "random_masking": 0.39}


def achieved(run: Path):
    """A finished study's shape: per task n and share correct (analysis split), the pooled
    held-out pairs, and each pre-registered condition's discordant share against random."""
    inf = read_parquet(run / layout.INFERENCES_PARQUET)
    inf = inf[(inf["split"] == "analysis") & inf["task"].isin(list(PRIORS))]
    priors = inf.groupby("task")["correct"].mean().to_dict()
    ns = inf.groupby("task").size().to_dict()
    res = pd.read_parquet(run / layout.INTERVENE_DIR / layout.RESULTS_PARQUET)
    pooled = res[res["task"] == "all"]
    disc = {}
    for claim, group, k in (("few_heads/all", "positive", 20), ("many_heads/all", "negative", 100)):
        row = pooled[(pooled["group"] == group) & (pooled["k"] == k)].iloc[0]
        disc[claim] = ((row["n_better_than_random"] + row["n_worse_than_random"]) / row["n"],)
    return priors, ns, disc, int(pooled["n"].iloc[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="labelled attempts per task")
    ap.add_argument("--pairs", type=int, default=300, help="held-out pairs per intervened task")
    ap.add_argument("--tasks-intervened", type=int, default=2)
    ap.add_argument("--sims", type=int, default=4000)
    ap.add_argument("--run", type=Path, default=None, help="a finished study: its tasks' n and "
                    "share correct, and its interventions' discordant shares")
    a = ap.parse_args()
    priors, ns, disc_shares = dict(PRIORS), {t: a.n for t in PRIORS}, (0.2, 0.3, 0.4)
    if a.run is not None:
        priors, ns, disc_shares, a.pairs = achieved(a.run)
    m = len(priors)
    lines = ["# Power of the findings' tests at the study's shape", "",
             f"`python bench/power_study.py --n {a.n} --pairs {a.pairs} --sims {a.sims}` "
             "(simulations of the tests `apmae_gpu.report.findings` runs; seed 0)", "",
             "| claim | test | setting | power |", "|---|---|---|---:|"]
    for task, prior in priors.items():
        p = S.power_ba(ns[task], prior, 0.58, 0.05, m, a.sims)
        lines.append(f"| predictable/{task} | Fisher, alpha 0.05/{m} | n {ns[task]}, "
                     f"{prior:.0%} correct, BA 0.58 | {p:.0%} |")
    n = min(ns.values())
    p = S.power_cmh(n, list(priors.values()), 0.53, 0.05, a.sims)
    lines.append(f"| predictable/all | CMH over {m} tasks, alpha 0.05 | {m} x {n}, BA 0.53 "
                 f"| {p:.0%} |")
    pairs = a.pairs * (1 if a.run is not None else a.tasks_intervened)
    for claim, diff in (("few_heads/all", 0.10), ("many_heads/all", -0.10)):
        for disc in (disc_shares[claim] if isinstance(disc_shares, dict) else disc_shares):
            p = S.power_paired(pairs, disc, diff, 0.05, 1, a.sims)
            lines.append(f"| {claim} | McNemar score, alpha 0.05 | {pairs} pairs, "
                         f"{disc:.0%} discordant, {diff:+.0%} | {p:.0%} |")
    text = "\n".join(lines) + "\n"
    name = "power_study" if a.run is None else f"power_study-{a.run.name}"
    out = Path(__file__).parent / "results" / f"{name}.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
