"""`flashgen bench --png`: TFLOP/s against sequence length, one panel per variant (head dim, causal), one
line per peer, from the JSON `flashgen bench` writes. Needs matplotlib (``pip install flashgen[plot]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PEER_STYLES = {  # flashgen solid and dark; peers lighter; the same colours in every panel
    "flashgen": ("black", "-", "o"), "default": ("gray", "--", "o"), "cudnn": ("tab:green", "-", "s"),
    "flash": ("tab:blue", "-", "^"), "efficient": ("tab:purple", ":", "v"), "flex": ("tab:orange", "-", "D"),
}  # fmt: skip
# Forced configs (`flashgen bench --config KEY`, peers named "config:KEY") cycle through these, dashed.
CONFIG_STYLES = [("tab:red", "--", "x"), ("tab:brown", "--", "+"), ("tab:pink", "--", "*"), ("tab:olive", "--", "P"),
                 ("tab:cyan", "--", "X"), ("darkred", "-.", "x"), ("teal", "-.", "+"), ("indigo", "-.", "*")]  # fmt: skip


def _styles(results: Sequence[dict]) -> dict[str, tuple[str, str, str]]:
    """A style per peer of the run: the fixed ones first, then each forced config in order of appearance."""
    named = [p for r in results for p in r["measurements"]]
    configs = [p for p in dict.fromkeys(named) if p not in PEER_STYLES]
    styles = {p: s for p, s in PEER_STYLES.items() if p in named}
    styles.update({p: CONFIG_STYLES[i % len(CONFIG_STYLES)] for i, p in enumerate(configs)})
    return styles


def plot_results(results: Sequence[dict], path: Path, *, title: str) -> Path:
    """Write a PNG of ``results`` (the ``PointResult.to_dict()`` list of one run) to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the PNG plot needs matplotlib: pip install 'flashgen[plot]'") from None
    panels: dict[tuple[int, bool], list[dict]] = {}
    for result in results:
        point = result["point"]
        panels.setdefault((point["head_dim"], point["causal"]), []).append(result)
    keys = sorted(panels)
    styles = _styles(results)
    figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False, sharey=True)
    for axis, key in zip(axes[0], keys):
        rows = sorted(panels[key], key=lambda r: r["point"]["seqlen"])
        peers = [p for p in styles if any(p in r["measurements"] for r in rows)]
        for peer in peers:
            xs = [r["point"]["seqlen"] for r in rows if (r["measurements"].get(peer) or {}).get("tflops")]
            ys = [r["measurements"][peer]["tflops"] for r in rows if (r["measurements"].get(peer) or {}).get("tflops")]
            if xs:
                color, line, marker = styles[peer]
                axis.plot(xs, ys, line, color=color, marker=marker, label=peer.removeprefix("config:"), linewidth=2 if peer == "flashgen" else 1.2)
        axis.set_xscale("log", base=2)
        axis.set_xticks([r["point"]["seqlen"] for r in rows], [str(r["point"]["seqlen"]) for r in rows])
        axis.set_title(f"head dim {key[0]}{', causal' if key[1] else ''}")
        axis.set_xlabel("sequence length")
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s")
    axes[0][0].set_ylim(bottom=0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 6)
    legend_rows = -(-len(labels) // columns)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.05 + 0.04 * legend_rows, 1, 1))
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
