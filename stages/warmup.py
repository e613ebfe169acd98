"""The `warmup` stage: source-only supervised training, optionally with the output-space
adversarial warmup, producing the checkpoint that seeds pseudo labels and self-training.

One readable loop (docs/method.md, the warmup): SGD with Nesterov momentum, linear LR warmup
then poly decay, cross-entropy (ignore 255) on augmented source crops; with
`warmup.adversarial.enabled`, a least-squares discriminator on the target softmax and the
generator term λ_adv·MSE(D(p_t), 0). With `warmup.train_domain: target` the same model trains on
target-train labels instead: the oracle, the upper bound of an adaptation table. Every
`checkpoint_every` iterations the full training state is written atomically to
`train_state.pt`, so `--resume` continues exactly where the run stopped; on the CPU a resumed
run reaches bit-identical weights. Optional periodic evaluation on target-val keeps `best.pt`;
the last weights are `model.pt`.

Under `torchrun` every process trains the same model on its own share of each epoch's crops
(`warmup.batch_size` per process); DistributedDataParallel averages the gradients, with
synchronised batch norm when `warmup.runtime.sync_batchnorm` (stages.runtime.distributed), and the
discriminator's gradients are averaged alike. Rank 0 writes the checkpoints, metrics and
manifest and runs the periodic evaluation; a resumed run must use the same number of processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from stages.artifacts.checkpoint import (
    BEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    write_model_file,
)
from stages.artifacts.manifest import CHECKPOINT, ArtifactRef, StageResult, file_digest
from stages.artifacts.weights import initialize
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, hashed_config, stage_config, stage_hash
from stages.data.crops import CropDataset, InfiniteLoader
from stages.data.index import DatasetIndex, load_dataset_index
from stages.data.rare_classes import rare_class_sampler
from stages.engine.inference import target_val_miou
from stages.engine.training import (
    MetricsLog,
    Progress,
    RandomState,
    TrainState,
    apply_lr_factor,
    build_optimizer,
    check_finite,
    learning_rate_factor,
    optimizer_groups,
    per_process_batch,
)
from stages.nn.discriminator import (
    OutputDiscriminator,
    adversarial_loss,
    discriminator_loss,
    output_size,
)
from stages.nn.losses import cross_entropy
from stages.nn.model import build_model
from stages.runtime.devices import autocast, evaluation_workers, worker_count
from stages.runtime.distributed import Ranks, process_group
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter
from stages.runtime.seeding import seed_everything

# The discriminator's Adam moments (IAST's adversarial warmup).
DISCRIMINATOR_BETAS = (0.9, 0.999)


def run(config: Config, data: str | Path, out: str | Path, *, init: str | Path | None = None,
        resume: bool = False, force: bool = False, device: str = "auto",
        reporter: Reporter | None = None) -> StageResult:
    """Train the warmup model on `data` (a dataset index) and write a checkpoint at `out`.

    The initial weights are `model.init` (none, imagenet, or a weights file or checkpoint
    artifact; see stages.artifacts.weights); `init`, when given, replaces it. `resume` continues the
    unfinished run in `out`; a finished one with the same config and inputs is a no-op.
    """
    if init is not None:  # --init: the same as setting model.init
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"init": str(Path(init).expanduser().resolve())})})
    with process_group(device) as ranks:
        reporter = ranks.reporter(reporter)
        index = load_dataset_index(data)
        inputs = {"data": index.ref}
        if config.model.init not in ("none", "imagenet"):
            inputs["init"] = _init_ref(Path(config.model.init))
        section = stage_config(config, "warmup")
        with ArtifactWriter(out, kind=CHECKPOINT, stage="warmup", config=section,
                            config_hash=stage_hash(config, "warmup"), inputs=inputs, force=force,
                            resume=resume, resumable=True,
                            device=str(ranks.compute_device), ranks=ranks) as writer:
            if writer.up_to_date:
                return writer.result()
            writer.require_checkpoint_space(config.model, index.num_classes)
            identity = {"config": hashed_config(config, "warmup"),
                        "inputs": {k: v.id for k, v in inputs.items()}}
            summary = _train(config, index, writer.work, ranks=ranks, resuming=writer.resuming,
                             identity=identity, reporter=reporter)
            writer.finish(summary or {}, content=[MODEL_FILE])
        return writer.result()


def _init_ref(path: Path) -> ArtifactRef:
    """The lineage record of the initial weights: a checkpoint artifact or a weights file."""
    if path.is_dir():
        from stages.artifacts.checkpoint import load_checkpoint_manifest

        return load_checkpoint_manifest(path).ref(path)
    if not path.is_file():
        raise DudaError(f"initial weights file {path} (model.init) does not exist",
                        "place the weights file there, or name another one (--init PATH or "
                        "--set model.init=PATH), or --set model.init=none to train from random "
                        "weights")
    return ArtifactRef(kind="weights", id=file_digest(path)[:16], path=str(path.resolve()))


@dataclass
class _Adversarial:
    """The output-space discriminator of the adversarial warmup, with what trains it."""

    discriminator: OutputDiscriminator
    optimizer: torch.optim.Adam
    scaler: torch.amp.GradScaler
    target_loader: InfiniteLoader

    def state_entries(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator,
                "discriminator_optimizer": self.optimizer,
                "discriminator_scaler": self.scaler, "target_loader": self.target_loader}


def _train(config: Config, index: DatasetIndex, out: Path, *, ranks: Ranks, resuming: bool,
           identity: dict[str, Any], reporter: Reporter) -> dict[str, Any] | None:
    """The training loop; the summary on rank 0, None on the other ranks."""
    cfg = config.warmup
    device = ranks.compute_device
    seed_everything(config.seed)

    model = build_model(config.model, index.num_classes)
    loaded = initialize(model, config.model)
    if loaded is None:
        reporter.info("model.init is none: the model starts from random weights")
    model.to(device).train()
    per_process = per_process_batch(cfg.batch_size, ranks.world_size, 1, "warmup.batch_size")
    ranks.announce(reporter, f"{per_process} source crops per process")
    optimizer = build_optimizer(optimizer_groups(model, cfg.optimizer), cfg.optimizer)
    fp16 = device.type == "cuda" and cfg.runtime.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    # The oracle (train_domain: target) trains the same model on target-train labels.
    source_loader = _loader(config, index, cfg.train_domain, config.seed, ranks, labelled=True)
    adversarial = _adversarial(config, index, ranks, fp16) if cfg.adversarial.enabled else None
    # The models are built alike on every rank; from here each rank draws its own dropout.
    ranks.seed_apart(config.seed)

    progress = Progress()
    metrics = MetricsLog(out / METRICS_FILE, progress, writer=ranks.is_main,
                         tensorboard=config.logging.tensorboard,
                         class_names=index.classes.names)
    state = TrainState(out / TRAIN_STATE_FILE, "warmup", identity, ranks, {
        "model": model, "optimizer": optimizer, "scaler": scaler,
        "source_loader": source_loader,
        **(adversarial.state_entries() if adversarial is not None else {}),
        "progress": progress, "metrics": metrics, "rng": RandomState(ranks)})
    if resuming and state.path.is_file():
        state.load(out)
        reporter.info(f"resuming {out} at iteration {progress.iteration}")
    else:
        metrics.start()
    net = ranks.data_parallel(model, cfg.runtime.sync_batchnorm)  # what the step calls

    logged: dict[str, float] = {}  # the last logged loss values (means over ranks)
    start, started, lr = progress.iteration, time.monotonic(), 0.0
    try:
        with reporter.task("warmup", total=cfg.iterations, completed=start,
                           log_every=cfg.log_every) as task:
            for it in range(start, cfg.iterations):
                # The step taken after `it` previous steps uses factor(it).
                factor = learning_rate_factor(it, cfg.iterations, cfg.optimizer)
                lr = apply_lr_factor(optimizer, factor)
                if adversarial is not None:
                    apply_lr_factor(adversarial.optimizer, factor)
                losses = _step(config, net, next(source_loader), adversarial, optimizer, scaler,
                               ranks)
                progress.iteration = iteration = it + 1
                figures: dict[str, Any] = {}
                if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                    logged = ranks.mean_of({name: float(v) for name, v in losses.items()})
                    check_finite(logged, iteration, "warmup", "warmup")
                    metrics.append({"iteration": iteration, **logged, "lr": lr})
                    figures = {name.removeprefix("loss/"): v for name, v in logged.items()}
                    figures["lr"] = lr
                if cfg.eval_every and (iteration % cfg.eval_every == 0
                                       or iteration == cfg.iterations):
                    if ranks.is_main:  # the others wait at the barrier
                        figures["miou"] = _evaluate(config, index, model, progress, metrics,
                                                    out, device)
                    ranks.barrier()
                task.advance(1, **figures)
                if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
                    state.save()
    finally:
        source_loader.close()
        if adversarial is not None:
            adversarial.target_loader.close()
        metrics.close()

    if not ranks.is_main:
        return None
    write_model_file(out / MODEL_FILE, student=model, teacher=None, model_config=config.model,
                     class_names=index.classes.names, iteration=progress.iteration)
    elapsed = time.monotonic() - started
    return {
        "iteration": progress.iteration,
        "backbone": config.model.backbone,
        "num_classes": index.num_classes,
        "adversarial": cfg.adversarial.enabled,
        "train_domain": cfg.train_domain,
        **ranks.describe(device, cfg.runtime.precision, cfg.runtime.sync_batchnorm,
                         batch=cfg.batch_size),
        "init": {"weights": config.model.init, "loaded": loaded.summary()} if loaded else None,
        "final_loss": logged or None,
        "iterations_per_second": (progress.iteration - start) / elapsed if elapsed else None,
        **progress.summary(f"target-val mIoU-{index.classes.primary_protocol[0]} (model "
                           "selection on the evaluation split)"),
    }


def _step(config: Config, net: nn.Module, batch: dict[str, torch.Tensor],
          adversarial: _Adversarial | None, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, ranks: Ranks) -> dict[str, torch.Tensor]:
    """One warmup step: source cross-entropy (plus the generator term), then the
    discriminator's own step. Returns the detached loss terms."""
    cfg = config.warmup
    device, precision = ranks.compute_device, cfg.runtime.precision
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        source_logits = net(images)  # (B, C, h, w)
    source_ce = cross_entropy(source_logits, labels)
    losses = {"loss/source_ce": source_ce.detach()}
    total = source_ce
    if adversarial is not None:
        # The domains are forwarded separately, each with its own batch statistics.
        target = next(adversarial.target_loader)["image"].to(device, non_blocking=True)
        with autocast(device, precision):
            target_logits = net(target)
        target_probabilities = F.softmax(target_logits.float(), dim=1)
        with autocast(device, precision):
            adv_loss = adversarial_loss(adversarial.discriminator(target_probabilities))
        total = total + cfg.adversarial.weight * adv_loss
        losses["loss/adv"] = adv_loss.detach()
    # Step the segmentation network first ...
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    if adversarial is not None:
        # ... then zero D's gradients (L_adv left some), backward L_D, step D.
        adversarial.optimizer.zero_grad(set_to_none=True)
        source_probabilities = F.softmax(source_logits.detach().float(), dim=1)
        with autocast(device, precision):
            d_loss = discriminator_loss(adversarial.discriminator(source_probabilities),
                                        adversarial.discriminator(target_probabilities.detach()))
        adversarial.scaler.scale(d_loss).backward()
        ranks.average_gradients(adversarial.discriminator)
        adversarial.scaler.step(adversarial.optimizer)
        adversarial.scaler.update()
        losses["loss/discriminator"] = d_loss.detach()
    return losses


