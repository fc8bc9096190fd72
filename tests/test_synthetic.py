"""The synthetic dataset writers: exact on-disk layouts, determinism and the atomic, shared cache."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from core.errors import UserError
from datamodules import synthetic, synthetic_acdc
from datamodules.synthetic import SYNTHETIC_DATASETS, ensure_synthetic
from datamodules.synthetic_acdc import write_acdc_layout
from datamodules.synthetic_la import LA_DATA_FOLDER, write_la_layout
from tests.conftest import require_real_acdc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_ACDC = PROJECT_ROOT.parent / "shared" / "datasets" / "ACDC"

VOLUME_NAME = re.compile(r"^patient\d{3}_frame\d{2}$")
SLICE_NAME = re.compile(r"^(patient\d{3}_frame\d{2})_slice_([1-9]\d*)$")  # numbered from 1: no slice_0
LA_ID = re.compile(r"^[A-Z0-9]{20}$")

SMALL_ACDC = dict(n_train_patients=3, n_val_patients=2, n_test_patients=2, slices=(3, 5), shape=(40, 34), seed=0)
SMALL_LA = dict(n_train=4, n_test=3, shape=(24, 20, 16), seed=0)
SMALL_BUILTINS = {"synthetic_acdc": (write_acdc_layout, SMALL_ACDC), "synthetic_la": (write_la_layout, SMALL_LA)}


def list_lines(path: Path) -> list[str]:
    """Lines of a list file, checked to be LF-terminated ASCII names without blank lines."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw, f"{path.name}: LF line endings, last line terminated"
    lines = raw.decode("ascii").split("\n")[:-1]
    assert all(line.strip() == line and line for line in lines), f"{path.name}: no blank or padded lines"
    return lines


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f}


def h5_format(path: Path) -> dict[str, tuple]:
    """What must match between a synthetic and a real file: keys, dtypes, ndim, compression, no attributes."""
    with h5py.File(path, "r") as f:
        assert not dict(f.attrs)
        return {key: (f[key].dtype, f[key].ndim, f[key].compression, len(f[key].attrs)) for key in f}


def patient_of(name: str) -> str:
    return name.split("_")[0]


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory) -> Path:
    return write_acdc_layout(tmp_path_factory.mktemp("acdc"), **SMALL_ACDC)


@pytest.fixture(scope="module")
def la_root(tmp_path_factory) -> Path:
    return write_la_layout(tmp_path_factory.mktemp("la"), **SMALL_LA)


# ---- ACDC layout --------------------------------------------------------------------------------------------------


def test_acdc_lists_name_exactly_the_files(acdc_root):
    slice_names = list_lines(acdc_root / "train_slices.list")
    train, val, test = (list_lines(acdc_root / f"{split}.list") for split in ("train", "val", "test"))
    assert all(SLICE_NAME.match(name) for name in slice_names)
    assert all(VOLUME_NAME.match(name) for name in train + val + test)
    assert sorted(p.stem for p in (acdc_root / "data" / "slices").glob("*.h5")) == sorted(slice_names)
    # As in the real copy: training patients as slices only, val/test patients as volumes only.
    assert sorted(p.stem for p in (acdc_root / "data").glob("*.h5")) == sorted(val + test)
    assert {SLICE_NAME.match(name).group(1) for name in slice_names} == set(train)


