"""Shared LightningModule machinery: optimizer partials, the sampling EMA, exact resume
(batch counter and RNG states in the checkpoint) and self-describing checkpoints."""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from cmexp.diffusion.ema import ema_update_
from cmexp.inference.plan import SamplingSpec, nfe, sigma_plan
from cmexp.training.clock import TrainingClock
from cmexp.utils.errors import NonFiniteLossError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
#: A preconditioning wrapper class with its constants, built by Hydra as a partial
#: (``model.precond``: ``_target_`` a wrapper of ``cmexp.diffusion.precond``,
#: ``cmexp.diffusion.vp`` or ``cmexp.diffusion.trigflow``, ``sigma_min``, ``sigma_max``,
#: ``sigma_data``, ``c_noise_scale``, ...); called with the raw network.
PrecondFactory = Callable[..., nn.Module]


def _numpy_state_to_torch(state: tuple) -> dict[str, Any]:
    """numpy's MT19937 state with the key array as a tensor, so checkpoints load with
    ``torch.load(weights_only=True)`` (Lightning's default)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_torch(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere (target network, EMA, teacher)."""
    out = copy.deepcopy(module)
    out.requires_grad_(False)
    return out


def check_taus(taus: Any, model: nn.Module, key: str = "model.taus") -> tuple[float, ...]:
    """Multistep sampling's levels after T as floats, each inside the wrapper's
    ``(sigma_min, sigma_max)``; a ValueError naming ``key`` otherwise."""
    out = tuple(float(t) for t in taus)
    for t in out:
        if not model.sigma_min < t < model.sigma_max:
            raise ValueError(
                f"{key} entries must lie in (model.precond.sigma_min, model.precond.sigma_max) = "
                f"({model.sigma_min}, {model.sigma_max}), got {t}"
            )
    return out


