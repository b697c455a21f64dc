"""The findings at a glance (``apmae report``'s first section): a forest plot of every claim's
estimate and interval beside the paper's value, coloured by verdict, and the compact table
below it, each test described once in a footnote.

Claims live on different scales (balanced accuracy, accuracy differences, shares of heads,
ARI); the plot puts them on one: ``(x - null) / (paper - null)``, 0 = no effect, 1 = the
paper's magnitude (a row without a magnitude in the paper uses 0.1 as its unit, and says so).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from apmae_gpu.core.figures import pyplot

COLOURS = {"reproduced": "#1a9850", "weaker than the paper": "#fdae61",
           "not reproduced": "#d73027", "inconclusive": "#878787"}
LIMIT = 3.0      # the plot's x range: +-3 paper magnitudes


def scaled(tab: pd.DataFrame) -> pd.DataFrame:
    """Rows with an estimate, on the common scale: ``x``, ``lo``, ``hi`` (NaN where absent)."""
    t = tab[np.isfinite(tab["estimate"].astype(float))].copy()
    unit = (t["paper_value"] - t["null"]).astype(float)
    unit = unit.where(np.isfinite(unit) & (unit.abs() > 0), 0.1 * t["direction"])
    a, b = (t["ci_low"] - t["null"]) / unit, (t["ci_high"] - t["null"]) / unit
    t["x"] = (t["estimate"] - t["null"]) / unit
    t["lo"], t["hi"] = np.minimum(a, b), np.maximum(a, b)
    t["own_unit"] = ~np.isfinite(t["paper_value"]) | (t["paper_value"] == t["null"])
    return t


def forest(tab: pd.DataFrame):
    """The forest plot (a matplotlib figure) of ``tab`` (``report/findings.parquet``)."""
    plt = pyplot()
    t = scaled(tab).iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.28 * max(len(t), 1)))
    y = np.arange(len(t))
    for yi, r in zip(y, t.itertuples()):
        c = COLOURS.get(r.verdict, "k")
        lo, hi = np.clip([r.lo, r.hi], -LIMIT, LIMIT) if np.isfinite(r.lo) else (r.x, r.x)
        ax.plot([lo, hi], [yi, yi], color=c, lw=2)
        ax.plot(np.clip(r.x, -LIMIT, LIMIT), yi, "o", color=c, ms=5)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(1, color="k", lw=0.8, ls="--")
    ax.set_yticks(y, [c + (" *" if o else "") for c, o in zip(t["claim"], t["own_unit"])],
                  fontsize=7)
    ax.set_xlim(-LIMIT - 0.2, LIMIT + 0.2)
    ax.set_xlabel("(estimate - null) / (paper - null): 0 = no effect, 1 = the paper's "
                  "(dashed); * unit 0.1", fontsize=8)
    for v, c in COLOURS.items():
        ax.plot([], [], color=c, lw=3, label=v)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def compact(tab: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The table's compact form: estimate with its interval in one cell, the test as a
    footnote number (``[1]``...), and the footnotes (each test once)."""
    notes = list(dict.fromkeys(t for t in tab["test"] if t))
    ref = {t: f"[{i + 1}]" for i, t in enumerate(notes)}

    def est(r) -> str:
        if not np.isfinite(r.estimate):
            return "–"
        return f"{r.estimate:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}]"

    out = pd.DataFrame({
        "claim": tab["claim"], "paper": tab["paper"],
        "estimate [interval]": [est(r) for r in tab.itertuples()],
        "p": tab["p_value"], "n": tab["n"], "test": [ref.get(t, "") for t in tab["test"]],
        "verdict": tab["verdict"], "detail": tab["detail"]})
    return out, [f"{ref[t]} {t}" for t in notes]
