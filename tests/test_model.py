import pytest
import torch

from devise.losses import cosine_loss, get_loss, rank_loss
from devise.model import DeviseHead, HeadSpec, load_model, load_spec, model_id, save_model


def _spec(kind="mlp"):
    return HeadSpec(in_dim=12, out_dim=6, kind=kind, class_keys=["a", "b"], class_names=["a", "b"])


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_head_output_is_unit_norm(kind):
    head = DeviseHead(_spec(kind)).eval()
    out = head(torch.randn(5, 12) * 100)
    assert out.shape == (5, 6)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_mlp_is_the_notebooks_shape():
    head = DeviseHead(_spec("mlp"))
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 12), (12, 6), (6, 6)]


def test_save_load_round_trip_and_model_id(tmp_path):
    head = DeviseHead(_spec()).eval()
    head.set_feature_stats(torch.ones(12), torch.full((12,), 2.0))
    save_model(tmp_path / "model", head)
    again = load_model(tmp_path / "model")
    x = torch.randn(3, 12)
    assert torch.allclose(head(x), again(x))
    assert load_spec(tmp_path / "model").class_names == ["a", "b"]
    first = model_id(tmp_path / "model")
    assert first == model_id(tmp_path / "model")
    with torch.no_grad():
        head.net[0].weight.add_(1.0)
    save_model(tmp_path / "model", head)  # replaces in place, atomically
    assert model_id(tmp_path / "model") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _conse_head(weight: float) -> DeviseHead:
    from dataclasses import replace

    torch.manual_seed(0)
    head = DeviseHead(replace(_spec("linear"), conse_classes=4, conse_weight=weight, conse_top=2))
    labels = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    labels[3] = 0.0  # a label with no vector is never used
    head.set_conse(torch.randn(4, 12), torch.zeros(4), labels)
    return head.eval()


def test_the_conse_branch_blends_with_the_trained_projection_by_its_weight():
    x = torch.randn(7, 12)
    only_devise, only_conse, half = _conse_head(0.0), _conse_head(1.0), _conse_head(0.5)
    assert torch.allclose(only_devise(x), only_devise.devise(x))
    assert torch.allclose(only_conse(x), only_conse.conse(x))
    blend = torch.nn.functional.normalize(half.devise(x) + half.conse(x), dim=1)
    assert torch.allclose(half(x), blend, atol=1e-6)
    assert torch.allclose(half(x).norm(dim=1), torch.ones(7), atol=1e-5)
    # ConSE mixes the vectors of the top-2 labels that have one, by their probabilities
    probs = torch.softmax(x @ half.cls_weight.T, dim=1)[:, :3]
    top, idx = probs.topk(2, dim=1)
    want = torch.nn.functional.normalize((top[..., None] * half.label_vectors[idx]).sum(1), dim=1)
    assert torch.allclose(half.conse(x), want, atol=1e-5)


def test_a_model_with_a_conse_branch_saves_and_loads_it(tmp_path):
    head = _conse_head(0.7)
    save_model(tmp_path / "model", head)
    again = load_model(tmp_path / "model")
    x = torch.randn(3, 12)
    assert again.spec.conse_weight == 0.7 and again.spec.conse_classes == 4
    assert torch.allclose(head(x), again(x))
    with pytest.raises(ValueError, match="conse_weight"):
        DeviseHead(HeadSpec(in_dim=2, out_dim=2, conse_classes=2, conse_weight=1.5))


def test_load_spec_of_a_non_model_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="devise train"):
        load_spec(tmp_path)


def test_rank_loss_matches_the_paper_formula():
    torch.manual_seed(0)
    pred = torch.nn.functional.normalize(torch.randn(4, 5), dim=1)
    classes = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    targets = torch.tensor([0, 2, 1, 0])
    expected = 0.0
    for i in range(4):
        t = targets[i]
        for j in range(3):
            if j != t:
                expected += max(
                    0.0, 0.1 - float(pred[i] @ classes[t]) + float(pred[i] @ classes[j])
                )
    assert rank_loss(pred, classes, targets).item() == pytest.approx(expected / 4, rel=1e-5)


def test_rank_loss_is_zero_when_margin_is_met_and_decreases_toward_target():
    classes = torch.eye(3)
    assert rank_loss(classes.clone(), classes, torch.arange(3)).item() == 0.0
    wrong = classes[[1, 2, 0]]
    assert rank_loss(wrong, classes, torch.arange(3)).item() > 1.0


def test_cosine_loss_is_the_notebooks():
    pred = torch.randn(4, 5)
    classes = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2, 1])
    ref = torch.nn.CosineEmbeddingLoss()(pred, classes[t], torch.ones(4))
    assert cosine_loss(pred, classes, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert get_loss("rank") is rank_loss
    with pytest.raises(ValueError, match="rank"):
        get_loss("hinge2")


def test_saved_model_is_readable_by_others(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        save_model(tmp_path / "model", DeviseHead(_spec()))
    finally:
        os.umask(mask)
    mode = stat.S_IMODE((tmp_path / "model").stat().st_mode)
    assert mode == 0o755
    assert stat.S_IMODE((tmp_path / "model" / "spec.json").stat().st_mode) == 0o644


def _saved(tmp_path):
    head = DeviseHead(HeadSpec(in_dim=6, out_dim=4, kind="linear", class_keys=["a", "b"]))
    return save_model(tmp_path / "model", head)


def test_truncated_weights_and_broken_spec_are_one_line_naming_the_file(tmp_path):
    from devise.model import ModelError

    model = _saved(tmp_path)
    weights = model / "head.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    for load in (load_model, load_spec):
        with pytest.raises(ModelError) as info:
            load(model)
        assert str(weights) in str(info.value) and "\n" not in str(info.value)
    weights.write_bytes(data)
    (model / "spec.json").write_text('{"in_dim": 6, "out_')
    with pytest.raises(ModelError, match="spec.json is damaged") as info:
        load_model(model)
    assert str(model / "spec.json") in str(info.value)


def test_cli_with_a_truncated_head_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model = _saved(tmp_path)
    weights = model / "head.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "images").mkdir()
    argv = ["embed", "--local", "--model", str(model), "--images", str(tmp_path / "images")]
    proc = subprocess.run(
        [sys.executable, "-m", "devise", *argv, "--out", str(tmp_path / "out")],
        check=False, cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("devise embed: error: Model weights ")
    assert str(weights) in lines[0]
