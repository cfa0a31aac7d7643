"""evaluate's report (per class, confusion, top-k, JSON, pictures) and the history.csv of every artifact."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics

import transferkit as tk
from transferkit.training.curves import epoch_stages, history_rows
from transferkit.data.sources import load_data
from transferkit.commands.report import class_report, most_confused, top_losses
from tests.test_cli import run


@pytest.fixture(scope="module")
def test_split(dropout_classifier_dir):
    """The classifier's own predictions on its test split, made here: model, data and split read directly."""
    digits = load_data("digits")
    index = np.asarray(json.loads((Path(dropout_classifier_dir) / "split.json").read_text())["test"])
    model = tk.load_model(dropout_classifier_dir)
    return model.predict(digits.x[index], batch_size=64, verbose=0), digits.y[index]


def test_report_equals_scikit_learn_on_independent_predictions(dropout_classifier_dir, test_split, tmp_path):
    probabilities, y = test_split
    predicted = probabilities.argmax(axis=1)
    result = tk.evaluate(dropout_classifier_dir, top_k=3, output=tmp_path / "report.json", verbose=False)
    ours = result.report["predictions"]["deterministic"]
    matrix = metrics.confusion_matrix(y, predicted, labels=range(10))
    assert ours["confusion_matrix"] == matrix.tolist()
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, predicted, labels=range(10),
                                                                             zero_division=0)
    assert [row["class"] for row in ours["per_class"]] == [str(i) for i in range(10)]
    np.testing.assert_allclose([row["precision"] for row in ours["per_class"]], precision)
    np.testing.assert_allclose([row["recall"] for row in ours["per_class"]], recall)
    np.testing.assert_allclose([row["f1"] for row in ours["per_class"]], f1)
    assert [row["support"] for row in ours["per_class"]] == support.tolist()
    assert ours["macro_avg"]["f1"] == pytest.approx(f1.mean())
    assert ours["weighted_avg"]["recall"] == pytest.approx(np.mean(predicted == y))
    assert result.metrics["balanced_accuracy"] == pytest.approx(recall[support > 0].mean())
    # the most-confused pairs are the largest off-diagonal counts, largest first
    off = matrix * (1 - np.eye(10, dtype=int))
    assert [p["count"] for p in ours["most_confused"]] == sorted(off[off > 0].tolist(), reverse=True)[:5]
    assert all(off[int(p["true"]), int(p["predicted"])] == p["count"] for p in ours["most_confused"])
    # the JSON file holds the same report, numbers included
    assert json.loads((tmp_path / "report.json").read_text()) == result.report


def test_top_k_accuracy_equals_a_numpy_count(dropout_classifier_dir, test_split):
    probabilities, y = test_split
    for k, expected_k in ((None, 5), (3, 3)):  # 10 classes: top-5 by default
        result = tk.evaluate(dropout_classifier_dir, top_k=k, verbose=False)
        best = np.argsort(-probabilities, axis=1)[:, :expected_k]
        assert result.report["top_k"] == expected_k
        assert result.metrics["top_k_accuracy"] == pytest.approx(np.mean([label in row for label, row in zip(y, best)]))


def test_top_k_is_off_by_default_with_five_classes_or_fewer():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    assert class_report(p, np.array([0, 1, 2]), list("abc"))["top_k_accuracy"] is None
    from transferkit.commands.report import resolve_top_k

    assert resolve_top_k(None, 5) is None and resolve_top_k(None, 6) == 5


@pytest.mark.parametrize("k", ["0", "10", "-1"])
def test_bad_top_k_exits_2_with_one_line(classifier_dir, k):
    result = run("evaluate", classifier_dir, "--top-k", k)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and f"top_k={k}" in result.output


