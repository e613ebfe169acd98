"""The `warmup` stage: source-only supervised training, optionally with the output-space
adversarial warmup, producing the checkpoint that seeds pseudo labels and self-training.

One readable loop (ALGORITHM.md B.2, C.1): SGD with Nesterov momentum, linear LR warmup then
poly decay, cross-entropy (ignore 255) on augmented source crops (A.4); with
`warmup.adversarial.enabled`, a least-squares discriminator on the target softmax and the
generator term λ_adv·MSE(D(p_t), 0). Every `checkpoint_every` iterations the full training
state (model, optimizers, discriminator, AMP scalers, loader positions, every RNG) is written
atomically to `train_state.pt`, so `--resume` continues exactly where the run stopped; on the
CPU a resumed run reaches bit-identical weights. Optional periodic evaluation on target-val
keeps `best.pt`; the last weights are `model.pt`.

Under `torchrun` every process trains the same model on its own share of each epoch's source
crops (`warmup.batch_size` per process); DistributedDataParallel averages the gradients, with
synchronised batch norm when `warmup.sync_batchnorm` (stages.distributed), and the
discriminator's gradients are averaged alike. Rank 0 writes the checkpoints, metrics and
manifest and runs the periodic evaluation; a resumed run must use the same number of processes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from stages.artifacts import CHECKPOINT, ArtifactRef, ArtifactWriter, StageResult, file_digest
from stages.checkpoint import (
    BEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    write_model_file,
)
from stages.config import Config, config_hash, stage_config
from stages.data.crops import CropDataset, InfiniteLoader
from stages.data.index import DatasetIndex, load_dataset_index
from stages.devices import autocast, resolve_device
from stages.distributed import Ranks, Silent
from stages.errors import DudaError
from stages.evaluate import target_val_miou
from stages.nn.discriminator import (
    OutputDiscriminator,
    adversarial_loss,
    discriminator_loss,
    output_size,
)
from stages.nn.losses import cross_entropy
from stages.nn.model import build_model, parameter_groups
from stages.reporting import Reporter
from stages.training import (
    append_metrics,
    apply_lr_factor,
    build_optimizer,
    capture_rng_state,
    check_finite,
    check_resume_config,
    learning_rate_factor,
    load_train_state,
    restore_rng_state,
    save_train_state,
    seed_everything,
    truncate_metrics,
)

logger = logging.getLogger("duda")

# ALGORITHM.md C.1: the discriminator's Adam moments (IAST `warmup_at`).
DISCRIMINATOR_BETAS = (0.9, 0.999)


def run(config: Config, data: str | Path, out: str | Path, *, init: str | Path | None = None,
        resume: bool = False, force: bool = False, device: str = "auto",
        reporter: Reporter | None = None) -> StageResult:
    """Train the warmup model on `data` (a dataset index) and write a checkpoint at `out`.

    `init`: initial weights (a torchvision ImageNet ResNet state dict, a checkpoint artifact or
    an external DeepLabV2 checkpoint; see stages.nn.weights). `resume` continues the unfinished
    run in `out`; a finished one with the same config and inputs is a no-op.
    """
    torch_device = resolve_device(device)
    ranks = Ranks(torch_device)
    reporter = (reporter or Reporter()) if ranks.is_main else Silent()
    out = Path(out)
    index = load_dataset_index(data)
    inputs = {"data": index.ref}
    if init is not None:
        inputs["init"] = _init_ref(Path(init))
    section = stage_config(config, "warmup")
    with ArtifactWriter(out, kind=CHECKPOINT, stage="warmup", config=section,
                        config_hash=config_hash(section), inputs=inputs, force=force,
                        resume=resume, resumable=True, device=str(torch_device),
                        ranks=ranks) as writer:
        if writer.up_to_date:
            return writer.result()
        resume_identity = {"config": section, "inputs": {k: v.id for k, v in inputs.items()}}
        summary = _train(config, index, writer.work,
                         init=Path(init) if init is not None else None, device=torch_device,
                         ranks=ranks, resuming=writer.resuming, identity=resume_identity,
                         reporter=reporter)
        writer.finish(summary or {}, content=[MODEL_FILE])
    return writer.result()


def _init_ref(path: Path) -> ArtifactRef:
    """The lineage record of the initial weights: a checkpoint artifact or a weights file."""
    if path.is_dir():
        from stages.checkpoint import load_checkpoint_manifest

        return load_checkpoint_manifest(path).ref(path)
    if not path.is_file():
        raise DudaError(f"initial weights file {path} does not exist",
                        "pass a weights file or a checkpoint artifact with --init")
    return ArtifactRef(kind="weights", id=file_digest(path)[:16], path=str(path.resolve()))


def _load_init(model: nn.Module, path: Path) -> str:
    from stages.nn.weights import load_initial_weights

    return load_initial_weights(model, path)


def _train(config: Config, index: DatasetIndex, out: Path, *, init: Path | None,
           device: torch.device, ranks: Ranks, resuming: bool, identity: dict[str, Any],
           reporter: Reporter) -> dict[str, Any] | None:
    """The training loop; the summary on rank 0, None on the other ranks."""
    cfg = config.warmup
    opt = cfg.optimizer
    adv = cfg.adversarial
    num_classes = index.num_classes
    state_path, metrics_path = out / TRAIN_STATE_FILE, out / METRICS_FILE
    seed_everything(config.seed)

    model = build_model(config.model, num_classes)
    loaded = _load_init(model, init) if init is not None else None
    model.to(device).train()
    ranks.announce(reporter, f"{cfg.batch_size} source crops per process")
    optimizer = build_optimizer(parameter_groups(model, opt.lr, opt.backbone_lr_multiplier,
                                                 opt.weight_decay), opt)
    fp16 = device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    # The oracle (train_domain: target) trains the same model on target-train labels.
    source_loader = _loader(config, index, cfg.train_domain, seed=config.seed, device=device,
                            ranks=ranks, labelled=True)
    discriminator = d_optimizer = target_loader = None
    d_scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    if adv.enabled:
        discriminator = OutputDiscriminator(num_classes).to(device).train()
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=adv.lr,
                                       betas=DISCRIMINATOR_BETAS)
        for group in d_optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        crop_h, crop_w = config.input.crop_size
        if min(output_size(crop_h), output_size(crop_w)) < 1:
            raise DudaError(f"input.crop_size {[crop_h, crop_w]} is too small for the "
                            "discriminator of the adversarial warmup (five stride-2 convs)",
                            "use crops of at least 32×32, or disable warmup.adversarial")
        target_loader = _loader(config, index, "target", seed=config.seed + 1, device=device,
                                ranks=ranks, labelled=False)
    # The models are built alike on every rank; from here each rank draws its own dropout.
    ranks.seed_apart(config.seed)

    progress = {"iteration": 0, "miou_last": None, "miou_best": None, "best_iteration": None}
    if resuming and state_path.is_file():
        state = load_train_state(state_path)
        check_resume_config(state["identity"], identity, out)
        ranks.check_resume(state, out)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        source_loader.load_state_dict(state["source_loader"])
        if fp16 and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if adv.enabled:
            discriminator.load_state_dict(state["discriminator"])
            d_optimizer.load_state_dict(state["discriminator_optimizer"])
            target_loader.load_state_dict(state["target_loader"])
            if fp16 and state.get("discriminator_scaler"):
                d_scaler.load_state_dict(state["discriminator_scaler"])
        progress.update(state["progress"])
        restore_rng_state(ranks.rng_state_of_rank(state))
        if ranks.is_main:
            truncate_metrics(metrics_path, progress["iteration"])
        reporter.info(f"resuming {out} at iteration {progress['iteration']}")
    elif ranks.is_main:
        metrics_path.unlink(missing_ok=True)
    net = ranks.data_parallel(model, cfg.sync_batchnorm)  # what the training step calls

    def save_state() -> None:
        rng = ranks.gather(capture_rng_state())
        if not ranks.is_main:
            return
        state = {
            "identity": identity,
            "world_size": ranks.world_size,
            "progress": dict(progress),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "source_loader": source_loader.state_dict(),
            "scaler": scaler.state_dict() if fp16 else None,
            "rng": rng,
        }
        if adv.enabled:
            state.update(discriminator=discriminator.state_dict(),
                         discriminator_optimizer=d_optimizer.state_dict(),
                         target_loader=target_loader.state_dict(),
                         discriminator_scaler=d_scaler.state_dict() if fp16 else None)
        save_train_state(state_path, state)

    losses: dict[str, torch.Tensor] = {}
    logged: dict[str, float] = {}  # the last logged loss values (means over ranks)
    lr = 0.0
    start = progress["iteration"]
    started = time.monotonic()
    try:
        with reporter.task("warmup", total=cfg.iterations, completed=start,
                           log_every=cfg.log_every) as task:
            for it in range(start, cfg.iterations):
                # ALGORITHM.md B.2: the step taken after `it` previous steps uses factor(it).
                factor = learning_rate_factor(it, cfg.iterations, opt)
                lr = apply_lr_factor(optimizer, factor)
                if d_optimizer is not None:
                    apply_lr_factor(d_optimizer, factor)

                batch = next(source_loader)
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, cfg.precision):
                    source_logits = net(images)  # (B, C, h, w)
                source_ce = cross_entropy(source_logits, labels)
                losses = {"loss/source_ce": source_ce.detach()}
                total = source_ce

                if discriminator is not None:
                    # ALGORITHM.md C.1: the domains are forwarded separately (own BN statistics).
                    target_images = next(target_loader)["image"].to(device, non_blocking=True)
                    with autocast(device, cfg.precision):
                        target_logits = net(target_images)
                    target_probabilities = F.softmax(target_logits.float(), dim=1)
                    with autocast(device, cfg.precision):
                        adv_loss = adversarial_loss(discriminator(target_probabilities))
                    total = total + adv.weight * adv_loss
                    losses["loss/adv"] = adv_loss.detach()

                # ALGORITHM.md C.1: step the segmentation network first ...
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()

                if discriminator is not None:
                    # ... then zero D's gradients (L_adv left some), backward L_D, step D.
                    d_optimizer.zero_grad(set_to_none=True)
                    source_probabilities = F.softmax(source_logits.detach().float(), dim=1)
                    with autocast(device, cfg.precision):
                        d_loss = discriminator_loss(discriminator(source_probabilities),
                                                    discriminator(target_probabilities.detach()))
                    d_scaler.scale(d_loss).backward()
                    ranks.average_gradients(discriminator)
                    d_scaler.step(d_optimizer)
                    d_scaler.update()
                    losses["loss/discriminator"] = d_loss.detach()

                iteration = it + 1
                progress["iteration"] = iteration
                figures: dict[str, Any] = {}
                if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                    values = ranks.mean_of({name: float(value)
                                            for name, value in losses.items()})
                    check_finite(values, iteration, "warmup", "warmup")
                    logged = values
                    if ranks.is_main:
                        append_metrics(metrics_path, {"iteration": iteration, **values,
                                                      "lr": lr})
                    figures = {name.removeprefix("loss/"): value
                               for name, value in values.items()}
                    figures["lr"] = lr
                if cfg.eval_every and (iteration % cfg.eval_every == 0
                                       or iteration == cfg.iterations):
                    if ranks.is_main:  # the others wait at the barrier
                        miou = target_val_miou(model, config, index, device,
                                               num_workers=cfg.num_workers,
                                               precision=cfg.precision)
                        model.train()
                        _record_evaluation(progress, miou, iteration, model, config, index,
                                           out)
                        append_metrics(metrics_path, {"iteration": iteration,
                                                      "val/miou": miou})
                        figures["miou"] = miou
                    ranks.barrier()
                task.advance(1, **figures)
                if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
                    save_state()
    finally:
        source_loader.close()
        if target_loader is not None:
            target_loader.close()

    if not ranks.is_main:
        return None
    write_model_file(out / MODEL_FILE, student=model, teacher=None, model_config=config.model,
                     class_names=index.classes.names, iteration=progress["iteration"])
    elapsed = time.monotonic() - started
    summary: dict[str, Any] = {
        "iteration": progress["iteration"],
        "backbone": config.model.backbone,
        "num_classes": num_classes,
        "adversarial": adv.enabled,
        **ranks.describe(device, cfg.precision, cfg.sync_batchnorm, batch=cfg.batch_size),
        "init": {"path": str(init.resolve()), "loaded": loaded} if init is not None else None,
        "final_loss": logged or None,
        "iterations_per_second": (progress["iteration"] - start) / elapsed if elapsed else None,
    }
    if progress["miou_last"] is not None:
        summary.update(miou_last=progress["miou_last"], miou_best=progress["miou_best"],
                       best_iteration=progress["best_iteration"],
                       best_protocol=f"target-val mIoU-{index.classes.primary_protocol[0]} "
                                     "(model selection on the evaluation split)")
    return summary


def _loader(config: Config, index: DatasetIndex, domain: Literal["source", "target"], seed: int,
            device: torch.device, ranks: Ranks, labelled: bool) -> InfiniteLoader:
    """Endless augmented crops of `domain`-train (ALGORITHM.md A.4), with labels if `labelled`."""
    size = config.input.source_size if domain == "source" else config.input.target_size
    dataset = CropDataset(index.samples(domain, "train"), size, config.input.crop_size,
                          config.input.scale_range, config.input.flip_probability,
                          config.model.normalization, seed=seed,
                          with_labels=labelled)
    return InfiniteLoader(dataset, config.warmup.batch_size, seed=seed,
                          num_workers=config.warmup.num_workers, rank=ranks.rank,
                          world_size=ranks.world_size, pin_memory=device.type == "cuda")


def _record_evaluation(progress: dict[str, Any], miou: float, iteration: int, model: nn.Module,
                       config: Config, index: DatasetIndex, out: Path) -> None:
    """Keep the last and the best target-val mIoU; write best.pt for a new best."""
    progress["miou_last"] = miou
    if progress["miou_best"] is None or miou > progress["miou_best"]:
        progress["miou_best"] = miou
        progress["best_iteration"] = iteration
        write_model_file(out / BEST_FILE, student=model, teacher=None, model_config=config.model,
                         class_names=index.classes.names, iteration=iteration)