def test_acdc_splits_are_disjoint_patients_numbered_like_acdc(acdc_root):
    splits = ("train", "val", "test")
    patients = {split: [patient_of(v) for v in list_lines(acdc_root / f"{split}.list")] for split in splits}
    sets = {split: set(names) for split, names in patients.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    total = SMALL_ACDC["n_train_patients"] + SMALL_ACDC["n_val_patients"] + SMALL_ACDC["n_test_patients"]
    assert set().union(*sets.values()) == {f"patient{n:03d}" for n in range(1, total + 1)}
    for split, names in patients.items():  # both frames of each patient, frame01 first
        volumes = list_lines(acdc_root / f"{split}.list")
        assert volumes == [f"{p}_frame{f:02d}" for p in dict.fromkeys(names) for f in (1, 2)]


def test_acdc_slice_list_is_grouped_by_patient_and_numbered_from_one(acdc_root):
    slice_names = list_lines(acdc_root / "train_slices.list")
    volumes_in_order = list(dict.fromkeys(SLICE_NAME.match(name).group(1) for name in slice_names))
    # Grouped: each volume's slices form one contiguous run, frame01 before frame02, patients in train.list's order.
    runs = [SLICE_NAME.match(name).group(1) for name in slice_names]
    assert sum(1 for a, b in zip(runs, runs[1:]) if a != b) == len(volumes_in_order) - 1
    assert volumes_in_order == list_lines(acdc_root / "train.list")
    shuffled_somewhere = False
    for volume in volumes_in_order:
        numbers = [int(SLICE_NAME.match(n).group(2)) for n in slice_names if n.startswith(volume + "_")]
        assert sorted(numbers) == list(range(1, len(numbers) + 1))
        shuffled_somewhere |= numbers != sorted(numbers)
    assert shuffled_somewhere, "slices are shuffled within each patient, as in the real list"


def test_acdc_volume_files(acdc_root):
    for path in sorted((acdc_root / "data").glob("*.h5")):
        assert h5_format(path) == {"image": (np.float32, 3, "gzip", 0), "label": (np.uint8, 3, "gzip", 0)}
        arrays = h5_arrays(path)
        image, label = arrays["image"], arrays["label"]
        assert image.shape == label.shape
        assert SMALL_ACDC["slices"][0] <= image.shape[0] <= SMALL_ACDC["slices"][1]
        assert image.shape[1] != image.shape[2], "never square, so never the size of a (square) training crop"
        assert image.min() == 0.0 and image.max() == 1.0, "per-volume min-max normalisation"
        assert set(np.unique(label)) == {0, 1, 2, 3}, f"{path.name}: all four classes"


def test_acdc_slice_files_are_slices_of_normalised_volumes(acdc_root):
    slices_by_volume: dict[str, list[tuple[int, dict]]] = {}
    for path in (acdc_root / "data" / "slices").glob("*.h5"):
        assert h5_format(path) == {"image": (np.float32, 2, "gzip", 0), "label": (np.uint8, 2, "gzip", 0)}
        volume, number = SLICE_NAME.match(path.stem).groups()
        slices_by_volume.setdefault(volume, []).append((int(number), h5_arrays(path)))
    shapes = set()
    for volume, numbered in slices_by_volume.items():
        image = np.stack([arrays["image"] for _, arrays in sorted(numbered, key=lambda item: item[0])])
        label = np.stack([arrays["label"] for _, arrays in sorted(numbered, key=lambda item: item[0])])
        # Not renormalised per slice: the volume as a whole spans exactly [0, 1].
        assert image.min() == 0.0 and image.max() == 1.0
        assert set(np.unique(label)) == {0, 1, 2, 3}
        shapes.add(image.shape[1:])
    assert len(shapes) > 1, "the in-plane size varies between patients, so loaders must not assume one"


def test_acdc_content_is_cardiac_like(acdc_root):
    for volume in list_lines(acdc_root / "val.list") + list_lines(acdc_root / "test.list"):
        arrays = h5_arrays(acdc_root / "data" / f"{volume}.h5")
        image, label = arrays["image"], arrays["label"]
        lv_area = (label == 3).sum(axis=(1, 2))
        assert lv_area[0] > lv_area[-1] > 0, "the LV narrows from base to apex"
        assert (label[0] == 1).any(), "the basal slice has an RV"
        means = {c: image[label == c].mean() for c in range(4)}
        assert means[3] > means[0] > means[2], "bright blood pool, darker myocardium"
        assert means[1] > means[2]
    for patient in {patient_of(v) for v in list_lines(acdc_root / "test.list")}:
        ed, es = (h5_arrays(acdc_root / "data" / f"{patient}_frame{f:02d}.h5")["label"] for f in (1, 2))
        assert (ed == 3).sum() > (es == 3).sum(), "the LV cavity is larger at ED (frame01) than at ES"


def test_acdc_single_frame_and_argument_checks(tmp_path):
    root = write_acdc_layout(tmp_path / "one", n_train_patients=1, n_val_patients=1, n_test_patients=1, frames=1)
    assert all(name.endswith("_frame01") for name in list_lines(root / "val.list"))
    with pytest.raises(ValueError):
        write_acdc_layout(tmp_path / "bad", n_val_patients=0)
    with pytest.raises(ValueError):
        write_acdc_layout(tmp_path / "bad", slices=(5, 4))


@pytest.mark.real_data
def test_acdc_layout_matches_the_real_copy(acdc_root):
    require_real_acdc()  # skips outside CI with the missing path, fails in CI
    real_slices = list_lines(REAL_ACDC / "train_slices.list")
    for name in ("train_slices.list", "train.list", "val.list", "test.list"):
        real, ours = list_lines(REAL_ACDC / name), list_lines(acdc_root / name)  # both LF, terminated, no blanks
        pattern = SLICE_NAME if name == "train_slices.list" else VOLUME_NAME
        assert all(pattern.match(line) for line in real) and all(pattern.match(line) for line in ours)
    assert min(int(SLICE_NAME.match(n).group(2)) for n in real_slices) == 1
    real_volume = REAL_ACDC / "data" / f"{list_lines(REAL_ACDC / 'val.list')[0]}.h5"
    real_slice = REAL_ACDC / "data" / "slices" / f"{real_slices[0]}.h5"
    ours_volume = acdc_root / "data" / f"{list_lines(acdc_root / 'val.list')[0]}.h5"
    ours_slice = acdc_root / "data" / "slices" / f"{list_lines(acdc_root / 'train_slices.list')[0]}.h5"
    assert h5_format(ours_volume) == h5_format(real_volume)
    assert h5_format(ours_slice) == h5_format(real_slice)

    def structure(root: Path) -> set[str]:
        top = {p.name for p in root.iterdir() if p.name != "SHA256SUMS"}
        return top | {f"data/{p.name}/" for p in (root / "data").iterdir() if p.is_dir()}

    # Same folders: lists at the root, volumes in data/, slices in data/slices/, nothing else.
    assert structure(acdc_root) == structure(REAL_ACDC)
    real_image = h5_arrays(real_volume)["image"]
    assert real_image.min() == 0.0 and real_image.max() == 1.0  # the normalisation the writer reproduces


# ---- LA layout ----------------------------------------------------------------------------------------------------


def test_la_folder_name_agrees_with_the_loader():
    from datamodules.la import DATA_FOLDER

    assert LA_DATA_FOLDER == DATA_FOLDER == "2018LA_Seg_Training Set"


def test_la_layout_and_lists(la_root):
    data_folder = la_root / "2018LA_Seg_Training Set"  # with the space
    assert data_folder.is_dir()
    train, test = list_lines(la_root / "train.list"), list_lines(la_root / "test.list")
    assert len(train) == SMALL_LA["n_train"] and len(test) == SMALL_LA["n_test"]
    assert all(LA_ID.match(case) for case in train + test)
    assert train == sorted(train), "train.list is sorted, so 'the first N' are the labeled ones as published"
    assert test != sorted(test), "the real test.list is not sorted"
    assert sorted(train + test) == sorted(p.name for p in data_folder.iterdir())
    assert max(train) < min(test), "test holds the alphabetically last IDs, like the real split"
    assert all((data_folder / case / "mri_norm2.h5").is_file() for case in train + test)
    assert not (data_folder / "train.list").exists()


def test_la_volume_files(la_root):
    for path in sorted((la_root / LA_DATA_FOLDER).glob("*/mri_norm2.h5")):
        assert h5_format(path) == {"image": (np.float32, 3, "gzip", 0), "label": (np.uint8, 3, "gzip", 0)}
        arrays = h5_arrays(path)
        image, label = arrays["image"], arrays["label"]
        assert image.shape == label.shape == SMALL_LA["shape"]  # (X, Y, Z)
        assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-4, "z-scored over the volume"
        assert len(np.unique(image)) <= 256, "8-bit raw data: few distinct values, as in the real files"
        assert set(np.unique(label)) == {0, 1}
        assert image[label == 1].mean() > image[label == 0].mean() + 0.5, "a bright atrium"


@pytest.mark.parametrize("lists_in", ["root", "data_folder"])
def test_la_crlf_and_dtc_list_placement(tmp_path, lists_in):
    root = write_la_layout(tmp_path, n_train=3, n_test=2, shape=(20, 18, 16), crlf=True, lists_in=lists_in)
    lists_folder = root if lists_in == "root" else root / LA_DATA_FOLDER
    other_folder = root / LA_DATA_FOLDER if lists_in == "root" else root
    for name in ("train.list", "test.list"):
        assert not (other_folder / name).exists()
        raw = (lists_folder / name).read_bytes()
        lines = raw.split(b"\r\n")
        assert lines[-1] == b"" and all(LA_ID.match(line.decode()) for line in lines[:-1]), "every line ends in CRLF"
        assert raw.count(b"\n") == raw.count(b"\r\n")


def test_la_argument_checks(tmp_path):
    with pytest.raises(ValueError):
        write_la_layout(tmp_path, lists_in="lists")
    with pytest.raises(ValueError):
        write_la_layout(tmp_path, n_test=0)


# ---- determinism --------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every file under ``root``: list files as bytes, h5 files as their arrays."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files[str(path.relative_to(root))] = h5_arrays(path) if path.suffix == ".h5" else path.read_bytes()
    return files


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert a[name].keys() == b[name].keys()
            for key in a[name]:
                np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")
                assert a[name][key].dtype == b[name][key].dtype
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("writer, params", [(write_acdc_layout, SMALL_ACDC), (write_la_layout, SMALL_LA)])
def test_writers_are_deterministic(tmp_path, writer, params):
    first = snapshot(writer(tmp_path / "first", **params))
    assert_same_snapshot(first, snapshot(writer(tmp_path / "second", **params)))
    other_seed = snapshot(writer(tmp_path / "other", **{**params, "seed": 1}))
    assert other_seed.keys() != first.keys() or any(
        not np.array_equal(first[n]["image"], other_seed[n]["image"]) for n in first if isinstance(first[n], dict)
    ), "the seed matters"


# ---- the cache: ensure_synthetic ----------------------------------------------------------------------------------


@pytest.fixture
def small_builtins(monkeypatch):
    """The built-in entries with tiny parameters (same writers), so cache tests take a fraction of a second."""
    for name, (_, params) in SMALL_BUILTINS.items():
        monkeypatch.setitem(SYNTHETIC_DATASETS, name, dataclasses.replace(SYNTHETIC_DATASETS[name], params=params))


def count_writer_calls(monkeypatch, name: str, delay: float = 0.0) -> list[int]:
    """Wrap the writer of ``name`` to count its calls (optionally slowed down to widen race windows)."""
    entry = SYNTHETIC_DATASETS[name]
    calls: list[int] = []

    def counting_writer(root, **params):
        calls.append(1)
        time.sleep(delay)
        return entry.writer(root, **params)

    monkeypatch.setitem(SYNTHETIC_DATASETS, name, dataclasses.replace(entry, writer=counting_writer))
    return calls


def partial_folders(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("name", ["synthetic_acdc", "synthetic_la"])
def test_ensure_synthetic_generates_once_into_a_versioned_folder(tmp_path, small_builtins, monkeypatch, name):
    calls = count_writer_calls(monkeypatch, name)
    root = ensure_synthetic(name, cache_dir=tmp_path)
    assert root == tmp_path / f"{name}-v{SYNTHETIC_DATASETS[name].version}"
    assert ensure_synthetic(name, cache_dir=tmp_path) == root
    assert len(calls) == 1, "the second call reuses the cache"
    assert not partial_folders(tmp_path)
    writer, params = SMALL_BUILTINS[name]
    assert_same_snapshot(snapshot(root), snapshot(writer(tmp_path / "direct", **params)))


def test_ensure_synthetic_uses_the_cache_environment_variable(tmp_path, small_builtins, monkeypatch):
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path / "env-cache"))
    assert ensure_synthetic("synthetic_la").parent == tmp_path / "env-cache"


