"""The demo's comparison table and its checks against the text-side targets, on made-up reports."""

from devise.demo import comparison_table, demo_checks


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


def test_checks_pass_and_fail_against_the_targets():
    searches = {
        "shoe": ["sneaker"] * 9 + ["bag"],
        "footwear": ["sandal", "ankle boot"] * 5,
        "running shoes": ["sneaker"] * 8 + ["shirt", "bag"],
    }
    checks = demo_checks(report("m", 90, 89.6, 99.0, 80, 50, 61.5, 85, 70), searches, 10)
    assert [ok for ok in checks.values()] == [True, True, True, True, True, True, False]
    assert '"running shoes": 8 footwear images in the top 10 (>= 9)' in checks
    checks = demo_checks(report("m", 90, 89.4, 98.9, 80, 50, 59.9, 84.9, 70), searches, 10)
    assert not any(list(checks.values())[:4])
