"""What `devise evaluate` writes: metrics.json, report.md (the paper-style tables) and the
confusion matrices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from devise.metrics import KS

# The model's default scorer when it blends DeViSE with its backbone's ConSE (HeadSpec).
COMBINED = "DeViSE+ConSE"
METHODS = ("softmax", "ConSE", "DeViSE", COMBINED)


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def confusion_png(scores, targets, names, unseen_classes, out: Path, how: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    pred = scores.argmax(axis=1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (targets, pred), 1)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    labels = [f"{m}*" if u else m for m, u in zip(names, unseen_classes)]
    ax.set_xticks(range(n), labels, rotation=60, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    cm[i, j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted (among all classes)")
    ax.set_ylabel("true class (* = held out, never trained on)")
    ax.set_title(f"DeViSE confusion, test + held-out images:\n{how}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """metrics.json (every figure) and report.md (the tables) in out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=json_default))
    (out / "report.md").write_text(markdown_report(report))


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.1f}"


def markdown_report(report: dict) -> str:
    """The paper-style tables as markdown."""
    c = report["counts"]
    lines = [
        (
            f"Backbone {report['backbone']} at {report['image_size']} px, {report['head']} head, "
            f"text space {report['vectors']}. {c['train_images']} train, {c['test_images']} test "
            f"and {c['unseen_images']} unseen images; {c['seen_classes']} training classes, "
            f"{c['unseen_classes']} held out ({', '.join(report['unseen_classes']) or 'none'})."
        ),
        "",
        (
            "| method | flat hit@1 | @2 | @5 | @10 | zero-shot hit@1 | @2 | @5 | @10 | P@10 | mAP "
            "| group words P@10 |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods = [m for m in METHODS if m in report["methods"]]
    for method in methods:
        row = report["methods"].get(method, {})
        flat = [row.get("flat", {}).get(f"hit@{k}") for k in KS]
        zs = [row.get("zero_shot", {}).get(f"hit@{k}") for k in KS]
        ret = row.get("retrieval", {})
        cells = [*flat, *zs, ret.get("P@10"), ret.get("mAP"), row.get("concepts", {}).get("P@10")]
        name = f"**{method}** (default)" if method == report.get("default_method") else method
        lines.append(f"| {name} | " + " | ".join(_fmt(x) for x in cells) + " |")
    lines += [
        "",
        (
            "Flat hit@k: test images of the training classes, nearest among the training classes. "
            "Zero-shot (DeViSE-0): held-out images among the held-out classes only. "
            "P@10 and mAP: each class's text as a search query over the test and held-out "
            'images. Group words: everyday words that name several classes ("bird", '
            '"vehicle"), an image counting when WordNet puts its class under the word.'
        ),
        "",
        "Generalized zero-shot (test + held-out images among all classes; per-class top-1):",
        "",
        "| method | calibration | seen | unseen | H |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for method in methods[1:]:
        row = report["methods"].get(method, {})
        for key, label in (("gzsl", "none"), ("gzsl_calibrated", "calibrated stacking")):
            g = row.get(key)
            if g:
                lbl = label if key == "gzsl" else f"{label}, γ = {g['gamma']:.3f}"
                lines.append(
                    f"| {method} | {lbl} | {_fmt(g['seen'])} | {_fmt(g['unseen'])} | "
                    f"{_fmt(g['H'])} |"
                )
    lines += _notes(report)
    return "\n".join(lines) + "\n"


def _notes(report: dict) -> list[str]:
    """The lines under the tables: how γ was chosen, ConSE's labels, the class text, group words."""
    lines: list[str] = []
    cal = report["calibration"]
    if cal.get("draws"):
        optima = ", ".join(f"{d['gamma']:.2f}" for d in cal["draws"])
        lines += [
            "",
            (
                f"γ was chosen on the training split only: in each of {len(cal['draws'])} draws "
                f"{len(cal['draws'][0]['pseudo_unseen'])} training classes were held out as "
                f"pseudo-unseen and an auxiliary head was trained on the rest like the real one "
                f"({cal['aux_epochs']} epochs, recipe from {Path(cal['recipe_source']).name}); "
                f"γ maximises the mean H over the draws (per-draw optima "
                f"{optima}). ConSE, which has no "
                "training, takes its γ from the training images with the first draw's classes."
            ),
        ]
    if report.get("conse"):
        lines += ["", f"ConSE: {report['conse']}."]
    lines += [
        "",
        (
            f"Class text: {report.get('class_text', 'name')}; the default scorer blends ConSE in "
            f"with weight {report.get('conse_weight', 0.0):.1f} (both chosen on pseudo-unseen "
            "training classes when training)."
        ),
    ]
    per = report["methods"].get(report.get("default_method"), {}).get("concepts", {})
    if per.get("per_word"):
        words = ", ".join(f"{w} {p / 10:.0f}/10" for w, p in per["per_word"].items())
        lines += ["", f"Group words, {report.get('default_method')} top 10: {words}."]
    return lines