def _adversarial(config: Config, index: DatasetIndex, ranks: Ranks, fp16: bool) -> _Adversarial:
    cfg = config.warmup.adversarial
    discriminator = OutputDiscriminator(index.num_classes).to(ranks.compute_device).train()
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr,
                                 betas=DISCRIMINATOR_BETAS)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    crop_h, crop_w = config.input.crop_size
    if min(output_size(crop_h), output_size(crop_w)) < 1:
        raise DudaError(f"input.crop_size {[crop_h, crop_w]} is too small for the "
                        "discriminator of the adversarial warmup (five stride-2 convs)",
                        "use crops of at least 32×32, or disable warmup.adversarial")
    return _Adversarial(discriminator, optimizer, torch.amp.GradScaler("cuda", enabled=fp16),
                        _loader(config, index, "target", config.seed + 1, ranks,
                                labelled=False))


def _loader(config: Config, index: DatasetIndex, domain: Literal["source", "target"], seed: int,
            ranks: Ranks, labelled: bool) -> InfiniteLoader:
    """Endless augmented crops of `domain`-train, with labels if `labelled`; source crops by
    rare classes when input.rare_class_sampling is on (docs/method.md#rare-class-sampling)."""
    size = config.input.source_size if domain == "source" else config.input.target_size
    rare_classes = (rare_class_sampler(config.input.rare_class_sampling, index, domain)
                    if domain == "source" and labelled else None)
    dataset = CropDataset(index.samples(domain, "train"), size, config.input.crop_size,
                          config.input.scale_range, config.input.flip_probability,
                          config.model.normalization, seed=seed, with_labels=labelled,
                          rare_classes=rare_classes)
    loaders = 2 if config.warmup.adversarial.enabled else 1  # source, and target crops
    batch = per_process_batch(config.warmup.batch_size, ranks.world_size, 1, "warmup.batch_size")
    return InfiniteLoader(dataset, batch, seed=seed,
                          num_workers=worker_count(config.warmup.runtime.num_workers, loaders),
                          rank=ranks.rank,
                          world_size=ranks.world_size,
                          pin_memory=ranks.compute_device.type == "cuda")


def _evaluate(config: Config, index: DatasetIndex, model: nn.Module, progress: Progress,
              metrics: MetricsLog, out: Path, device: torch.device) -> float:
    """Target-val mIoU now; a new best writes best.pt."""
    miou = target_val_miou(model, config, index, device,
                           num_workers=evaluation_workers(config.warmup.runtime.num_workers,
                                                          device))
    model.train()
    if progress.record_evaluation(miou):
        write_model_file(out / BEST_FILE, student=model, teacher=None, model_config=config.model,
                         class_names=index.classes.names, iteration=progress.iteration)
    metrics.append({"iteration": progress.iteration, "val/miou": miou})
    return miou
