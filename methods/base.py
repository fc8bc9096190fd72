"""The LightningModule every method derives from.

It owns what all methods share: networks built from the dataset spec (2D U-Net or 3D V-Net), the supervised
loss, the optimizer and its per-step schedule, ramp-ups, logging names and validation on whole cases through
the suite's one evaluator. A method file adds only its own idea: its networks/heads in ``build``, its losses and
its ``training_step``, and (if not the first network) which network predicts at test time.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch

from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from core.distributed import gather_to_all
from core.errors import NonFiniteLossError, UserError
from core.evaluation import Evaluator
from core.spec import DatasetSpec
from methods.components.ramps import sigmoid_rampup
from methods.hyperparameters import Hyperparameters
from methods.losses import SupervisedSegmentationLoss
from methods.networks import SegmentationNetwork, build_network

NONFINITE_POLICIES = ("stop", "skip")


def poly_per_epoch(max_steps: int, epochs, power: float):
    """MMS's schedule (train_mms.py ``adjust_lr``): after every step the lr is set to ``(1 - e / (epochs + 1))^power``
    of the base, ``e`` the 1-based epoch of that step, so step 0 runs at the base lr and step ``s >= 1`` at the value
    of epoch ``(s - 1) // epoch_steps + 1``; ``epoch_steps = max_steps / epochs`` (MMS: 99 epochs, divisor 100)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1 or max_steps % epochs:
        raise UserError(
            f"optim.schedule=poly_epoch needs optim.poly_epochs, a whole number of epochs dividing trainer.max_steps "
            f"({max_steps}); got {epochs!r}",
            fix="e.g. optim.poly_epochs=99 with trainer.max_steps a multiple of 99 (MMS: 99 x N_labeled / 2)",
        )
    epoch_steps = max_steps // epochs

    def factor(step: int) -> float:
        if step == 0:
            return 1.0
        epoch = (step - 1) // epoch_steps + 1
        return max(0.0, 1.0 - epoch / (epochs + 1)) ** power

    return factor