class DiffusionLitModule(TrainingClock, pl.LightningModule):
    """Base class of the methods that train a sampled model. Subclasses set ``self.model``
    (the trained wrapper) before calling :meth:`_init_ema`, set ``kind`` (their registered
    kind, ``cmexp.registry``), and implement ``compute_loss`` and ``sampling_spec``;
    in-training samples go through the shared :func:`cmexp.inference.generate`.

    A method's constructor takes its own arguments and passes these shared ones through
    (``**base``), so they are written once, here.

    Args:
        optimizer: partial optimizer (``torch.optim.RAdam`` with lr 4e-4 in the CM paper,
            Table 3), completed with the parameters in ``configure_optimizers``.
        ema_decay: rate of the sampling EMA (0.9999 for CIFAR-10, Table 3). Never the target
            network's rate ``mu``.
        lr_warmup_kimg: linear learning-rate warm-up in thousands of images (0 = none, as the
            CM paper; EDM's teacher uses 10,000).
        compile_net: ``torch.compile`` the online raw network in place (``nn.Module.compile``:
            checkpoint keys are unchanged). channels_last: NHWC memory format for the networks
            and the batches (faster convolutions on recent GPUs).
    """

    kind: str = "base"

    def __init__(
        self,
        optimizer: OptimizerFactory,
        ema_decay: float = 0.9999,
        lr_warmup_kimg: float = 0.0,
        compile_net: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.compile_net, self.channels_last = bool(compile_net), bool(channels_last)
        if not 0 <= ema_decay < 1:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {ema_decay!r}")
        self.optimizer_factory = optimizer
        self.ema_decay = float(ema_decay)
        self.lr_warmup_kimg = float(lr_warmup_kimg)
        self.batches_seen = 0
        self.train_seconds = 0.0  # wall time spent training, summed over resumes (TrainingClock)
        self.run_config: dict[str, Any] | None = None  # set by cmexp.train for self-description
        self.model: nn.Module
        self.ema: nn.Module
        self.latent: nn.Module | None = None  # latent mode: the frozen codec (attach_latent)

    def _init_ema(self) -> None:
        self.ema = frozen_copy(self.model)

    # ---------------------------------------------------------------- a frozen teacher
    def attach_teacher(self, teacher: nn.Module) -> None:
        """Keep a frozen teacher beside the trained model: out of ``state_dict()`` and
        ``parameters()`` (so checkpoints never contain it), moved with the module."""
        self._teacher = [teacher]

    @property
    def teacher(self) -> nn.Module | None:
        held = self.__dict__.get("_teacher")
        return held[0] if held else None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DiffusionLitModule:
        super()._apply(fn, *args, **kwargs)
        for teacher in self.__dict__.get("_teacher", ()):
            teacher._apply(fn, *args, **kwargs)
        return self

    def consistency_spec(self, num_scales: int) -> SamplingSpec:
        """The sampling settings of a consistency function (CM paper Alg. 1): the wrapper's
        sigma range, ``self.rho``, the grid N that ``tau_indices`` index, ``self.taus`` and the
        method's ``clip_denoised`` default (its registry record)."""
        from cmexp import registry

        m = self.model
        record = registry.methods().get(self.kind)  # its clip_denoised default (None: Alg. 1's)
        return SamplingSpec(
            family="consistency",
            sampler="consistency",
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            rho=self.rho,
            num_scales=int(num_scales),
            taus=self.taus,
            clip_denoised=record.clip_denoised if record is not None else None,
        )

    def configure_model(self) -> None:
        """Apply the speed options once the module is on its device (Lightning hook)."""
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_net and not getattr(self, "_compiled", False):
            self.model.net.compile()
            self._compiled = True

    def attach_latent(self, codec: nn.Module) -> None:
        """Train in the latent space of ``codec`` (:class:`cmexp.inference.latent.LatentCodec`,
        latent mode; called by ``cmexp.train`` before fit): the batches are its scaled latents
        (``cmexp.data.latent.LatentDataModule``), the network's input shape must be its latent
        shape, samples are decoded, and the codec is saved in every checkpoint (``latent.*``
        weights, ``checkpoint["cmexp"]["latent"]``)."""
        from cmexp.inference.latent import check_latent_shape

        m = self.model
        check_latent_shape(
            codec,
            m.img_resolution,
            m.img_channels,
            "the network's input (net.img_channels x net.img_resolution^2)",
        )
        self.latent = codec

    # ---------------------------------------------------------------- training
    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` for the losses' global-batch randomness."""
        if self._trainer is None:
            return (0, 1)
        return (self.trainer.global_rank, self.trainer.world_size)

    def global_batch_size(self, local: int) -> int:
        return local * (self.trainer.world_size if self._trainer is not None else 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels if self.label_dim > 0 else None
        loss, extra = self.compute_loss(images, labels)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; the last "
                "good checkpoint is kept in the run's checkpoints/ folder (last.ckpt); lower "
                "model.optimizer.lr or check the data"
            )
        self.batches_seen += 1
        kimg = self.batches_seen * self.global_batch_size(images.shape[0]) / 1000
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True
        )  # global-batch mean
        self.log("train/kimg", kimg, on_step=True, on_epoch=False)
        for key, value in extra.items():
            self.log(f"train/{key}", float(value), on_step=True, on_epoch=False)
        return loss

    @property
    def label_dim(self) -> int:
        return int(getattr(self.model, "label_dim", 0))

    def grid_labels(self, num: int) -> Tensor | None:
        """Labels of in-training samples of a class-conditional model: ``i mod label_dim``
        (``[num]``, every class in turn: a grid shows the classes), None when unconditional."""
        if self.label_dim == 0:
            return None
        return torch.arange(num, device=self.device) % self.label_dim

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Update the averaged copies after each optimizer step (sampling EMA here)."""
        ema_update_(self.ema, self.model, self.ema_decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the online model (modes with extra trained parts, e.g.
        sCM's adaptive weighting, add theirs)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.trainable_parameters())
        if self.lr_warmup_kimg <= 0:
            return opt

        def warmup(step: int) -> float:
            batch = self.trainer.datamodule.batch_size if self.trainer.datamodule else 1
            accum = self.trainer.accumulate_grad_batches
            kimg = step * self.global_batch_size(batch) * accum / 1000
            return min(kimg / self.lr_warmup_kimg, 1.0)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- sampling
    def sampling_spec(self) -> SamplingSpec:
        """The settings the trained model is sampled with (written into every checkpoint)."""
        raise NotImplementedError

    def sample_plans(self) -> dict[str, tuple[list[float], str]]:
        """What in-training grids and quality callbacks draw: ``{name: (sigmas, sampler)}``.
        Jump families (consistency models): 1 and 2 steps (``"1step"``, ``"2step"``);
        solver families: the model's own sampler on its plan (``"heun35nfe"``)."""
        spec = self.sampling_spec()
        if not spec.uses_solver:
            return {f"{k}step": (sigma_plan(spec, k), spec.sampler) for k in (1, 2)}
        plan = sigma_plan(spec)
        return {f"{spec.sampler}{nfe(plan, spec.sampler)}nfe": (plan, spec.sampler)}

    def sampling_model(self) -> nn.Module:
        """The network in-training samples are drawn from: the sampling EMA."""
        return self.ema

    @contextlib.contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """Mode the sampling model is in while in-training samples are drawn (a method whose
        wrapper differs between training and sampling switches it here; default: unchanged)."""
        yield

    @torch.no_grad()
    def sample_sets(self, num: int, seed: int = 0) -> dict[str, Tensor]:
        """What the sample-grid and sample-quality callbacks show and score: images
        ``{name: [num,C,H,W] in [-1,1]}`` of :meth:`sample_plans`, drawn from
        :meth:`sampling_model` by the shared :func:`cmexp.inference.generate` (seeds
        ``seed..seed+num-1``; a class-conditional model draws class ``i mod label_dim`` for
        image i; a latent model samples latents without clamping and decodes them)."""
        from cmexp.inference.generate import generate
        from cmexp.inference.loader import LoadedModel

        loaded = LoadedModel(
            model=self.sampling_model(),
            kind=self.kind,
            spec=self.sampling_spec(),
            meta=self.sampling_meta(),
            latent=self.latent,
        )
        grid = self.grid_labels(num)
        labels = grid.tolist() if grid is not None else None
        with self.sampling_mode():
            return {
                name: generate(
                    loaded,
                    num,
                    sigmas,
                    seed,
                    batch_size=num,
                    sampler=sampler,
                    device=self.device,
                    class_labels=labels,
                ).to(self.device)
                for name, (sigmas, sampler) in self.sample_plans().items()
            }

    def sampling_meta(self) -> dict[str, Any]:
        """The metadata entries that sampling reads (a guided student's w range)."""
        return {}

    # ---------------------------------------------------------------- checkpoints
    def metadata(self) -> dict[str, Any]:
        """Everything needed to use the model, read back by :func:`cmexp.inference.load_model`."""
        m, spec = self.model, self.sampling_spec()
        return {
            "kind": self.kind,
            "method_package": type(self).__module__.rsplit(".", 1)[0],
            "img_resolution": int(m.img_resolution),
            "img_channels": int(m.img_channels),
            "label_dim": int(m.label_dim),
            "sigma_min": m.sigma_min,
            "sigma_max": m.sigma_max,
            "sigma_data": m.sigma_data,
            "c_noise_scale": m.c_noise_scale,
            "rho": spec.rho,
            "num_scales": spec.num_scales,
            "taus": list(spec.taus),
            "sampler": spec.sampler,
            "final_zero": spec.final_zero,
            **({"precond": m.describe()} if hasattr(m, "describe") else {}),
            **(
                {"alpha_bars": torch.tensor(spec.alpha_bars, dtype=torch.float64)}
                if spec.alpha_bars
                else {}
            ),
            **({"latent": self.latent.describe()} if self.latent is not None else {}),
        }

    def on_train_start(self) -> None:
        self.start_clock()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["cmexp"] = {
            **self.metadata(),
            "batches_seen": self.batches_seen,
            "train_seconds": round(self.elapsed(), 3),
            "rng": rng,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cmexp")
        if meta is None:
            raise ValueError(
                "ckpt_path does not point to a checkpoint written by cmexp (no 'cmexp' entry)"
            )
        if meta.get("kind") != self.kind:
            raise ValueError(
                f"ckpt_path holds a '{meta.get('kind')}' model but this run trains '{self.kind}'; "
                "resume with the same +experiment"
            )
        if bool(meta.get("latent")) != (self.latent is not None):
            space = "latent" if meta.get("latent") else "pixel"
            raise ValueError(
                f"ckpt_path holds a {space}-space model but this run trains in "
                f"{'latent' if self.latent is not None else 'pixel'} space; resume with the same "
                "latent= setting"
            )
        self.batches_seen = int(meta["batches_seen"])
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        rng = meta["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from_torch(rng["numpy"]))
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "start_batch"):
            datamodule.start_batch = self.batches_seen

    def snapshot_rng(self) -> None:
        """Remember the host RNG states; :meth:`setup` puts them back in every process, so a
        DDP rank (whose strategy re-seeds it) continues the stream a single process would."""
        self._rng_snapshot = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def setup(self, stage: str) -> None:
        snap = getattr(self, "_rng_snapshot", None)
        if stage == "fit" and snap is not None:
            torch.set_rng_state(snap[0])
            np.random.set_state(snap[1])
            random.setstate(snap[2])

    def teardown(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