def test_unknown_synthetic_name_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="synthetic_acdc"):
        ensure_synthetic("synthetic_acd", cache_dir=tmp_path)


def test_failed_generation_leaves_nothing_that_looks_complete(tmp_path, small_builtins, monkeypatch):
    real_write_h5 = synthetic_acdc.write_h5
    written = []

    def failing_write_h5(path, image, label):
        if len(written) == 5:
            raise OSError("disk full (simulated)")
        written.append(path)
        real_write_h5(path, image, label)

    monkeypatch.setattr(synthetic_acdc, "write_h5", failing_write_h5)
    with pytest.raises(OSError, match="simulated"):
        ensure_synthetic("synthetic_acdc", cache_dir=tmp_path)
    assert len(written) == 5
    assert not (tmp_path / "synthetic_acdc-v1").exists()
    assert not partial_folders(tmp_path)
    assert not list(tmp_path.rglob("*.list")), "no list file anywhere: nothing resembles a dataset"

    monkeypatch.setattr(synthetic_acdc, "write_h5", real_write_h5)
    root = ensure_synthetic("synthetic_acdc", cache_dir=tmp_path)
    assert_same_snapshot(snapshot(root), snapshot(write_acdc_layout(tmp_path / "direct", **SMALL_ACDC)))


def test_leftovers_of_a_killed_generation_are_cleaned_up(tmp_path, small_builtins):
    leftover = tmp_path / ".synthetic_la-v1.partial-12345-deadbeef"
    (leftover / LA_DATA_FOLDER).mkdir(parents=True)
    (leftover / "train.list").write_text("HALFWRITTEN\n")
    root = ensure_synthetic("synthetic_la", cache_dir=tmp_path)
    assert (root / "test.list").is_file()
    if synthetic.fcntl is not None:  # without locks a leftover cannot be told from a running generation
        assert not leftover.exists()