class SemiSupervisedMethod(pl.LightningModule):
    name: ClassVar[str] = ""
    # Hyperparameters of the method (methods/hyperparameters.py): a frozen dataclass of the keys, their types and
    # defaults (the `paper` values); ``self.hp`` is an instance of it. Presets per profile live in
    # benchmark/configs/methods/<name>.yaml. Unknown keys in a config are rejected.
    hyperparameters: ClassVar[type[Hyperparameters]] = Hyperparameters
    # Field name -> default, in field order, derived from ``hyperparameters`` (what config resolution starts from).
    defaults: ClassVar[dict[str, Any]] = {}
    # False for methods that train on the labeled stream only (no unlabeled loader is built).
    uses_unlabeled: ClassVar[bool] = True
    # Training stages in order (benchmark/run.py trains them one after the other, each from the previous one's
    # weights); the stage being trained is ``self.stage`` (``config["run"]["stage"]``, set by the run).
    stages: ClassVar[tuple[str, ...]] = ("train",)
    # False for methods whose own losses read the labels (one-hot, masks) and so do not skip the spec's ignore index.
    handles_ignore_index: ClassVar[bool] = True
    # Dimensionalities the method is defined for; the runner refuses other datasets with a UserError.
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    # >1: the labeled set is split into this many disjoint consecutive parts and every labeled batch is their
    # concatenation in equal shares (datamodules/samplers.py PartitionedStepSampler), e.g. MMS's one part per network.
    labeled_partitions: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "defaults" in vars(cls):
            raise TypeError(f"{cls.__name__} writes a defaults dict: declare a Hyperparameters dataclass instead "
                            "(methods/hyperparameters.py) and set hyperparameters = it")
        cls.defaults = cls.hyperparameters.defaults()

    def __init__(self, spec: DatasetSpec, config: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.config = config
        # Defaults under the config's values: a config written before a hyperparameter existed (an old run folder
        # being resumed or re-evaluated, a hand-built config) gets the default, which hash-neutral keys assume.
        self.hp = {**self.defaults, **config["method"]}
        self.stage = config["run"].get("stage") or self.stages[0]
        if self.stage not in self.stages:
            raise ValueError(f"{type(self).__name__} has no stage '{self.stage}' (stages: {', '.join(self.stages)})")
        unknown = set(self.hp) - set(self.defaults)
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown hyperparameters {sorted(unknown)}")
        self.hp = self.hyperparameters.from_values(self.hp, self.name)
        self.check_dataset(spec)
        self.save_hyperparameters({"config": config, "spec": asdict(spec)})
        policy = config["trainer"].get("on_nonfinite_loss", "stop")
        if policy not in NONFINITE_POLICIES:
            raise UserError(f"unknown trainer.on_nonfinite_loss '{policy}'", where=f"known: {', '.join(NONFINITE_POLICIES)}")
        lag = config["optim"].get("poly_step_lag", 0)
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise UserError(f"optim.poly_step_lag={lag!r} must be a whole number >= 0", fix="e.g. optim.poly_step_lag=0")
        optim = config["optim"]
        if optim.get("schedule") == "poly_epoch":  # refuse a bad epoch count before training starts
            poly_per_epoch(config["trainer"]["max_steps"], optim.get("poly_epochs"), optim["poly_power"])
        self.evaluator = Evaluator.from_config(spec, config)
        self.supervised_criterion = SupervisedSegmentationLoss(
            include_background=spec.dice_include_background, ignore_index=spec.ignore_index
        )
        self._val_scores: list[list[float]] = []
        self.build()
        for module in self.zero_weight_term_modules():
            module.requires_grad_(False)
        if config["trainer"].get("channels_last", False):  # 2-D only (benchmark/precision.py check_numerics)
            self.to(memory_format=torch.channels_last)

    @classmethod
    def check_dataset(cls, spec: DatasetSpec) -> None:
        """Refuse a dataset the method cannot train on correctly (run.prepare calls this before writing anything)."""
        if spec.spatial_dims not in cls.spatial_dims:
            raise UserError(
                f"method '{cls.name}' is {'/'.join(f'{d}-D' for d in cls.spatial_dims)} only, but dataset '{spec.name}' "
                f"is {spec.spatial_dims}-D",
                fix="choose a dataset of a supported dimensionality (`python -m benchmark list datasets`)",
            )
        if spec.ignore_index is not None and not cls.handles_ignore_index:
            raise UserError(
                f"{cls.__name__} does not handle the ignored label {spec.ignore_index} of {spec.name}",
                fix="use a dataset without ignored pixels (e.g. cadis, task I) or a method that does (supervised, mean_teacher, ua_mt, cps)",
            )

    # ---- what a method provides ------------------------------------------------------------------
    def build(self) -> None:
        """Create the networks and heads (as attributes, so Lightning moves and saves them)."""
        raise NotImplementedError

    def zero_weight_term_modules(self) -> list[nn.Module]:
        """Heads whose only use is a loss term this configuration weighs 0 (an ablation flag). They get no gradient
        and stay out of the optimizer and DDP: their gradient would be exactly zero, and coupled weight decay alone
        would shrink their weights towards zero until what they compute underflows into denormal floats, which are
        slow on CPUs, without changing how the network trains. (ACTION's representation head with ``reco_weight=0``:
        weights of about 1e-32 after stage 3, and a training step with them 13 times slower than with the head as
        initialised.) The term is still computed and logged, so its random draws and the run's other numbers stay
        as they were.
        """
        return []

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | float]:
        """Every term of one step by name, the total under "loss" (tests check each term's gradient routing)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor | None:
        """Default: log every term of ``compute_losses`` and minimise its "loss" if every term is finite."""
        losses = self.compute_losses(batch)
        self.log_losses(sum(stream["image"].shape[0] for stream in batch.values()), **losses)
        if not self.check_finite(losses):
            return None  # trainer.on_nonfinite_loss=skip: Lightning skips backward and the optimizer step
        return losses["loss"]

    def check_finite(self, losses: dict[str, torch.Tensor | float]) -> bool:
        """True if every term is finite. Otherwise stop (the default: raise naming the terms and the step, so the
        run is recorded as failed, never as a number) or, with ``trainer.on_nonfinite_loss=skip``, warn and skip.

        One device sync per step for all terms together (contrastive terms with a small temperature can overflow).
        """
        tensors = [v.detach().float().reshape(-1) for v in losses.values() if isinstance(v, torch.Tensor)]
        finite = bool(torch.isfinite(torch.cat(tensors)).all()) if tensors else True
        finite = finite and all(math.isfinite(v) for v in losses.values() if not isinstance(v, torch.Tensor))
        if finite:
            return True
        bad = {name: float(torch.as_tensor(v).detach().float().sum()) for name, v in losses.items()
               if not bool(torch.isfinite(torch.as_tensor(v)).all())}
        described = ", ".join(f"{name}={value}" for name, value in bad.items())
        policy = self.config["trainer"].get("on_nonfinite_loss", "stop")
        if policy == "skip":
            rank_zero_warn(f"non-finite loss at step {self.global_step} ({described}): step skipped")
            self.log("train/skipped_steps", 1.0, reduce_fx="sum", batch_size=1)
            return False
        raise NonFiniteLossError(
            f"{self.name}: non-finite loss at step {self.global_step}: {described}. The run is recorded as failed. "
            "Fix: lower the learning rate or raise a contrastive temperature, or set "
            "trainer.on_nonfinite_loss=skip to skip such steps"
        )

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the network that is evaluated (default: ``self.net``)."""
        return self.net(images)

    def on_stage_start(self, previous_stage: str | None) -> None:
        """Called by the run before each stage trains, after its fresh module got the weights it starts from;
        ``previous_stage`` is the stage that wrote them (None: fresh weights, or a checkpoint that does not say).
        E.g. ACTION copies its student into the teacher when fine-tuning starts."""

    # ---- shared pieces ----------------------------------------------------------------------------
    def build_network(self, **overrides: Any) -> SegmentationNetwork:
        model = self.config["model"]
        options = dict(name=model["name"], base_features=model["base_features"], dropout=model["dropout"])
        options.update(overrides)
        return build_network(self.spec.spatial_dims, self.spec.in_channels, self.spec.num_classes, **options)

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.supervised_criterion(logits, labels)

    def rampup(self, length: float, divisor: int = 150, fraction: float | None = None, step_offset: int = 0) -> float:
        """Sigmoid ramp-up on ``(global_step + step_offset) // divisor`` up to ``length`` (SSL4MIS passes
        iteration // 150), or, with ``fraction``, on the step itself over that fraction of trainer.max_steps (the
        cpu presets, whose budgets are far shorter than the 150-iteration units assume)."""
        if fraction is not None:
            return sigmoid_rampup(self.global_step, fraction * self.config["trainer"]["max_steps"])
        return sigmoid_rampup((self.global_step + step_offset) // divisor, length)

    def on_train_start(self) -> None:
        # seed_everything seeds every DDP rank alike, so the global torch generator (dropout masks, and the
        # augmentation of a loader without worker processes) would draw the same numbers on every rank for
        # different samples. Rank 0 keeps its stream, so a one-device run is unchanged. (Loader workers are seeded
        # per rank by Lightning already.)
        if self.global_rank > 0:
            torch.manual_seed((self.config["run"]["seed"] * 1_000_003 + self.global_rank * 10_007 + 1) % 2**63)

    def step_generator(self) -> torch.Generator:
        """Randomness for this training step (noise, mixing boxes): seeded by (seed, rank, step), so every DDP
        rank draws differently (one global seed would give every rank the same noise, docs/design.md#randomness) and a
        resumed run draws what the uninterrupted one did."""
        seed = (self.config["run"]["seed"] * 1_000_003 + self.global_rank * 10_007 + self.global_step) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def log_losses(self, batch_size: int, **values: torch.Tensor | float) -> None:
        # Lightning keeps a training step's values only on the steps its loggers write (every trainer.log_every, its
        # own should_update_logs, evaluated the same way when it writes). Handing it Co-DA's ~30 values on every
        # other step cost ~45 ms of Python per step for nothing (make perf, framework column).
        if self._trainer is not None and not self.trainer._logger_connector.should_update_logs:
            return
        self.log_dict({f"train/{k}": v for k, v in values.items()}, batch_size=batch_size, prog_bar=False)

    def configure_optimizers(self):
        optim = self.config["optim"]
        parameters = [p for p in self.parameters() if p.requires_grad]
        name = optim.get("name", "sgd")
        if name == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=optim["lr"], momentum=optim["momentum"], weight_decay=optim["weight_decay"],
                                        nesterov=optim.get("nesterov", False))
        elif name == "adam":  # default betas (the endoscopy protocol of MMS)
            optimizer = torch.optim.Adam(parameters, lr=optim["lr"], weight_decay=optim["weight_decay"])
        else:
            raise ValueError(f"unknown optim.name '{name}' (sgd, adam)")
        max_steps = self.config["trainer"]["max_steps"]
        schedule = optim["schedule"]
        if schedule == "poly":
            lag = optim.get("poly_step_lag", 0)  # SSL4MIS's Mean Teacher scripts: 1 (LR set before iter_num += 1)
            factor = lambda step: max(0.0, 1.0 - max(step - lag, 0) / max_steps) ** optim["poly_power"]  # noqa: E731
        elif schedule == "step":
            factor = lambda step: optim["step_gamma"] ** (step // optim["step_every"])  # noqa: E731
        elif schedule == "constant":
            factor = lambda step: 1.0  # noqa: E731
        elif schedule == "poly_epoch":
            factor = poly_per_epoch(max_steps, optim.get("poly_epochs"), optim["poly_power"])
        else:
            raise ValueError(f"unknown optim.schedule '{schedule}' (poly, step, constant, poly_epoch)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- validation on whole cases ----------------------------------------------------------------
    def monitored_predictors(self) -> dict[str, Any]:
        """Extra predictors whose validation Dice is logged as ``val/dice_<name>`` beside the model-selection one
        (e.g. each network of a two-network method, so a run shows when one of them lags). Never used for selection."""
        return {}

    def on_validation_epoch_start(self) -> None:
        self._val_scores = []
        self._monitored_scores = {name: [] for name in self.monitored_predictors()}

    def validation_step(self, case: dict[str, Any], batch_idx: int) -> None:
        image, label = np.asarray(case["image"]), np.asarray(case["label"])
        prediction = self.evaluator.predict(self.predict_logits, image, device=self.device)
        self._val_scores.append(self.evaluator.dice_per_class(prediction, label))
        for name, predictor in self.monitored_predictors().items():
            prediction = self.evaluator.predict(predictor, image, device=self.device)
            self._monitored_scores[name].append(self.evaluator.dice_per_class(prediction, label))

    def on_validation_epoch_end(self) -> None:
        # Under DDP each rank scored its share of the cases (the DataModule's case loader); every rank gathers all
        # scores, so the logged mean (and the best-checkpoint choice made from it) is the same everywhere.
        scores = [case for part in gather_to_all(self._val_scores) for case in part]
        monitored = {name: [case for part in gather_to_all(values) for case in part]
                     for name, values in self._monitored_scores.items()}
        if not scores:
            return
        scores = np.asarray(scores)  # (cases, foreground classes)
        self.log("val/dice", float(scores.mean()), prog_bar=True, batch_size=1, sync_dist=True)
        for index, class_name in enumerate(self.evaluator.score_names):
            self.log(f"val/dice_{class_name}", float(scores[:, index].mean()), batch_size=1, sync_dist=True)
        for name, values in monitored.items():
            self.log(f"val/dice_{name}", float(np.mean(values)), batch_size=1, sync_dist=True)
