"""Every long step shows a progress bar with a total, so tqdm can give an ETA: the dataset scan before training,
the checks of a reader's files, knowledge generation, bootstrap resampling and the tower stage."""

import re

import datasets
import numpy as np


def bars(text: str, description: str) -> list[tuple[int, int]]:
    """(done, total) of every redraw of the bar called `description` in captured stderr."""
    pattern = rf"{re.escape(description)}: .*?(\d+)/(\d+) \["
    return [(int(done), int(total)) for done, total in re.findall(pattern, text)]


def test_bootstrap_shows_its_resamples(capsys, monkeypatch):
    import functools

    from radz.evaluation import metrics
    from radz.evaluation.metrics import bootstrap_auc_ci

    # leave=False clears the bar at close without a last redraw, and tqdm skips redraws within mininterval
    # (0.1 s) of the previous one, so the final 200/200 appears only when every update is drawn.
    monkeypatch.setattr(metrics, "tqdm", functools.partial(metrics.tqdm, mininterval=0))
    rng = np.random.default_rng(0)
    n_rows = 50_000  # several chunks of resamples
    bootstrap_auc_ci(rng.random(n_rows), (rng.random(n_rows) < 0.3).astype(float), n_boot=200)
    shown = bars(capsys.readouterr().err, "bootstrap AUC")
    assert shown and shown[-1] == (200, 200) and len(shown) > 2


def test_the_dataset_scan_and_the_file_check_show_their_rows(tmp_path, capsys):
    import pandas as pd

    from radz.datasets.base import handle_missing
    from radz.training.data import scan_dataset

    paths = []
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        paths.append(str(tmp_path / f"{i}.png"))
    scan_dataset(datasets.Dataset.from_dict({"image": paths, "report": ["clear lungs"] * 5}))
    handle_missing(pd.DataFrame({"image": paths}), ["image"], "raise", "demo")
    err = capsys.readouterr().err
    assert bars(err, "scanning the training data")[-1] == (5, 5)
    assert bars(err, "demo: checking image")[0][1] == 5  # leave=False: the bar is cleared once done
