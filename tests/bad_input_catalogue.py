"""The bad-input catalogue: each way a user's input can be wrong that the suite guards against, tried through the CLI.

A case prepares a workspace (copies of small datasets in their real layouts, a leaderboard that already holds a
row for every dataset, an earlier finished run folder), runs ``python -m benchmark ...`` in this process
(``benchmark.cli.main``) and records the exit code, the error output and every file of the workspace before and
after. ``tests/test_bad_input_catalogue.py`` asserts, for every case: exit code 2, one message with what, where
and how to fix, and nothing already on disk changed. ``python -m tests.bad_input_catalogue --markdown`` runs the
same cases and prints the table of docs/reliability.md (what was tried, the message printed, the exit code);
``--update docs/reliability.md`` writes it between the table's markers there.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import html
import io
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import h5py
import numpy as np

WORKSPACE_TOKEN = "<ws>"
RUN_FOLDER_STAMP = re.compile(r"_\d{8}-\d{6}_\d+")


# ---- the data every case starts from ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """Pristine inputs, built once and copied into each case's workspace."""

    acdc: Path  # ACDC layout (SSL4MIS h5)
    la: Path  # LA layout (UA-MT h5, CRLF lists)
    kvasir: Path  # Kvasir layout with PNG masks
    brats: Path  # raw BraTS NIfTI layout
    finished_run: Path  # a finished smoke run of supervised on the ACDC copy (checkpoints for init_from / --resume)


def build_sources(folder: Path, acdc: Path | None = None, la: Path | None = None) -> Sources:
    """Write the small datasets (reusing given ACDC / LA trees, e.g. the test session's fixtures) and one run."""
    from datamodules.synthetic_acdc import write_acdc_layout
    from datamodules.synthetic_kvasir import write_kvasir_layout
    from datamodules.synthetic_la import write_la_layout
    from datamodules.synthetic_brats import write_brats_layout
    from tests.conftest import TINY_ACDC, TINY_LA

    folder.mkdir(parents=True, exist_ok=True)
    acdc = acdc or write_acdc_layout(folder / "acdc", **TINY_ACDC)
    la = la or write_la_layout(folder / "la", crlf=True, **TINY_LA)
    kvasir = write_kvasir_layout(folder / "kvasir", n_train=4, n_val=2, n_test=2, shape=(40, 48), mask_format="png")
    brats = write_brats_layout(folder / "brats", n_train=2, n_val=1, n_test=1, shape=(24, 24, 24), form="nifti")
    runs = folder / "finished"
    code, stderr = run_cli(["run", "--profile", "smoke", "--no-progress", "--dataset", "acdc", "--data-root", str(acdc),
                            "--ratio", "0.5", "--out", str(runs / "runs"), "--leaderboard-dir", str(runs / "lb")])
    assert code == 0, stderr
    finished = next(path.parent for path in (runs / "runs").rglob("result.json"))
    return Sources(acdc, la, kvasir, brats, finished)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, error output) of ``python -m benchmark ARGV`` run in this process."""
    from benchmark.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit:  # --help; every error returns a code
            code = exit.code
    return code, stderr.getvalue()


# ---- a case's workspace ----------------------------------------------------------------------------------------
class Workspace:
    """``<ws>/data/<copies>``, ``<ws>/lb/<dataset>.csv`` (one earlier row each), ``<ws>/runs/`` (and, on request,
    a copy of the finished run). What a case may change is nothing of it."""

    DATASETS = ("acdc", "la", "kvasir_seg", "brats", "synthetic_acdc")

    def __init__(self, root: Path, sources: Sources):
        from benchmark.leaderboard import append_rows

        self.root, self.sources = root, sources
        self.data, self.lb, self.runs = root / "data", root / "lb", root / "runs"
        for folder in (self.data, self.lb, self.runs):
            folder.mkdir(parents=True)
        for dataset in self.DATASETS:
            append_rows(self.lb / f"{dataset}.csv", [earlier_row(dataset)])
        self.patches = contextlib.ExitStack()

    def copy(self, name: str) -> Path:
        """A copy of one source dataset (``acdc``, ``la``, ``kvasir``, ``brats``) to damage."""
        return Path(shutil.copytree(getattr(self.sources, name), self.data / name))

    def copy_finished_run(self) -> Path:
        return Path(shutil.copytree(self.sources.finished_run, self.runs / "acdc" / "supervised" / self.sources.finished_run.name))

    def run(self, *options: str, dataset: str = "acdc", root: Path | None = None) -> list[str]:
        """``run`` on the smoke profile into this workspace's runs/ and lb/."""
        argv = ["run", "--profile", "smoke", "--no-progress", "--out", str(self.runs), "--leaderboard-dir", str(self.lb),
                "--dataset", dataset]
        if root is not None:
            argv += ["--data-root", str(root)]
        return argv + list(options)

    def patch(self, target: str, replacement) -> None:
        self.patches.enter_context(mock.patch(target, replacement))


