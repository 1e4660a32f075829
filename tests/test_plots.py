import matplotlib
import numpy as np
from PIL import Image

from msad_jax import plots


def test_plots_write_pngs_without_touching_the_backend(tmp_path):
    backend = matplotlib.get_backend()
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    scores = rng.normal(size=100) + labels
    paths = [
        plots.plot_roc(labels, scores, tmp_path / "roc.png", "t"),
        plots.plot_score_histograms(labels, scores, tmp_path / "s.png", "t", threshold=0.5),
        plots.plot_training_curves(
            [0, 1, 2], [0.9, 0.92, 0.95], [1, 2], [3.0, 2.5], tmp_path / "c.png", "t"
        ),
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert matplotlib.get_backend() == backend
