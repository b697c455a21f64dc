"""The clustering figures' choices (which clusters a gallery shows) and the package's one
figure helper (atomic PNGs, identical to a plain savefig)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from apmae_gpu.clustering import figures as cluster_figures
from apmae_gpu.core.figures import png_bytes, pyplot, save_figure


def test_showcase_prefers_clusters_that_split_a_head():
    summary = pd.DataFrame([
        # head (0, 0): one cluster holding every map, the largest of all
        dict(layer=0, head=0, cluster=0, size=100, share=1.0, kept=True),
        # head (0, 1): two clusters; its largest holds 60% of the maps
        dict(layer=0, head=1, cluster=0, size=60, share=0.6, kept=True),
        dict(layer=0, head=1, cluster=1, size=40, share=0.4, kept=True),
        # head (1, 0): its largest cluster holds 45%, one that is filtered out is larger
        dict(layer=1, head=0, cluster=0, size=45, share=0.45, kept=True),
        dict(layer=1, head=0, cluster=1, size=50, share=0.5, kept=False),
    ])
    pick = cluster_figures._showcase(summary, 3)
    # one row per head; heads whose largest cluster splits them (share <= 0.5) first
    assert list(zip(pick.layer, pick["head"], pick.cluster)) == [(1, 0, 0), (0, 0, 0), (0, 1, 0)]
    assert list(cluster_figures._showcase(summary, 1).cluster) == [0]
    assert cluster_figures._showcase(summary.assign(kept=False), 3).empty


def test_save_figure_is_a_plain_savefig_written_atomically(tmp_path):
    plt = pyplot()

    def draw():
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.imshow(np.arange(16, dtype=np.float32).reshape(4, 4), cmap="magma")
        return fig

    ref = tmp_path / "ref.png"
    fig = draw()
    fig.savefig(ref, dpi=100)
    plt.close(fig)
    fig = draw()
    out = save_figure(fig, tmp_path / "sub" / "fig.png", dpi=100)
    assert out == tmp_path / "sub" / "fig.png"
    assert out.read_bytes() == ref.read_bytes()              # same PNG, byte for byte
    assert not plt.fignum_exists(fig.number)                  # closed
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]   # no temporary file left
    assert png_bytes(draw(), dpi=100) == ref.read_bytes()
    assert plt.get_fignums() == []