def test_cli_prints_per_class_table_confusion_matrix_and_mc_report(dropout_classifier_dir, test_split, tmp_path):
    _, y = test_split
    result = run("evaluate", dropout_classifier_dir, "--mc-samples", "5", "--output", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines.index("confusion matrix (rows: true class, columns: predicted)")
    matrix = json.loads((tmp_path / "r.json").read_text())["predictions"]["deterministic"]["confusion_matrix"]
    assert [[int(v) for v in line.split()[1:]] for line in lines[header + 2:header + 12]] == matrix
    assert any(line.startswith("macro avg") for line in lines) and "top5_accuracy" in result.output
    mc = json.loads((tmp_path / "r.json").read_text())["predictions"]["mc_dropout"]
    assert np.sum(mc["confusion_matrix"]) == len(y)
    assert [row["support"] for row in mc["per_class"]] == np.bincount(y, minlength=10).tolist()


def test_plots_writes_confusion_and_top_losses_for_images(classifier_dir, tmp_path):
    assert load_data("digits").x.shape[1:] == (8, 8, 1)  # images: top_losses.png is drawn
    result = run("evaluate", classifier_dir, "--plots", tmp_path / "new" / "plots")
    assert result.exit_code == 0, result.output
    for name in ("confusion.png", "top_losses.png"):
        assert (tmp_path / "new" / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_plots_that_is_a_file_exits_2(classifier_dir, tmp_path):
    (tmp_path / "file").write_text("")
    result = run("evaluate", classifier_dir, "--plots", tmp_path / "file")
    assert result.exit_code == 2 and "--plots" in result.output and len(result.output.strip().splitlines()) == 1


def test_most_confused_and_top_losses_on_a_hand_example():
    p = np.array([[0.1, 0.9], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.99, 0.01]])
    y = np.array([0, 1, 0, 1, 1])
    # true-class probabilities 0.1, 0.4, 0.2, 0.3, 0.01: the highest losses are examples 4, 0, 2, 3, 1
    assert top_losses(p, y, 3).tolist() == [4, 0, 2]
    # predicted 1, 0, 1, 0, 0: 0 -> 1 twice, 1 -> 0 three times
    assert most_confused(np.array([[0, 2], [3, 0]]), ["a", "b"]) == [
        {"true": "b", "predicted": "a", "count": 3}, {"true": "a", "predicted": "b", "count": 2}]
    assert class_report(p, y, ["a", "b"], top_k=1)["top_k_accuracy"] == pytest.approx(0.0)


def test_history_csv_rows_match_history_json(classifier_dir, encoder_dir):
    # classifier_dir: head_epochs=2, then unfreeze_top=1 for epochs=2
    for artifact, stages in ((classifier_dir, ["head", "head", "top1", "top1"]), (encoder_dir, ["", ""])):
        history = json.loads((Path(artifact) / "history.json").read_text())
        with open(Path(artifact) / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(stages) + 1))
        assert [r["stage"] for r in rows] == stages
        assert set(rows[0]) == {"epoch", "stage", *history}
        for key, values in history.items():
            assert [float(r[key]) for r in rows] == values


def test_epoch_stages_follow_an_early_stopped_head_and_later_phases():
    stages = [{"name": "head", "phase": "labeled", "epochs": 5, "stopped_after": 3},
              {"name": "top1", "phase": "labeled", "epochs": 2},
              {"name": "top1", "phase": "pseudo1", "epochs": 2}]
    # Keras numbers on from each stage's planned start: head ran 1-3, top1 6-7, its pseudo round 8-9
    assert epoch_stages(stages, 7) == ([1, 2, 3, 6, 7, 8, 9], ["head"] * 3 + ["top1"] * 2 + ["top1 (pseudo1)"] * 2)
    # stages that do not account for the rows (a resumed run): plain numbers, no stage
    assert epoch_stages(stages, 9) == (list(range(1, 10)), [""] * 9)


def test_history_rows_put_loss_first_learning_rate_last_and_leave_out_partial_values():
    history = {"val_loss": [2.0, 1.0], "learning_rate": [0.1, 0.01], "loss": [3.0, 2.5], "accuracy": [0.1, 0.2],
               "block": [1.0]}
    rows = history_rows(history)
    assert list(rows[0]) == ["epoch", "stage", "loss", "accuracy", "val_loss", "learning_rate"]
    assert rows[1] == {"epoch": 2, "stage": "", "loss": 2.5, "accuracy": 0.2, "val_loss": 1.0, "learning_rate": 0.01}
