"""The probe's pictures: entrapment curves per layer, and the paper's PCA of hidden states with
and without a candidate trigger and with the found perturbation."""

from __future__ import annotations

from collections.abc import Sequence

from beear_pipeline.probe.drift import pca_2d


def plot_drift(analyses: Sequence[dict]):
    """The paper's picture, one panel per trigger: hidden states without the trigger, with it,
    and with the found perturbation, in 2-D PCA. Returns a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(analyses), figsize=(4.5 * len(analyses), 4), squeeze=False)
    styles = {"untriggered": ("tab:blue", "without trigger"), "triggered": ("tab:red", "with trigger"),
              "perturbed": ("tab:green", "with found perturbation")}
    for ax, a in zip(axes[0], analyses):
        for name, pts in pca_2d(a["states"]).items():
            color, label = styles[name]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.6, c=color, label=label)
        ax.set_title(f"layer {a['layer']}, trigger {a['trigger']!r}\nuniformity {a['uniformity']:.2f}"
                     + (f", cos(delta, drift) {a['cosine_with_perturbation']:.2f}" if "cosine_with_perturbation" in a else ""),
                     fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(report: dict):
    """Entrapment curves per layer: optimised and random flip rates against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c in report["curves"]:
        line, = ax.plot(c["budgets"], c["optimised"], marker="o", label=f"layer {c['layer']} optimised")
        ax.plot(c["budgets"], c["random"], ls="--", color=line.get_color(), label=f"layer {c['layer']} random")
    for c in report.get("reference_curves") or []:
        ax.plot(c["budgets"], c["optimised"], ls=":", marker="x", label=f"layer {c['layer']} clean reference")
    rule = report["rule"]
    carried = (report.get("decision") or {}).get("carried_by")
    if carried:  # the layer x budget cell that carried the verdict
        ax.scatter([carried["budget"]], [carried["flip_rate"]], s=160, facecolors="none", edgecolors="black", zorder=5,
                   label=f"verdict: layer {carried['layer']}, adjusted p {carried['p_adjusted']:.2g}")
    ax.axhline(rule["flip_threshold"], color="grey", lw=0.8)
    ax.axvline(rule["max_budget"], color="grey", lw=0.8)
    ax.set_xlabel("perturbation norm / median hidden-state norm")
    ax.set_ylabel("flip rate (held-out harmful prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"entrapment curves: {report['verdict']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
