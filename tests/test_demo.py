"""The demo's tables (each figure beside its baselines) and search counts, on made-up reports."""

from devise.demo import comparison_table, methods_table, search_facts


def report(space, softmax, flat, zs, seen, unseen, h, p10, ap, gamma=0.3):
    return {
        "vectors": space,
        "methods": {
            "softmax": {"flat": {"hit@1": softmax}},
            "DeViSE": {
                "flat": {"hit@1": flat},
                "zero_shot": {"hit@1": zs},
                "gzsl_calibrated": {"seen": seen, "unseen": unseen, "H": h, "gamma": gamma},
                "retrieval": {"P@10": p10, "mAP": ap},
            },
        },
    }


def test_the_comparison_table_has_one_row_per_text_space():
    reports = {
        "minilm": report("all-MiniLM-L6-v2@53aa5117", 90, 89.8, 99.5, 80, 50, 61.5, 86, 70),
        "glove-100d": report("glove-100d", 90, 88.1, 97.7, 85, 33, 47.2, 70, 55),
    }
    lines = comparison_table(reports, ["minilm", "glove-100d"]).splitlines()
    assert lines[0].startswith("| text space | softmax hit@1 | flat hit@1 | DeViSE-0 hit@1")
    assert all(c in lines[0] for c in ("seen", "unseen", "H", "P@10", "mAP"))
    assert lines[2].startswith("| all-MiniLM-L6-v2@53aa5117 | 90.0 | 89.8 | 99.5 | 0.30 |")
    assert lines[3].startswith("| glove-100d |") and len(lines) == 4


def test_the_methods_table_puts_the_default_scorer_beside_its_baselines():
    r = report("m", 68.6, 66.5, 20.5, 80, 50, 24.5, 59, 40)
    r["methods"]["ConSE"] = {"flat": {"hit@1": 49.4}, "zero_shot": {"hit@1": 60.0, "hit@5": 74.2}}
    r["methods"]["DeViSE+ConSE"] = {
        "flat": {"hit@1": 67.0},
        "zero_shot": {"hit@1": 70.0, "hit@5": 85.0},
        "concepts": {"P@10": 81.0},
    }
    r["default_method"] = "DeViSE+ConSE"
    lines = methods_table(r).splitlines()
    assert lines[0].startswith("| method | flat hit@1 | zero-shot hit@1 | zero-shot hit@5 |")
    assert lines[2].startswith("| softmax | 68.6 | — |")
    assert lines[3].startswith("| DeViSE | 66.5 | 20.5 |")
    assert lines[4].startswith("| ConSE | 49.4 | 60.0 | 74.2 |")
    assert lines[5].startswith("| **DeViSE+ConSE** (default) | 67.0 | 70.0 | 85.0 |")
    assert lines[5].endswith("| 81.0 |") and len(lines) == 6


def test_search_facts_count_footwear_and_held_out_hits_without_a_verdict():
    searches = {
        "sandal": ["sandal"] * 7 + ["sneaker"] * 3,
        "shoe": ["sneaker"] * 9 + ["bag"],
        "running shoes": ["sneaker"] * 8 + ["shirt", "bag"],
        "winter jacket": ["coat"] * 10,
    }
    facts = search_facts(searches, 10)
    assert facts == [
        '"sandal" (held out of training): 7 of 10 are sandals',
        '"shoe": 9 of 10 are footwear',
        '"running shoes": 8 of 10 are footwear',
    ]
    assert not any("PASS" in f or "FAIL" in f for f in facts)
