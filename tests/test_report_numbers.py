"""Numbers that must not mislead: the ECE change after temperature scaling, said with its noise."""

import numpy as np

from visionops.tasks.classification.evaluate import calibration_sentence, ece_change


def _probs(conf: np.ndarray, pred: np.ndarray, k: int = 10) -> np.ndarray:
    p = np.tile(((1 - conf) / (k - 1))[:, None], (1, k))
    p[np.arange(len(conf)), pred] = conf
    return p


def test_ece_change_is_called_better_only_beyond_its_bootstrap_noise():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 10, n)
    right = rng.random(n) < 0.7  # 70% correct
    pred = np.where(right, y, (y + 1) % 10)
    overconfident, honest = _probs(np.full(n, 0.99), pred), _probs(np.full(n, 0.7), pred)
    jitter = _probs(np.clip(0.7 + rng.normal(0, 0.01, n), 0.11, 1.0), pred)

    better = ece_change(overconfident, honest, y, 15)
    assert better["change"] < -0.2 and better["verdict"] == "lower (better calibrated)"
    worse = ece_change(honest, overconfident, y, 15)
    assert worse["verdict"] == "higher (worse calibrated)"
    noise = ece_change(honest, jitter, y, 15)
    assert abs(noise["change"]) <= 2 * noise["se"] and noise["verdict"] == "within noise"
    assert noise["resamples"] == 200 and ece_change(honest, jitter, y, 15) == noise  # seeded: DVC-stable

    text = calibration_sentence(noise, n)
    assert "within binning noise" in text and "improv" not in text and "better calibrated" not in text
    if noise["change"] > 0:
        assert "left the ECE higher" in text
    assert "higher (worse calibrated)" in calibration_sentence(worse, n)


def test_ort_throughput_alternates_models_in_one_process(tmp_path):
    from visionops.models import create_model
    from visionops.serving import export

    model = create_model("lenet", in_channels=1, num_classes=10, image_size=32).eval()
    export.export_onnx(model, (32, 32, 1), tmp_path / "a.onnx")
    a, b = export.ort_throughput([tmp_path / "a.onnx", tmp_path / "a.onnx"], (32, 32, 1), batch_size=4, repeats=5)
    assert a["alternated_with"] == b["alternated_with"] == 1 and a["images_per_second"] > 0 < b["images_per_second"]
    single = export.ort_throughput(tmp_path / "a.onnx", (32, 32, 1), batch_size=4, repeats=3)
    assert single["alternated_with"] == 0
