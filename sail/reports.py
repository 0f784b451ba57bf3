"""Statistics and reports built from scores: bootstrap confidence intervals, paired comparisons,
accuracy and markdown tables, image grids and metric plots.
"""
import logging
import math
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sail.common import SailError

log = logging.getLogger("sail")


def bootstrap_ci(values, stat=np.mean, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap over the rows of `values` (prompts); returns (low, high)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    stats = stat(values[idx], axis=1)
    return tuple(float(q) for q in np.quantile(stats, [(1 - level) / 2, (1 + level) / 2]))


def summarize(values, n_boot=1000, seed=0):
    values = np.asarray(values, dtype=np.float64)
    return dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                n=int(len(values)), ci95=list(bootstrap_ci(values, n_boot=n_boot, seed=seed)))


def finite(values, what):
    """values as float64, or a SailError naming the rows that are NaN or infinite."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        raise SailError(f"{what}: {values[bad[0]]} at row {bad[0]} ({len(bad)} rows not finite)")
    return values


def paired(a, b, n_boot=1000, seed=0):
    """a against b, prompt by prompt: mean difference and win rate (a tie counts half), with CIs."""
    d = finite(a, "paired scores") - finite(b, "paired reference scores")
    wins = (d > 0) + 0.5 * (d == 0)
    return dict(delta=float(d.mean()), delta_ci=list(bootstrap_ci(d, n_boot=n_boot, seed=seed)),
                win=float(wins.mean()), win_ci=list(bootstrap_ci(wins, n_boot=n_boot, seed=seed)), n=int(len(d)))


def pair_accuracy(margins, n_boot=1000, seed=0):
    """Share of pairs with sigma(r_w - r_l) > 0.5, i.e. margin r_w - r_l > 0; a tie counts as wrong."""
    margins = finite(margins, "reward margins")
    correct = (margins > 0).astype(np.float64)
    return dict(accuracy=float(correct.mean()), ci95=list(bootstrap_ci(correct, n_boot=n_boot, seed=seed)),
                ties=int((margins == 0).sum()), n=int(len(margins)))


def accuracy_table(title, results):
    """results: {model: [dict(method, accuracy, ci95, ties, n)]} -> markdown (Figure 5 as a table)."""
    lines = [f"## {title}", "", "sigma(r_w - r_l) > 0.5 counts as right; a tie counts as wrong.", "",
             "| Model | Reward | Accuracy [95% CI] | Ties |", "|---|---|---|---|"]
    lines += [f"| {model} | {r['method']} | {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, "
              f"{100 * r['ci95'][1]:.1f}] | {r['ties']} of {r['n']} |" for model, rs in results.items() for r in rs]
    return "\n".join(lines) + "\n"


def _fmt(x, dec, sign=False):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{'+' if sign else ''}.{dec}f}"


def _mean_cell(s, dec):
    return f"{_fmt(s['mean'], dec)} [{_fmt(s['ci95'][0], dec)}, {_fmt(s['ci95'][1], dec)}]" if s else "–"


def compare(values, models, ref, n_boot=1000):
    """values[key][model] = {prompt_id: score}. Per key: the prompts shared by every model that has
    scores (n), each model's summary on them, and each model's paired comparison against `ref`."""
    out = {}
    for key, by_model in values.items():
        have = [m for m in models if by_model.get(m)]
        for m in have:
            bad = [(i, v) for i, v in by_model[m].items() if not math.isfinite(v)]
            if bad:
                raise SailError(f"{m}, {key}: score {bad[0][1]} for prompt {bad[0][0]!r} ({len(bad)} prompts not finite)")
        ids = sorted(set.intersection(*(set(by_model[m]) for m in have))) if have else []
        vec = {m: [by_model[m][i] for i in ids] for m in have} if ids else {}
        out[key] = dict(n=len(ids), summary={m: summarize(v, n_boot) for m, v in vec.items()},
                        paired={m: paired(v, vec[ref], n_boot) for m, v in vec.items() if ref in vec and m != ref})
    return out


def markdown_table(title, columns, models, stats, ref):
    """The layout of the paper's Tables 1-2, then the answer to "did it get better?" against `ref`.
    columns: [(key, label, decimals)]; stats: from compare()."""
    head = "| Model | " + " | ".join(label for _, label, _ in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [f"## {title}", "", "Mean score [95% bootstrap CI over prompts].", "", head, rule]
    for m in models:
        cells = [_mean_cell(stats[key]["summary"].get(m), dec) for key, _, dec in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Prompts per column: {', '.join(str(n) for n in sorted({stats[k]['n'] for k, _, _ in columns}))}.", ""]
    if not any(stats[key]["paired"] for key, _, _ in columns):
        return "\n".join(lines) + "\n"
    lines += [f"Against {ref}, prompt by prompt on the same seeds: mean difference [95% CI] / win rate [95% CI] "
              "(a tie counts half).", "", head, rule]
    for m in models:
        if m == ref:
            continue
        cells = []
        for key, _, dec in columns:
            p = stats[key]["paired"].get(m)
            cells.append("–" if p is None else
                         f"{_fmt(p['delta'], dec, True)} [{_fmt(p['delta_ci'][0], dec, True)}, "
                         f"{_fmt(p['delta_ci'][1], dec, True)}] / {100 * p['win']:.1f}% "
                         f"[{100 * p['win_ci'][0]:.1f}, {100 * p['win_ci'][1]:.1f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def image_grid(rows, models, out_path, label_width=220):
    """rows: [(prompt, [image path per model])]; one column per model, the same seed in a row."""
    first = Image.open(rows[0][1][0])
    cell = max(128, min(256, first.width))
    font = ImageFont.load_default()
    grid = Image.new("RGB", (label_width + cell * len(models), 24 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(models):
        draw.text((label_width + j * cell + 4, 4), name, fill="black", font=font)
    for i, (prompt, paths) in enumerate(rows):
        y = 24 + i * cell
        text = "\n".join(textwrap.wrap(" ".join(prompt.split()), 34)[: cell // 14])
        draw.multiline_text((4, y + 4), text, fill="black", font=font)
        for j, path in enumerate(paths):
            with Image.open(path) as img:
                grid.paste(img.convert("RGB").resize((cell, cell), Image.BICUBIC), (label_width + j * cell, y))
    tmp = Path(out_path).with_name(Path(out_path).stem + ".tmp.png")
    grid.save(tmp)
    os.replace(tmp, out_path)


def plot_metrics(series, models, out_path, title="", columns=None, reference=None):
    """series: {metric label: {line label: [(mean, low, high) or None per model]}} -> one panel per metric,
    columns panels to a row (default: all in one row); reference: {metric label: value}, a dotted line
    (the base model's, say). matplotlib is optional: without it the plot is skipped with a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install matplotlib): skipping %s", out_path)
        return False
    columns = columns or len(series)
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax, (metric, lines) in zip(axes.flat, series.items()):
        for label, points in lines.items():
            xs = [i for i, p in enumerate(points) if p]
            means = np.array([points[i][0] for i in xs])
            err = np.array([[means[k] - points[i][1], points[i][2] - means[k]] for k, i in enumerate(xs)]).T
            ax.errorbar(xs, means, yerr=np.nan_to_num(err), marker="o", capsize=3, label=label)
        if reference and reference.get(metric) is not None:
            ax.axhline(reference[metric], color="black", lw=0.8, ls=":")
        ax.set_xticks(range(len(models)), models, rotation=30)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(series):]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, out_path)
    return True


def save_figure(fig, out_path):
    """Write a matplotlib figure to out_path (a temporary name, then renamed) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = Path(out_path).with_name(Path(out_path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