def earlier_row(dataset: str) -> dict:
    return dict(dataset=dataset, method="supervised", profile="smoke", labeled_cases=1, seed=0, checkpoint="last",
                dice=0.5, jaccard=0.4, hd95=3.0, asd=1.0, status="ok", config_hash="000000000000", run_dir="/elsewhere")


# ---- ways to damage files ----------------------------------------------------------------------------------------
def first_line(path: Path) -> str:
    return path.read_text().split()[0]


def acdc_slice(root: Path) -> Path:
    return root / "data" / "slices" / f"{first_line(root / 'train_slices.list')}.h5"


def acdc_volume(root: Path, split: str) -> Path:
    return root / "data" / f"{first_line(root / f'{split}.list')}.h5"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rewrite_h5(path: Path, **arrays: np.ndarray) -> None:
    """Replace datasets of an h5 file (others kept); a None value drops that dataset."""
    with h5py.File(path, "r") as f:
        current = {key: f[key][()] for key in f}
    current.update(arrays)
    with h5py.File(path, "w") as f:
        for key, value in current.items():
            if value is not None:
                f.create_dataset(key, data=value)


def h5_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["image"][()], f["label"][()]


def with_value(array: np.ndarray, value) -> np.ndarray:
    changed = array.copy()
    changed.flat[changed.size // 2] = value
    return changed


class FullDiskFile(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def full_disk(path, mode="w"):
    """core.atomic.replaced_atomically on a disk that fills up while the table is written."""
    from core.atomic import replaced_atomically

    with replaced_atomically(path, mode) as real:
        real.write("dataset,method,pro")  # part of the table reached the disk before it filled up
        yield FullDiskFile()


class RunsCodeWhenUnpickled:
    """A checkpoint payload whose unpickling would create a file: a weights-only load must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- the cases -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    tried: str  # what was tried, for the table
    expect: str  # a fragment the message must contain
    prepare: Callable[[Workspace], list[str]]  # damages the workspace and returns the command line
    # Stopped after training had written checkpoints: the new run folder stays (the message says how to --resume it).
    keeps_run: bool = False


def _damaged_acdc(damage: Callable[[Path], None], *options: str) -> Callable[[Workspace], list[str]]:
    def prepare(ws: Workspace) -> list[str]:
        root = ws.copy("acdc")
        damage(root)
        return ws.run("--ratio", "0.5", *options, root=root)
    return prepare


def _remove(relative: str) -> Callable[[Path], None]:
    return lambda root: (root / relative).unlink()


def _shape_mismatch(root: Path) -> None:
    image, label = h5_arrays(acdc_slice(root))
    rewrite_h5(acdc_slice(root), label=label[:, :-3])


def _label_out_of_range(root: Path) -> None:
    image, label = h5_arrays(acdc_slice(root))
    rewrite_h5(acdc_slice(root), label=with_value(label, 7))


def _nan_in_slice(root: Path) -> None:
    image, _ = h5_arrays(acdc_slice(root))
    rewrite_h5(acdc_slice(root), image=with_value(image, np.nan))


def _inf_in_val_volume(root: Path) -> None:
    image, _ = h5_arrays(acdc_volume(root, "val"))
    rewrite_h5(acdc_volume(root, "val"), image=with_value(image, np.inf))


def _empty_val_volume(root: Path) -> None:
    image, label = h5_arrays(acdc_volume(root, "val"))
    rewrite_h5(acdc_volume(root, "val"), image=image[:0], label=label[:0])


def _volume_as_slice(root: Path) -> None:
    image, label = h5_arrays(acdc_slice(root))
    rewrite_h5(acdc_slice(root), image=np.stack([image] * 3), label=np.stack([label] * 3))


def _wrong_keys(root: Path) -> None:
    image, label = h5_arrays(acdc_slice(root))
    rewrite_h5(acdc_slice(root), image=None, label=None, img=image, seg=label)


def _two_d_la(ws: Workspace) -> list[str]:
    root = ws.copy("la")
    case = root / "2018LA_Seg_Training Set" / first_line(root / "train.list") / "mri_norm2.h5"
    image, label = h5_arrays(case)
    rewrite_h5(case, image=image[:, :, 0], label=label[:, :, 0])
    return ws.run("--labeled", "2", dataset="la", root=root)


def _corrupt_nifti(ws: Workspace) -> list[str]:
    root = ws.copy("brats")
    case = first_line(root / "train.txt")
    truncate(next(root.rglob(f"{case}_flair.nii.gz")), 0.3)
    return ws.run("--labeled", "1", dataset="brats", root=root)


def _corrupt_png_in_worker(ws: Workspace) -> list[str]:
    root = ws.copy("kvasir")
    truncate(root / "masks" / f"{first_line(root / 'train.txt')}.png", 0.4)
    # Kvasir decodes on the fly: with a loader worker the error is raised in another process.
    return ws.run("--labeled", "2", "--set", "data.num_workers=1", dataset="kvasir_seg", root=root)


def _blocked(ws: Workspace, option: str) -> list[str]:
    (ws.root / "blocker").write_text("a file where a folder should be\n")
    argv = ws.run("--ratio", "0.5", root=ws.copy("acdc"))
    argv[argv.index(option) + 1] = str(ws.root / "blocker" / "sub")
    return argv


def _full_disk(ws: Workspace) -> list[str]:
    ws.patch("benchmark.leaderboard.replaced_atomically", full_disk)
    return ws.run("--ratio", "0.5", root=ws.copy("acdc"))


def _corrupt_leaderboard(ws: Workspace) -> list[str]:
    (ws.lb / "acdc.csv").write_text('dataset,method,profile\nacdc,"supervised\n')
    return ws.run("--ratio", "0.5", root=ws.copy("acdc"))


def _cut_leaderboard(ws: Workspace) -> list[str]:
    truncate(ws.lb / "acdc.csv", 0.8)  # pandas alone would pad the row and keep its status "ok"
    return ws.run("--ratio", "0.5", root=ws.copy("acdc"))


def _init_from(method: str, *options: str) -> Callable[[Workspace], list[str]]:
    def prepare(ws: Workspace) -> list[str]:
        checkpoint = ws.copy_finished_run() / "checkpoints" / "last.ckpt"
        return ws.run("--method", method, "--ratio", "0.5", "--set", f"run.init_from={checkpoint}", *options, root=ws.copy("acdc"))
    return prepare


def _init_from_no_network(ws: Workspace) -> list[str]:
    import torch

    weights = ws.root / "other.pt"
    torch.save({"classifier.weight": torch.zeros(2, 3)}, weights)
    return ws.run("--ratio", "0.5", "--set", f"run.init_from={weights}", root=ws.copy("acdc"))


def _checkpoint_with_code(ws: Workspace) -> list[str]:
    import torch

    checkpoint = ws.root / "downloaded.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(ws.root / "code-was-run")}, checkpoint)
    return ws.run("--ratio", "0.5", "--set", f"run.init_from={checkpoint}", root=ws.copy("acdc"))


def _resume_other_config(ws: Workspace) -> list[str]:
    run_dir = ws.copy_finished_run()
    return ws.run("--ratio", "0.5", "--seed", "1", "--set", "optim.lr=0.02", "--resume", str(run_dir), root=ws.copy("acdc"))


def _resume_damaged_checkpoint(ws: Workspace) -> list[str]:
    run_dir = ws.copy_finished_run()  # made interrupted: no last.ckpt, no result, a damaged resumable checkpoint
    (run_dir / "result.json").unlink()
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last.ckpt").rename(checkpoints / "resume.ckpt")
    truncate(checkpoints / "resume.ckpt", 0.5)
    return ws.run("--ratio", "0.5", "--resume", str(run_dir), root=ws.copy("acdc"))


def _empty_root(ws: Workspace) -> list[str]:
    (ws.data / "ACDC").mkdir()
    return ws.run("--ratio", "0.5", root=ws.data / "ACDC")


def _resume_not_a_run(ws: Workspace) -> list[str]:
    return ws.run("--ratio", "0.5", "--resume", str(ws.data), root=ws.copy("acdc"))


CASES: list[Case] = [
    # where the data is
    Case("missing_data_root", "DATA_ROOT names a folder that does not exist", "does not exist or is not a folder",
         lambda ws: ws.run("--ratio", "0.5", root=ws.data / "ACDC")),
    Case("empty_data_root", "DATA_ROOT is an empty folder", "missing training slices list file", _empty_root),
    Case("no_data_root", "a real dataset without DATA_ROOT", "needs DATA_ROOT", lambda ws: ws.run("--ratio", "0.5")),
    Case("missing_list_file", "val.list deleted", "missing validation list file", _damaged_acdc(_remove("val.list"))),
    Case("list_names_missing_file", "a slice named in train_slices.list deleted", "named in train_slices.list are missing",
         _damaged_acdc(lambda root: acdc_slice(root).unlink())),
    Case("name_listed_twice", "val.list names one case twice", "listed more than once",
         _damaged_acdc(lambda root: (root / "val.list").write_text((root / "val.list").read_text() + first_line(root / "val.list") + "\n"))),
    Case("path_traversal", "test.list names ../../etc/passwd", "not a plain case name",
         _damaged_acdc(lambda root: (root / "test.list").write_text("../../etc/passwd\n"))),
    # what is in the files
    Case("truncated_h5_training", "a training slice cut to half its bytes", "cannot read h5 file",
         _damaged_acdc(lambda root: truncate(acdc_slice(root)))),
    Case("truncated_h5_test", "a test volume cut to half its bytes (read after training)", "cannot read h5 file",
         _damaged_acdc(lambda root: truncate(acdc_volume(root, "test"))), keeps_run=True),
    Case("corrupt_nifti", "a BraTS flair .nii.gz cut to 30 % of its bytes", "cannot read NIfTI file", _corrupt_nifti),
    Case("corrupt_png_in_worker", "a Kvasir PNG mask cut to 40 %, read in a DataLoader worker", "cannot read mask",
         _corrupt_png_in_worker),
    Case("wrong_h5_keys", "a slice stores 'img' and 'seg' instead of 'image' and 'label'", "h5 file lacks dataset(s)",
         _damaged_acdc(_wrong_keys)),
    Case("shape_mismatch", "a slice's label 3 columns narrower than its image", "image and label shapes differ",
         _damaged_acdc(_shape_mismatch)),
    Case("label_out_of_range", "a label value 7 in a 4-class slice", "outside the 4 classes 0..3", _damaged_acdc(_label_out_of_range)),
    Case("nan_in_image", "a NaN pixel in a training slice", "NaN or infinite value", _damaged_acdc(_nan_in_slice)),
    Case("inf_in_image", "an inf voxel in a validation volume", "NaN or infinite value", _damaged_acdc(_inf_in_val_volume)),
    Case("empty_volume", "a validation volume with 0 slices", "the image is empty", _damaged_acdc(_empty_val_volume)),
    Case("3d_data_to_2d_dataset", "an ACDC slice file holding a 3-slice volume", "a 3-D file given to a 2-D dataset",
         _damaged_acdc(_volume_as_slice)),
    Case("2d_data_to_3d_dataset", "an LA case file holding one 2-D slice", "a 2-D file given to a 3-D dataset", _two_d_la),
    # names and values
    Case("unknown_method", "--method mean_teachr", "unknown method 'mean_teachr'", lambda ws: ws.run("--method", "mean_teachr", "--ratio", "0.2", dataset="synthetic_acdc")),
    Case("unknown_dataset", "--dataset acdcc", "unknown dataset 'acdcc'", lambda ws: ws.run("--ratio", "0.2", dataset="acdcc")),
    Case("unknown_profile", "--profile gpu", "unknown profile 'gpu'", lambda ws: [*ws.run("--ratio", "0.2", dataset="synthetic_acdc"), "--profile", "gpu"]),
    Case("ratio_zero", "--ratio 0", "RATIO must be a number in (0, 1]", lambda ws: ws.run("--ratio", "0", dataset="synthetic_acdc")),
    Case("ratio_negative", "--ratio -0.1", "RATIO must be a number in (0, 1]", lambda ws: ws.run("--ratio=-0.1", dataset="synthetic_acdc")),
    Case("ratio_above_one", "--ratio 1.5", "RATIO must be a number in (0, 1]", lambda ws: ws.run("--ratio", "1.5", dataset="synthetic_acdc")),
    Case("labeled_above_train_set", "--labeled 500 (20 training patients)", "LABELED=500 is impossible",
         lambda ws: ws.run("--labeled", "500", dataset="synthetic_acdc")),
    Case("non_numeric_option", "--ratio abc", "expected a number, got 'abc'", lambda ws: ws.run("--ratio", "abc", dataset="synthetic_acdc")),
    Case("non_numeric_override", "--set trainer.max_steps=many", "expected a whole number",
         lambda ws: ws.run("--ratio", "0.2", "--set", "trainer.max_steps=many", dataset="synthetic_acdc")),
    Case("unknown_override_key", "--set trainer.max_stepz=3", "unknown config key 'trainer.max_stepz'",
         lambda ws: ws.run("--ratio", "0.2", "--set", "trainer.max_stepz=3", dataset="synthetic_acdc")),
    # values outside their range or choices (benchmark/schema.py): refused before a run folder or row exists
    *[Case(f"bad_value_{name}", " ".join(options), expect,
           lambda ws, options=options: ws.run("--ratio", "0.2", *options, dataset="synthetic_acdc"))
      for name, options, expect in [
          ("negative_lr", ["--set", "optim.lr=-0.01"], "optim.lr must be a number > 0"),
          ("zero_max_steps", ["--set", "trainer.max_steps=0"], "trainer.max_steps must be a whole number >= 1"),
          ("negative_max_steps", ["--set", "trainer.max_steps=-5"], "trainer.max_steps must be a whole number >= 1"),
          ("zero_val_every", ["--set", "trainer.val_every=0"], "trainer.val_every must be a whole number >= 1"),
          ("zero_devices", ["--devices", "0"], "DEVICES (--devices) must be a whole number >= 1"),
          ("unknown_optimizer", ["--set", "optim.name=adamw"], "optim.name must be one of sgd, adam"),
          ("negative_workers", ["--set", "data.num_workers=-1"], "data.num_workers must be a whole number >= 0"),
          ("zero_batch", ["--set", "data.labeled_batch_size=0"], "data.labeled_batch_size must be a whole number >= 1"),
          ("unknown_precision", ["--set", "trainer.precision=fp8"], "trainer.precision must be one of 32-true"),
          ("ema_decay_one", ["--method", "mean_teacher", "--set", "method.ema_decay=1"],
           "method.ema_decay must be a number in [0, 1)"),
          ("zero_temperature", ["--method", "mc_net_plus", "--set", "method.temperature=0"],
           "method.temperature must be a number > 0"),
          ("per_stage_zero_steps", ["--method", "action", "--set", "per_stage.finetune.trainer.max_steps=0"], "per_stage.finetune.trainer.max_steps must be"),
      ]],
    # where results go
    Case("unwritable_output_folder", "OUT below a regular file", "cannot write to", lambda ws: _blocked(ws, "--out")),
    Case("unwritable_leaderboard_folder", "LEADERBOARD_DIR below a regular file", "cannot write to",
         lambda ws: _blocked(ws, "--leaderboard-dir")),
    Case("full_disk_writing_row", "the disk fills up while the leaderboard row is written (simulated ENOSPC)",
         "No space left on device", _full_disk, keeps_run=True),
    Case("corrupt_leaderboard", "the leaderboard CSV has an unterminated quote", "leaderboard CSV is damaged", _corrupt_leaderboard),
    Case("leaderboard_cut_mid_line", "the leaderboard CSV's last row cut in the middle (fields missing)", "line 2 has",
         _cut_leaderboard),
    # checkpoints
    Case("init_from_no_network", "run.init_from = a weights file holding no network weights", "holds no weights of this method's networks",
         _init_from_no_network),
    Case("init_from_other_shape", "run.init_from = a width-4 checkpoint, for a width-8 model", "of another shape",
         _init_from("supervised", "--set", "model.base_features=8")),
    Case("checkpoint_runs_code", "run.init_from = a file whose unpickling would run code (create a file)",
         "weights-only load refuses", _checkpoint_with_code),
    Case("resume_other_config", "--resume a run folder of another seed and learning rate", "holds another configuration",
         _resume_other_config),
    Case("resume_damaged_checkpoint", "--resume a run whose resume.ckpt is cut in half", "cannot read the checkpoint to resume from",
         _resume_damaged_checkpoint),
    Case("resume_not_a_run_folder", "--resume a data folder", "--resume needs a run folder", _resume_not_a_run),
]


# ---- running a case ----------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file below ``folder``: (size, mtime in ns, sha1)."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


@dataclass
class Outcome:
    case: Case
    workspace: Path
    code: int
    stderr: str
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    @property
    def changed(self) -> list[str]:
        """Files that were there before and are now different or gone."""
        return [name for name, state in self.before.items() if self.after.get(name) != state]

    @property
    def new_files(self) -> list[str]:
        return [name for name in self.after if name not in self.before]

    @property
    def message(self) -> str:
        """The error message as printed, from its ``error:`` line on; the workspace path and the time and process
        id in run folder names are shortened (they differ on every run)."""
        lines = self.stderr.splitlines()
        starts = [index for index, line in enumerate(lines) if line.startswith("error: ")]
        lines = [line for line in lines[starts[-1] if starts else 0:] if line.startswith(("error: ", "  "))]
        message = "\n".join(lines).replace(str(self.workspace), WORKSPACE_TOKEN)
        return RUN_FOLDER_STAMP.sub("_<time>_<pid>", message)


def run_case(case: Case, sources: Sources, folder: Path) -> Outcome:
    ws = Workspace(folder, sources)
    with ws.patches:
        argv = case.prepare(ws)
        before = snapshot(folder)
        code, stderr = run_cli(argv)
    return Outcome(case, folder, code, stderr, before, snapshot(folder))


# ---- the table of docs/reliability.md ------------------------------------------------------------------------
def markdown(outcomes: list[Outcome]) -> str:
    rows = ["| case | what was tried | message printed | exit |", "| --- | --- | --- | --- |"]
    for outcome in outcomes:
        message = html.escape(outcome.message, quote=False).replace("|", "&#124;").replace("\n", "<br>")
        rows.append(f"| `{outcome.case.name}` | {outcome.case.tried} | <code>{message}</code> | {outcome.code} |")
    return "\n".join(rows)


TABLE_START, TABLE_END = "<!-- bad-input catalogue: start -->", "<!-- bad-input catalogue: end -->"


def update_document(path: Path, table: str) -> None:
    """Replace the text between the table markers of ``path`` by ``table``."""
    text = path.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    if not rest or TABLE_END not in rest:
        raise SystemExit(f"{path} lacks the markers {TABLE_START} ... {TABLE_END}")
    path.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def documented_cases(path: Path) -> list[str]:
    """The case names of the table in ``path`` (first column), in order."""
    table = path.read_text().partition(TABLE_START)[2].partition(TABLE_END)[0]
    return re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the catalogue table (docs/reliability.md)")
    parser.add_argument("--update", type=Path, default=None, metavar="DOC", help="write the table into DOC between its markers")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="bad-input-") as temporary:
        os.environ.setdefault("SSL_BENCH_CACHE", str(Path(temporary) / "synthetic-cache"))
        sources = build_sources(Path(temporary) / "sources")
        outcomes = [run_case(case, sources, Path(temporary) / case.name) for case in CASES]
    if args.update:
        update_document(args.update, markdown(outcomes))
        print(f"written: {args.update}")
    elif args.markdown:
        print(markdown(outcomes))
    else:
        for outcome in outcomes:
            print(f"{outcome.case.name}: exit {outcome.code}\n{outcome.message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