@pytest.mark.skipif(synthetic.fcntl is None, reason="needs POSIX file locks")
def test_concurrent_callers_share_one_generation(tmp_path, small_builtins, monkeypatch):
    calls = count_writer_calls(monkeypatch, "synthetic_la", delay=0.3)
    results, errors = [], []

    def call():
        try:
            results.append(ensure_synthetic("synthetic_la", cache_dir=tmp_path))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert len(calls) == 1
    assert not partial_folders(tmp_path)


def test_losing_the_rename_race_returns_the_winners_copy(tmp_path, small_builtins, monkeypatch):
    """Where locks are not honoured (some network file systems) two generations can run; the second keeps the first."""
    monkeypatch.setattr(synthetic, "fcntl", None)
    entry = SYNTHETIC_DATASETS["synthetic_la"]

    def writer_racing_another_process(root, **params):
        entry.writer(tmp_path / "synthetic_la-v1", **params)  # the other process finishes first
        return entry.writer(root, **params)

    racing = dataclasses.replace(entry, writer=writer_racing_another_process)
    monkeypatch.setitem(SYNTHETIC_DATASETS, "synthetic_la", racing)
    root = ensure_synthetic("synthetic_la", cache_dir=tmp_path)
    assert root == tmp_path / "synthetic_la-v1" and (root / "train.list").is_file()
    assert not partial_folders(tmp_path)


