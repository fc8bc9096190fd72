"""`predict`: a smoke run's test images through `predict`, scored by `score` against their ground truth, give the
run's own test numbers (same inference, same metrics), for the h5 volumes of ACDC and LA and the JPEG endoscopy
images; the label maps keep each input's size and attributes."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.score import score_folders
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smoke_run(tmp_path: Path, *args: str) -> tuple[Path, dict]:
    assert main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args]) == 0
    table = pd.read_csv(next((tmp_path / "lb").glob("*.csv")))
    run_dir = Path(table["run_dir"].iloc[-1])
    return run_dir, json.loads((run_dir / "result.json").read_text())["test"]["last"]


def cases_tested(run_dir: Path) -> list[str]:
    return list(dict.fromkeys(pd.read_csv(run_dir / "test_per_case_last.csv")["case"].astype(str)))


def datamodule_of(run_dir: Path):
    import yaml

    from datamodules import build_datamodule

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return build_datamodule(config["dataset"], config)


def assert_scores_equal_the_run(predicted: Path, truth: Path, expected: dict, metrics=("dice", "jaccard", "hd95", "asd")):
    assert expected["dice"] > 0  # something was segmented: the comparison is not of two empty predictions
    scores = score_folders(predicted, truth)
    overall = scores[(scores["case"] == "mean") & (scores["class"] == "all")].iloc[0]
    for name in metrics:
        assert overall[name] == pytest.approx(expected[name], abs=1e-9), name


@pytest.mark.parametrize("dataset, method, path_of", [
    ("synthetic_acdc", "cps", "volume_path"),  # slice by slice; CPS's evaluated network
    ("synthetic_la", "supervised", "case_path"),  # sliding window over a volume
])
def test_predicted_h5_volumes_score_as_the_run_tested_them(tmp_path, dataset, method, path_of):
    # CPS's 3-D initialisation makes the 4-step smoke network segment something (a comparison of two empty
    # predictions proves little); with PyTorch's default init it predicts background only at this budget.
    extra = ["--set", "method.network_inits=[kaiming,xavier]"] if method == "cps" else []
    run_dir, expected = smoke_run(tmp_path, "--method", method, "--dataset", dataset, "--labeled", "2", *extra)
    datamodule = datamodule_of(run_dir)
    images = tmp_path / "images"
    images.mkdir()
    for case in cases_tested(run_dir):  # image and label in one file: the inputs are their own ground truth
        shutil.copy(getattr(datamodule, path_of)(case), images / f"{case}.h5")
    with h5py.File(next(images.iterdir()), "a") as file:
        file.attrs["spacing"] = [2.0, 1.0, 1.0]
    assert main(["predict", str(run_dir), str(images), str(tmp_path / "out")]) == 0
    for source in images.iterdir():
        with h5py.File(source, "r") as given, h5py.File(tmp_path / "out" / source.name, "r") as written:
            assert written["label"].shape == given["image"].shape[-written["label"].ndim:]
            assert written["label"].dtype == np.uint8
            assert dict(written.attrs).keys() == dict(given.attrs).keys()
    assert_scores_equal_the_run(tmp_path / "out", images, expected)


@pytest.mark.slow  # 60 steps: the smoke budget's 4 leave the polyp unsegmented
def test_predicted_endoscopy_images_score_as_the_run_tested_them(tmp_path):
    run_dir, expected = smoke_run(tmp_path, "--dataset", "synthetic_kvasir", "--labeled", "4",
                                  "--set", "trainer.max_steps=60", "--set", "model.base_features=8")
    datamodule = datamodule_of(run_dir)
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir(), truth.mkdir()
    for case in cases_tested(run_dir):
        shutil.copy(datamodule.image_path(case), images / datamodule.image_path(case).name)
        shutil.copy(datamodule.mask_path(case), truth / datamodule.mask_path(case).name)  # lossy JPEG masks
    result = subprocess.run(["make", "-n", "predict", "STAMP=", "PY=python", f"RUN={run_dir}", f"INPUT={images}",
                             f"OUTPUT={tmp_path / 'out'}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert f'python -m benchmark predict "{run_dir}" "{images}" "{tmp_path / "out"}"' in result.stdout
    assert main(["predict", str(run_dir), str(images), str(tmp_path / "out")]) == 0
    for source in images.iterdir():
        written = tmp_path / "out" / f"{source.stem}.png"
        with Image.open(source) as given, Image.open(written) as label:
            assert label.size == given.size and label.mode == "L"
    assert_scores_equal_the_run(tmp_path / "out", truth, expected)


def test_predict_keeps_a_nifti_volume_s_affine_and_header(tmp_path):
    import nibabel as nib

    run_dir, _ = smoke_run(tmp_path, "--dataset", "synthetic_la", "--labeled", "2")
    datamodule = datamodule_of(run_dir)
    with h5py.File(datamodule.case_path(cases_tested(run_dir)[0]), "r") as file:
        image = file["image"][()]
    affine = np.diag([0.625, 0.625, 2.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    images = tmp_path / "images"
    images.mkdir()
    nib.save(nib.Nifti1Image(np.transpose(image, (2, 1, 0)).astype(np.float32), affine), str(images / "scan.nii.gz"))
    assert main(["predict", str(run_dir), str(images), str(tmp_path / "out")]) == 0
    written = nib.load(str(tmp_path / "out" / "scan.nii.gz"))
    assert np.array_equal(written.affine, affine) and written.shape == image.shape[::-1]
    assert written.header.get_zooms() == (0.625, 0.625, 2.5)


def test_predict_without_a_finished_run_or_images_is_one_message(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["predict", str(tmp_path), str(tmp_path / "images"), str(tmp_path / "out")]) == 2
    assert "no image" in capsys.readouterr().err
    (tmp_path / "images" / "a.png").write_bytes(b"")
    assert main(["predict", str(tmp_path), str(tmp_path / "images"), str(tmp_path / "out")]) == 2
    assert "not a run folder" in capsys.readouterr().err
