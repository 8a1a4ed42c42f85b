"""results.md and results.png of a benchmark run, made from results.json alone (so they can be remade from a
finished run, and a partial run still tabulates what it has)."""
from __future__ import annotations

import math
from pathlib import Path

from nnunetv2_textseg.atomic import atomic_write

from benchmarks.runner.presets import CONTROL_SUFFIX, VARIANT_MC_SAMPLES, fraction_label

__all__ = ["markdown", "plot", "rows_for_report", "variant_rows", "variant_markdown", "control_labels"]


def _fmt(x, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def control_labels(settings: dict) -> list[str]:
    """Table labels of the control rows (results.json of earlier versions had one "control_label")."""
    if settings.get("control_labels") is not None:
        return list(settings["control_labels"])
    return [settings["control_label"]] if settings.get("control_label") else []


def rows_for_report(data: dict) -> tuple[list[dict], str | None]:
    s = data["settings"]
    baseline = s.get("baseline")
    labels = list(s["trainers"]) + control_labels(s)
    fractions = sorted({m["fraction"] for m in data["fraction_folds"].values()})
    conditions = [c["name"] for c in s["conditions"]]
    wanted = [e for e in data["entries"] if e["label"] in labels and e["fraction"] in fractions
              and e["condition"] in conditions]
    base = {(e["fraction"], e["condition"]): e for e in wanted if e["label"] == baseline}
    rows = []
    for f in fractions:
        for c in conditions:
            for label in labels:
                e = next((x for x in wanted if x["label"] == label and x["fraction"] == f and x["condition"] == c), None)
                if e is None:
                    continue
                b = base.get((f, c))
                rows.append({**e, "d_dice": None if b is None or label == baseline else e["dice"] - b["dice"],
                             "d_iou": None if b is None or label == baseline else e["iou"] - b["iou"]})
    return rows, baseline


def markdown(data: dict) -> str:
    s, m = data["settings"], data.get("machine", {})
    rows, baseline = rows_for_report(data)
    conds = ", ".join(c["name"] + (f" ({c['level']})" if c["level"] is not None else "") for c in s["conditions"])
    n_val = next(iter(data["fraction_folds"].values()), {}).get("n_val")
    lines = [
        f"# Text vs vision: {data.get('dataset', {}).get('name', '?')}",
        "",
        f"Commit `{data.get('commit') or 'unknown'}`; preset `{s['preset']}`; "
        + (f"demo data {s['size']}² px, {s['n_train']} train / {s['n_test']} test cases, " if s["dataset"] is None
           else f"dataset {s['dataset']}, ")
        + f"seed {s['seed']}; device {s['device']} ({m.get('cpu_count')} CPUs, torch {m.get('torch')}); "
        f"trainers {', '.join(s['trainers'])}; label fractions "
        f"{', '.join(fraction_label(f) for f in s['fractions'])} of nnU-Net's fold-0 training cases "
        f"(validation: the same {n_val} fold-0 cases for every fraction); conditions {conds}.",
        "",
        f"Dice / IoU: `nnUNetv2_evaluate_folder` foreground mean over the test cases. "
        f"Δ = difference to `{baseline}` at the same fraction and condition." if baseline else
        "Dice / IoU: `nnUNetv2_evaluate_folder` foreground mean over the test cases (no plain nnUNetTrainer* "
        "baseline in the run, so no differences).",
        "",
        "| fraction | condition | trainer | train cases | Dice | Δ Dice | IoU | Δ IoU |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {fraction_label(r['fraction'])} | {r['condition']} | {r['label']} | {r['n_train']} | "
                     f"{_fmt(r['dice'])} | {_fmt(r['d_dice'], True)} | {_fmt(r['iou'])} | {_fmt(r['d_iou'], True)} |")
    if not rows:
        lines.append("| – | – | – | – | – | – | – | – |")
    lines += variant_markdown(data)
    return "\n".join(lines) + "\n"


def variant_rows(data: dict) -> list[dict]:
    """Report-variant entries of the current settings' text trainers, ordered trainer x variant kind."""
    from nnunetv2_textseg.report_variants import VARIANT_KINDS
    s = data["settings"]
    if not s.get("report_variants"):
        return []
    entries = data.get("report_variant_entries", [])
    rows = []
    for trainer in s["trainers"]:
        mine = {e["variant"]: e for e in entries if e["trainer"] == trainer}
        base = mine.get("original")
        for kind in list(s.get("variant_reports") or VARIANT_KINDS):
            e = mine.get(kind)
            if e is None:
                continue
            rows.append({**e, "d_dice": None if base is None or kind == "original" else e["dice"] - base["dice"]})
    return rows


def variant_markdown(data: dict) -> list[str]:
    rows = variant_rows(data)
    if not rows:
        return []
    mc = sorted({r["trainer"] for r in rows if r.get("mc_samples")})
    user = data["settings"].get("variant_reports")
    source = ("(your tables, `--variant_reports`: " + ", ".join(f"{k} = `{Path(v).name}`" for k, v in user.items())
              + ")") if user else (
        "(`nnunetv2_textseg.report_variants`: contradictory = location mirrored/flipped, missing_location = no "
        "side/zone words, overdescriptive = irrelevant detail added, underdescriptive = \"Pulmonary infection.\")")
    return [
        "",
        "## Report quality (100 % of the labels, clean test images)",
        "",
        "Each text trainer predicts the clean test images once per report variant " + source + " "
        "with `--save_uncertainty`" + (f" (`--mc_samples {VARIANT_MC_SAMPLES}` for {', '.join(mc)})" if mc else "")
        + ". Δ Dice = difference to the same trainer with the original reports. Entropy: mean predictive entropy "
        "(nats) over all pixels of all test cases, and over the pixels predicted as foreground."
        + ("" if user else " The original row repeats the clean 100 % prediction of the first table"
           + (" (for the Monte-Carlo trainers up to their sampling)" if mc else "") + "."),
        "",
        "| trainer | variant | Dice | Δ Dice | mean entropy | entropy in predicted foreground |",
        "|---|---|---:|---:|---:|---:|",
    ] + [f"| {r['trainer']} | {r['variant']} | {_fmt(r['dice'])} | {_fmt(r['d_dice'], True)} | "
         f"{_fmt(r.get('mean_entropy'))} | {_fmt(r.get('mean_entropy_foreground'))} |" for r in rows]


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["settings"]
    rows, _ = rows_for_report(data)
    labels = list(s["trainers"]) + control_labels(s)
    labels = [l for l in labels if any(r["label"] == l for r in rows)] or labels
    fractions = sorted({m["fraction"] for m in data["fraction_folds"].values()})
    conditions = [c["name"] for c in s["conditions"]]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(conditions), figsize=(max(4.5, 1.2 + 0.45 * len(labels) * len(fractions))
                                                          * len(conditions), 4.2), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(labels))
    for ax, cond in zip(axes[0], conditions):
        for j, label in enumerate(labels):
            xs, ys = [], []
            for i, f in enumerate(fractions):
                r = next((r for r in rows if r["label"] == label and r["fraction"] == f and r["condition"] == cond), None)
                if r is not None and r["dice"] is not None and not math.isnan(r["dice"]):
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["dice"])
            control = label.endswith(CONTROL_SUFFIX)
            # a control row takes its trainer's colour, hatched and pale, so the pair reads at a glance
            k = labels.index(label[:-len(CONTROL_SUFFIX)]) if control and label[:-len(CONTROL_SUFFIX)] in labels else j
            bars = ax.bar(xs, ys, width, color=colours(k % 10), alpha=0.55 if control else 1.0, label=label,
                          hatch="//" if control else None, edgecolor="black" if control else None)
            for b, y in zip(bars, ys):
                ax.text(b.get_x() + b.get_width() / 2, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(fractions)), [fraction_label(f) for f in fractions])
        ax.set_xlabel("label fraction")
        ax.set_title(cond)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice (test set, foreground mean)")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(4, max(1, len(names))), fontsize=8, frameon=False)
    fig.suptitle(f"Text vs vision: {data.get('dataset', {}).get('name', '')} (commit {data.get('commit') or '?'})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))  # a reader never sees half a figure
    finally:
        plt.close(fig)

