"""The paper's figures, regenerated from `summary.parquet` and `train_logs.parquet` only.

Each figure is one function `fig_<name>(summary, logs) -> matplotlib Figure`; `figure_file` writes
it as PNG and PDF. Points are means over (domain, seed) cells with SEM error bars (SD / sqrt(n));
lambda = 0 is the plain fine-tune (`sft` cell) and is drawn at the left edge of a symlog axis.
`NEEDS` lists the grid methods a figure needs (or a test of the grid's methods), so the workflow
only asks for figures its grid can draw. A method's label and colour are its registry entry's
(`blockem.methods`). Judge-free runs draw the MC metrics in the judged ones' places (`MC_AS`),
except the figures of `RAW`, which read the summary as it is (`fig_methods`: `blockem.compare`
picks the judged or MC metrics, and their incoherence budget, itself).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from blockem import methods

NEEDS = {
    "tradeoff": {"blockem"}, "adherence_sft_loss": {"blockem"}, "blockem_vs_kl": {"blockem", "kl"},
    "epochs": {"epochs"}, "training_curves": {"blockem"}, "selection_rules": {"blockem", "random"},
    "em_vs_k": {"blockem:sizes"}, "sign_ablations": {"blockem", "kpos_only", "kneg_only",
                                                     "shuffled_signs"},
    "core_vs_final": {"blockem"},
    # every method against sft (blockem.compare): blockem and at least one other grid method
    "methods": lambda ms: "blockem" in ms and len({m for m in ms if ":" not in m}) >= 2,
}
RAW = {"methods"}  # figures that read the summary's own metrics (no MC_AS mapping)
# the cells that are no grid method: their colours and labels
OTHER_COLORS = {"sft": "k", "base": "grey", "control": "tab:brown", "steer_repair": "tab:olive",
                "steer_repair_random": "tab:cyan"}
OTHER_LABELS = {"sft": "SFT (lambda 0)", "base": "base", "control": "control (safe answers)",
                "steer_repair": "steer repair", "steer_repair_random": "steer repair (random)"}


def color(method: str) -> str | None:
    """The matplotlib colour of a cell method (a grid method's is its registry entry's)."""
    m = methods.REGISTRY.get(method)
    return m.color if m is not None else OTHER_COLORS.get(method)


def label(method: str) -> str:
    """The legend label of a cell method (a grid method's is its registry entry's)."""
    m = methods.REGISTRY.get(method)
    return m.label if m is not None else OTHER_LABELS.get(method, method)


def _mean_sem(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _values(summary, metric, eval_set):
    """(cell description, value) for one metric on one eval set (rates averaged over judges)."""
    return [(r, r["value"]) for r in summary if r["metric"] == metric
            and r["eval_set"] == eval_set and r.get("judge") is None]


def _plain(r):  # a cell of the main grid: own-domain latents, full set, one epoch
    return r["k_size"] is None and r["epoch"] is None and r["latents_from"] in (None, r["domain"])


def curve(summary, method, metric, eval_set, *, with_sft=True):
    """lambda -> (mean, sem) over (domain, seed) for a method (lambda 0 from its sft cells)."""
    rows = [(r, v) for r, v in _values(summary, metric, eval_set) if _plain(r)]
    pairs = {(r["domain"], r["seed"]) for r, _ in rows if r["method"] == method}
    by_lam = defaultdict(list)
    for r, v in rows:
        if r["method"] == method or (with_sft and r["method"] == "sft"
                                     and (r["domain"], r["seed"]) in pairs):
            by_lam[r["lam"] or 0.0].append(v)
    return {lam: _mean_sem(vs) for lam, vs in sorted(by_lam.items())}


def _relative(summary, method):
    """Per lambda: mean (dEM, dAd) over cells, normalised by the same (domain, seed) sft cell."""
    em = {(r["cell"]): (r, v) for r, v in _values(summary, "em_rate", "final") if _plain(r)}
    ad = {r["cell"]: v for r, v in _values(summary, "adherence", "in_domain")}
    ref = {(r["domain"], r["seed"]): (v, ad.get(r["cell"])) for r, v in em.values()
           if r["method"] == "sft"}
    out = defaultdict(lambda: ([], []))
    for cell, (r, v) in em.items():
        base = ref.get((r["domain"], r["seed"]))
        if r["method"] != method or not base or not base[0] or not base[1] or cell not in ad:
            continue
        out[r["lam"]][0].append((base[0] - v) / base[0])
        out[r["lam"]][1].append((ad[cell] - base[1]) / base[1])
    return {lam: (_mean_sem(a)[0], _mean_sem(b)[0]) for lam, (a, b) in sorted(out.items())}


def _errorbar(ax, points: dict, label: str, color: str):
    xs = list(points)
    ax.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs], marker="o",
                capsize=3, label=label, color=color)


def _lambda_axis(ax, lams):
    positive = [x for x in lams if x > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    ax.set_xlabel("lambda")


def _new(ncols=1, width=4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.4), squeeze=False)
    return fig, list(axes[0])


def fig_tradeoff(summary, logs):
    fig, axes = _new(3)
    panels = [("em_rate", "final", "EM rate (final)"),
              ("incoherence_rate", "final", "incoherence (final)"),
              ("adherence", "in_domain", "in-domain adherence")]
    for ax, (metric, eval_set, title) in zip(axes, panels):
        pts = curve(summary, "blockem", metric, eval_set)
        _errorbar(ax, pts, label("blockem"), color("blockem"))
        _lambda_axis(ax, pts)
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
    fig.suptitle("Safety-quality trade-off vs lambda (mean ± SEM over domains and seeds)")
    return fig


def _final_sft_loss(logs):
    """cell -> mean SFT loss over the last 10% of steps."""
    by_cell = defaultdict(list)
    for r in logs:
        by_cell[r["cell"]].append((r["step"], r["sft_loss"], r))
    out = {}
    for cell, rows in by_cell.items():
        rows.sort(key=lambda t: t[0])
        tail = rows[-max(1, len(rows) // 10):]
        out[cell] = (tail[0][2], sum(t[1] for t in tail) / len(tail))
    return out


def fig_adherence_sft_loss(summary, logs):
    fig, axes = _new(2)
    pts = curve(summary, "blockem", "adherence", "in_domain")
    _errorbar(axes[0], pts, label("blockem"), color("blockem"))
    axes[0].set_title("in-domain adherence")
    axes[0].set_ylim(-0.02, 1.02)
    pairs = {(r["domain"], r["seed"]) for r in logs if r["method"] == "blockem"}
    by_lam = defaultdict(list)
    for r, loss in _final_sft_loss(logs).values():
        if r["method"] == "blockem" and _plain({**r, "epoch": None}) or (
                r["method"] == "sft" and (r["domain"], r["seed"]) in pairs):
            by_lam[r["lam"] or 0.0].append(loss)
    loss_pts = {lam: _mean_sem(v) for lam, v in sorted(by_lam.items())}
    _errorbar(axes[1], loss_pts, label("blockem"), color("blockem"))
    axes[1].set_title("final SFT loss (last 10% of steps)")
    for ax in axes:
        _lambda_axis(ax, pts)
    return fig


def fig_blockem_vs_kl(summary, logs):
    fig, axes = _new(1, 5.0)
    ax = axes[0]
    for method in ("blockem", "kl"):
        pts = _relative(summary, method)
        ax.plot([p[1] for p in pts.values()], [p[0] for p in pts.values()], marker="o",
                label=label(method), color=color(method))
        for lam, (dem, dad) in pts.items():
            ax.annotate(f"{lam:g}", (dad, dem), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("normalised adherence change dAd")
    ax.set_ylabel("normalised EM reduction dEM")
    ax.legend()
    ax.set_title("BLOCK-EM vs KL regularisation (labels: lambda)")
    return fig


def _em_lines(summary, keep, x: str, xlabel: str, title: str):
    """Final EM against cell key `x`, one line per lambda, for the cells `keep` accepts."""
    fig, axes = _new(1, 5.0)
    ax = axes[0]
    by = defaultdict(list)
    for r, v in _values(summary, "em_rate", "final"):
        if keep(r):
            by[(r["lam"], r[x])].append(v)
    for lam in sorted({k[0] for k in by}):
        pts = {xv: _mean_sem(by[(lm, xv)]) for (lm, xv) in sorted(by) if lm == lam}
        _errorbar(ax, pts, f"lambda {lam:g}", None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("EM rate (final)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title(title)
    return fig


def fig_epochs(summary, logs):
    return _em_lines(summary, lambda r: r["method"] == "epochs", "epoch", "epoch",
                     "EM over epochs (re-emergence)")


def fig_training_curves(summary, logs):
    fig, axes = _new(2)
    lams = sorted({r["lam"] for r in logs if r["method"] == "blockem" and _plain({**r, "epoch": None})})
    pairs = {(r["domain"], r["seed"]) for r in logs if r["method"] == "blockem"}
    for i, lam in enumerate([0.0, *lams]):
        by_step = defaultdict(lambda: ([], []))
        for r in logs:
            ok = (r["method"] == "blockem" and r["lam"] == lam and _plain({**r, "epoch": None})) or (
                lam == 0.0 and r["method"] == "sft" and (r["domain"], r["seed"]) in pairs)
            if ok:
                by_step[r["step"]][0].append(r["sft_loss"])
                by_step[r["step"]][1].append(r["block_loss"])
        steps = sorted(by_step)
        name = "sft (lambda 0)" if lam == 0 else f"lambda {lam:g}"
        col = color("sft") if lam == 0 else f"C{i - 1}"
        axes[0].plot(steps, [_mean_sem(by_step[s][0])[0] for s in steps], label=name, lw=1,
                     color=col)
        if lam:
            axes[1].plot(steps, [_mean_sem(by_step[s][1])[0] for s in steps], label=name, lw=1,
                         color=col)
    axes[0].set_title("SFT loss")
    axes[1].set_title("L_block")
    axes[1].set_yscale("symlog", linthresh=1e-4)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return fig


def fig_selection_rules(summary, logs):
    fig, axes = _new(1, 5.0)
    ax = axes[0]
    lams = []
    for method in ("blockem", "topdelta", "random"):
        pts = curve(summary, method, "em_rate", "final")
        if len(pts) > 1:
            _errorbar(ax, pts, label(method), color(method))
            lams += list(pts)
    _lambda_axis(ax, lams)
    ax.set_ylabel("EM rate (final)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("Selection rules, same |K|")
    return fig


def fig_em_vs_k(summary, logs):
    return _em_lines(summary, lambda r: r["method"] == "blockem" and r["k_size"] is not None
                     and r["epoch"] is None, "k_size", "|K| (first latents of the selected set)",
                     "EM vs |K|")


def fig_sign_ablations(summary, logs):
    fig, axes = _new(1, 5.5)
    ax = axes[0]
    methods = ["blockem", "kpos_only", "kneg_only", "shuffled_signs"]
    lams = sorted({lam for m in methods for lam in curve(summary, m, "em_rate", "final",
                                                         with_sft=False)})
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        pts = curve(summary, m, "em_rate", "final", with_sft=False)
        xs = [j + i * width for j, lam in enumerate(lams) if lam in pts]
        ax.bar(xs, [pts[lam][0] for lam in lams if lam in pts], width,
               yerr=[pts[lam][1] for lam in lams if lam in pts], label=label(m), color=color(m))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lams))], [f"{x:g}" for x in lams])
    ax.set_xlabel("lambda")
    ax.set_ylabel("EM rate (final)")
    ax.legend(fontsize=7)
    ax.set_title("Sign ablations")
    return fig


def fig_core_vs_final(summary, logs):
    fig, axes = _new(1, 4.5)
    ax = axes[0]
    core = {r["cell"]: (r, v) for r, v in _values(summary, "em_rate", "core")}
    final = {r["cell"]: v for r, v in _values(summary, "em_rate", "final")}
    for method in sorted({r["method"] for r, _ in core.values()}):
        pts = [(v, final[c]) for c, (r, v) in core.items() if r["method"] == method and c in final]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label(method), s=14,
                   color=color(method))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("EM rate on core (selection set)")
    ax.set_ylabel("EM rate on final (held out)")
    ax.legend(fontsize=6)
    ax.set_title("Selection (core) vs held-out (final) prompts")
    return fig


def fig_methods(summary, logs):
    """Normalised EM reduction against adherence change, every compared method (one marker per
    strength, joined in strength order; SEM bars on both axes), the best point within the
    incoherence budget ringed, strengths over budget hollow (`blockem.compare`)."""
    from blockem.compare import comparison_rows

    fig, axes = _new(1, 6.4)
    fig.set_size_inches(6.4, 4.8)
    ax = axes[0]
    rows = [r for r in comparison_rows(summary) if not r["skipped"]]
    zero = lambda x: 0.0 if x is None or math.isnan(x) else x  # noqa: E731  (SEM of one pair)
    ax.scatter([0], [0], marker="s", color=color("sft"), zorder=3, label=label("sft"))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        col = color(method)
        m = methods.REGISTRY.get(method)
        xs = [r["adherence_change_mean"] for r in pts]
        ys = [r["em_reduction_mean"] for r in pts]
        if m is None or m.sft_at_zero:  # strength 0 is the sft cell: the curve starts there
            line, = ax.plot([0.0, *xs], [0.0, *ys], lw=1, color=col, label=label(method))
        else:
            line, = ax.plot(xs, ys, lw=1, color=col, label=label(method))
        col = line.get_color()
        for r, x, y in zip(pts, xs, ys):
            ax.errorbar([x], [y], xerr=[zero(r["adherence_change_sem"])],
                        yerr=[zero(r["em_reduction_sem"])], marker="o", ms=5, capsize=2,
                        color=col, mfc=col if r["within_budget"] else "white", lw=0.8)
            ax.annotate(f"{r['strength_value']:g}", (x, y), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
            if r["best"]:
                ax.scatter([x], [y], s=180, facecolors="none", edgecolors=col, linewidths=1.6,
                           zorder=4, linestyles="--" if r["note"] else "-")
    ax.axhline(1, color=color("base"), lw=0.6, ls="--", label="base EM")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    if rows:
        lim = rows[0]["budget"]
        unit = " nats" if rows[0]["metrics"] == "mc" else ""
        least = rows[0]["min_adherence_change"]
        ax.axvline(least, color="grey", lw=0.5, ls=":")
        ax.set_title(f"Methods vs SFT (mean ± SEM). Ringed: best within incoherence budget "
                     f"+{lim:g}{unit}\n(dashed: adherence < {100 * (1 + least):g}%); hollow: "
                     "over budget; labels: strength", fontsize=7)
    ax.set_xlabel("adherence change  Ad / Ad_sft - 1")
    ax.set_ylabel("EM reduction  (EM_sft - EM) / (EM_sft - EM_base)")
    ax.legend(fontsize=6)
    return fig


FIGURES = {name: globals()[f"fig_{name}"] for name in NEEDS}


# judge-free runs (judge.kind none): the MC metric drawn where a figure reads a judged one
MC_AS = {"mc_em_rate": "em_rate", "mc_adherence": "adherence", "mc_nll_shift": "incoherence_rate"}


def available(methods: set[str]) -> list[str]:
    """Figures a grid with these methods (and 'blockem:sizes' for a size sweep) can draw."""
    return [name for name, need in NEEDS.items()
            if (need(methods) if callable(need) else need <= methods)]


def figure_file(name: str, summary_path: Path, logs_path: Path, png: Path, pdf: Path) -> None:
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    from blockem.io import atomic_path

    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; choose from {sorted(FIGURES)}")
    summary = raw = pq.read_table(summary_path).to_pylist()
    logs = pq.read_table(logs_path).to_pylist()
    mc_only = not any(r["metric"] == "em_rate" for r in summary)
    if mc_only:  # a judge-free run: draw the MC metrics in the judged metrics' places
        summary = [{**r, "metric": MC_AS[r["metric"]],
                    "eval_set": "final" if r["metric"] == "mc_nll_shift" else r["eval_set"]}
                   for r in summary if r["metric"] in MC_AS]
    fig = FIGURES[name](raw if name in RAW else summary, logs)
    if mc_only:
        fig.suptitle("judge-free (MC items): EM = MC EM rate, adherence = MC adherence, "
                     "incoherence = neutral NLL shift (nats)", fontsize=7)
    fig.tight_layout()
    for path, fmt in ((png, "png"), (pdf, "pdf")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
    plt.close(fig)