KILLED_GENERATION = """
import sys, time
from pathlib import Path
from datamodules import synthetic, synthetic_la
real_write_h5 = synthetic_la.write_h5
count = 0
def slow_write_h5(*args):
    global count
    real_write_h5(*args)
    count += 1
    if count == 3:
        Path(sys.argv[2]).write_text("half way")
        time.sleep(60)
synthetic_la.write_h5 = slow_write_h5
synthetic.ensure_synthetic("synthetic_la", cache_dir=sys.argv[1])
"""


@pytest.mark.slow
def test_a_generation_killed_half_way_is_redone(tmp_path, small_builtins):
    """A SIGKILLed generator (no clean-up code runs) leaves no final folder, and the next caller is not blocked."""
    cache, signal_file = tmp_path / "cache", tmp_path / "half-way"
    command = [sys.executable, "-c", KILLED_GENERATION, str(cache), str(signal_file)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert process.poll() is None, "the generator subprocess died early"
            assert time.monotonic() < deadline, "the generator subprocess never got half way"
            time.sleep(0.05)
        assert partial_folders(cache), "the generator is writing into a partial folder"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (cache / "synthetic_la-v1").exists()
    root = ensure_synthetic("synthetic_la", cache_dir=cache)  # small_builtins applies in this process
    assert not partial_folders(cache), "the killed generation's leftovers are removed"
    assert_same_snapshot(snapshot(root), snapshot(write_la_layout(tmp_path / "direct", **SMALL_LA)))


@pytest.mark.slow
def test_builtin_sets_are_small_and_read_by_the_suite_loaders(tmp_path):
    from datamodules import get_dataset

    for name, patch in (("synthetic_acdc", (64, 64)), ("synthetic_la", (48, 48, 32)), ("synthetic_kvasir", (64, 80))):
        root = ensure_synthetic(name, cache_dir=tmp_path)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        assert size < 16e6, f"{name}: {size / 1e6:.1f} MB"
        entry = get_dataset(name)
        module = entry.datamodule(
            entry.spec, root, patch_size=patch, labeled_batch_size=2, unlabeled_batch_size=2,
            max_steps=2, seed=0, ratio=0.2, num_workers=0,
        )
        assert module.split.labeled and module.split.unlabeled and module.split.test
