"""``predict``: a trained run (its folder) and a folder of images in, label maps out, one per image, with the
method's own inference (the evaluator's: sliding window in 3-D, slice by slice for 2-D-trained volumes, one resized
pass for whole 2-D images; the network a two-network method evaluates; the largest component if ``eval.lcc``).

Inputs are the files directly in the folder, read as the run's dataset reads its test cases:
- ``.h5``: the ``image`` dataset as stored (the SSL4MIS / UA-MT forms: already normalised);
  written as ``.h5`` with a ``label`` dataset, the input file's attributes (e.g. ``spacing``) copied;
- ``.nii`` / ``.nii.gz``: the volume in (z, y, x) order, as stored (intensities preprocessed as the training data);
  written as NIfTI of the same name with the input's affine and header (data type uint8);
- ``.png`` / ``.jpg`` / ``.jpeg``: RGB (or grey for one-channel data sets) in [0, 1], normalised as the data set's
  images; written as ``<name>.png`` (class indices; a lossless format even for JPEG input) at the image's own size.
The output folder then scores with ``python -m benchmark score OUTPUT GROUND_TRUTH``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.errors import UserError

VOLUME_SUFFIXES = (".h5", ".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in (*VOLUME_SUFFIXES, *IMAGE_SUFFIXES) if name.endswith(suffix)), None)


def input_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError("the input folder does not exist", where=str(folder), fix="give a folder of images (INPUT=...)")
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".") and suffix_of(path))
    if not files:
        raise UserError("the input folder holds no image (.h5, .nii, .nii.gz, .png, .jpg, .jpeg)", where=str(folder),
                        fix="put the images directly in the folder (sub-folders are not read)")
    return files


def load_run(run_dir: Path, checkpoint: str = "last"):
    """(model in eval mode with the checkpoint's weights, evaluator, config) of a run folder."""
    from benchmark.config import stage_config
    from benchmark.run import RunFolder, load_weights
    from core.evaluation import Evaluator
    from datamodules import get_dataset
    from methods.registry import get_method

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError("not a run folder (it holds no config.yaml)", where=str(run_dir),
                        fix="give the folder a run printed as 'run folder:' (RUN=runs/<dataset>/<method>/L<n>_s<seed>_...)")
    config = yaml.safe_load(config_file.read_text())
    config.pop("config_hash", None)
    entry, method_cls = get_dataset(config["dataset"]), get_method(config["method_name"])
    stages = list(method_cls.stages)
    asked = config["run"].get("stages")
    final = (stages if asked is None else [asked] if isinstance(asked, str) else list(asked))[-1]
    folder = RunFolder(run_dir, multi_stage=len(stages) > 1, resumed=False)
    path = {"last": folder.last_checkpoint, "best": folder.best_checkpoint}[checkpoint](final)
    if not path.is_file():
        raise UserError(f"the run folder has no {checkpoint} checkpoint (an unfinished run?)", where=str(path),
                        fix="finish the run first (make bench RESUME=<run folder>), or choose --checkpoint best|last")
    model = method_cls(entry.spec, stage_config(config, final))
    load_weights(model, path)
    model.eval()
    return model, Evaluator.from_config(entry.spec, config), config


def read_input(path: Path, spec) -> tuple[np.ndarray, dict[str, Any]]:
    """(the image as the evaluator takes it, what is needed to write the label map like the input)."""
    suffix = suffix_of(path)
    if suffix == ".h5":
        import h5py

        from datamodules.base import read_h5

        with h5py.File(path, "r") as file:
            attributes = dict(file.attrs)
        return read_h5(path, ["image"])["image"], {"attributes": attributes}
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        from datamodules.brats import read_nifti_zyx

        image, _ = read_nifti_zyx(path)
        return image.astype(np.float32), {"nifti": nib.load(str(path))}
    from datamodules.endoscopy import normalize, read_grey, read_rgb

    image = read_rgb(path) if spec.in_channels == 3 else read_grey(path, "image")[None].astype(np.float32) / 255.0
    if spec.image_normalization is not None:
        image = normalize(image, spec.image_normalization)
    return image, {}


def output_path(path: Path, out: Path) -> Path:
    suffix = suffix_of(path)
    stem = path.name[: -len(suffix)]
    return out / (path.name if suffix in VOLUME_SUFFIXES else f"{stem}.png")


def write_label_map(labels: np.ndarray, target: Path, source: Path, context: dict[str, Any]) -> None:
    suffix = suffix_of(source)
    labels = labels.astype(np.uint8)
    if suffix == ".h5":
        import h5py

        with h5py.File(target, "w") as file:
            file.create_dataset("label", data=labels, compression="gzip")
            for key, value in context["attributes"].items():
                file.attrs[key] = value
    elif suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        original = context["nifti"]
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(labels, (2, 1, 0))), original.affine, header), str(target))
    else:
        from PIL import Image

        Image.fromarray(labels).save(target)


def predict_folder(run_dir: str | Path, input_dir: str | Path, output_dir: str | Path, checkpoint: str = "last") -> list[Path]:
    """Predict every image of ``input_dir`` into ``output_dir``; returns the files written."""
    import torch

    run_dir, input_dir, output_dir = Path(run_dir).expanduser(), Path(input_dir).expanduser(), Path(output_dir).expanduser()
    files = input_files(input_dir)
    if output_dir.resolve() == input_dir.resolve():
        raise UserError("the output folder is the input folder", where=str(output_dir), fix="give another OUTPUT folder")
    model, evaluator, _ = load_run(run_dir, checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for path in files:
            image, context = read_input(path, evaluator.spec)
            labels = evaluator.predict(model.predict_logits, image, model.device)
            target = output_path(path, output_dir)
            write_label_map(labels, target, path, context)
            written.append(target)
    return written
