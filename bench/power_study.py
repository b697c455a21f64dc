"""Power of the findings' tests at the study's shape (``configs/study.yaml``, docs/study.md),
simulated for the tests the findings actually run (``apmae_gpu.report.findings_stats``).

    python bench/power_study.py [--n 600] [--pairs 300] [--sims 4000]

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

from apmae_gpu.report import findings_stats as S  # noqa: E402

# SmolLM2-135M's share correct per task on the JDK (the first study's attempts,
# docs/findings-smollm2.md): the classes a task's n splits into when every attempt is kept
PRIORS = {"identifiers": 0.48, "boolean_literals": 0.45, "string_literals": 0.38,
          "end_of_line": 0.78, "random_masking": 0.39}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="labelled attempts per task")
    ap.add_argument("--pairs", type=int, default=300, help="held-out pairs per intervened task")
    ap.add_argument("--tasks-intervened", type=int, default=2)
    ap.add_argument("--sims", type=int, default=4000)
    a = ap.parse_args()
    m = len(PRIORS)
    lines = ["# Power of the findings' tests at the study's shape", "",
             f"`python bench/power_study.py --n {a.n} --pairs {a.pairs} --sims {a.sims}` "
             "(simulations of the tests `apmae_gpu.report.findings` runs; seed 0)", "",
             "| claim | test | setting | power |", "|---|---|---|---:|"]
    for task, prior in PRIORS.items():
        p = S.power_ba(a.n, prior, 0.58, 0.05, m, a.sims)
        lines.append(f"| predictable/{task} | Fisher, alpha 0.05/{m} | n {a.n}, "
                     f"{prior:.0%} correct, BA 0.58 | {p:.0%} |")
    p = S.power_cmh(a.n, list(PRIORS.values()), 0.53, 0.05, a.sims)
    lines.append(f"| predictable/all | CMH over {m} tasks, alpha 0.05 | {m} x {a.n}, BA 0.53 "
                 f"| {p:.0%} |")
    pairs = a.pairs * a.tasks_intervened
    for claim, diff in (("few_heads/all", 0.10), ("many_heads/all", -0.10)):
        for disc in (0.2, 0.3, 0.4):
            p = S.power_paired(pairs, disc, diff, 0.05, 1, a.sims)
            lines.append(f"| {claim} | McNemar score, alpha 0.05 | {pairs} pairs, "
                         f"{disc:.0%} discordant, {diff:+.0%} | {p:.0%} |")
    text = "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / "power_study.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
