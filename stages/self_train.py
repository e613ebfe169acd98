"""The `self-train` stage: DUDA mean-teacher self-training with online and offline pseudo labels.

One readable loop around `self_train_step` (ALGORITHM.md E.2): source cross-entropy, symmetric
cross-entropy on the stored offline labels, consistency with the mean teacher's full-image view
mapped into the student's crop, online pseudo labels at the α schedule with the IAST
regularisers; then the teacher update and, from `offline_start`, the in-loop offline update
(E.6) of this run's own pseudo-label store.

The run directory is a checkpoint artifact (`model.pt`: student and mean teacher) and holds a
second artifact, `pseudo/`: the offline store as this run left it. The input store is never
modified: the run starts from a hard-linked copy of it (`copy_store`).

Resume and the offline store. The in-loop updates rewrite store images between checkpoints, so
a resumed run must not see the updates made after the checkpoint it resumes from. At every
checkpoint the working store is snapshotted into `snapshots/pseudo-<iteration>` by hard links
(cheap: zarr replaces chunk files by rename, so a later write never touches a snapshot's
file), then `train_state.pt` is written naming that snapshot, then older snapshots are removed.
Resuming replaces the working store with the named snapshot. A crash at any point leaves either
the previous state or the new one, never a mix.

Under `torchrun` each process takes its share of every epoch's crops (the batch sizes are per
process) and DistributedDataParallel averages the student's gradients, with synchronised batch
norm when `self_train.sync_batchnorm` (stages.distributed). The mean teacher stays identical on
every rank: its parameters follow the identical student, and its batch-norm buffers, which each
rank's train-mode teacher passes move, are averaged over the ranks after every step. Online and
offline thresholds are computed per process over its own batch, as in the reference's two-GPU
runs. The images of one step are distinct across ranks, so each rank writes its own store
chunks; the all-reduce of the change counts that follows the writes keeps a rank from reading
an image another rank is still writing. Rank 0 takes the snapshots, writes checkpoints,
metrics and manifests and runs the periodic evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.artifacts import CHECKPOINT, PSEUDO_LABELS, ArtifactWriter, StageResult
from stages.checkpoint import (
    BEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    load_checkpoint_manifest,
    read_model_file,
    write_model_file,
)
from stages.config import Config, config_hash, stage_config
from stages.data.crops import CropDataset, InfiniteLoader, resize_label
from stages.data.index import DatasetIndex, load_dataset_index
from stages.data.transforms import CropParams, crop_label
from stages.devices import resolve_device
from stages.distributed import Ranks, Silent
from stages.errors import DudaError
from stages.evaluate import target_val_miou
from stages.nn.model import build_model, parameter_groups
from stages.nn.pseudo_labels import confidence_and_prediction, merge_offline, offline_thresholds
from stages.nn.teacher import MeanTeacher, batchnorm_statistics, recalibrate_batchnorm
from stages.pseudo_store import (
    STORE_METADATA,
    PseudoLabelStore,
    copy_store,
    link_or_copy,
    open_store,
    open_unfinished,
    quality,
)
from stages.reporting import Reporter
from stages.schedules import alpha_schedule, beta_schedule
from stages.self_train_step import StepInputs, label_agreement, self_train_step
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

STORE_DIR = "pseudo"
SNAPSHOTS_DIR = "snapshots"


def run(config: Config, data: str | Path, checkpoint: str | Path, pseudo: str | Path,
        out: str | Path, *, resume: bool = False, force: bool = False, device: str = "auto",
        reporter: Reporter | None = None, round: int = 1) -> StageResult:
    """Self-train from `checkpoint` on the offline labels `pseudo`; write the run at `out`.

    The initial student (and teacher) is the checkpoint's mean teacher when it has one, else
    its student (a warmup checkpoint). `out/pseudo` receives the offline-updated store.
    """
    torch_device = resolve_device(device)
    ranks = Ranks(torch_device)
    reporter = (reporter or Reporter()) if ranks.is_main else Silent()
    out = Path(out)
    index = load_dataset_index(data)
    checkpoint = Path(checkpoint)
    checkpoint_manifest = load_checkpoint_manifest(checkpoint)
    source_store = open_store(pseudo, index)
    inputs = {"data": index.ref, "checkpoint": checkpoint_manifest.ref(checkpoint),
              "pseudo": source_store.manifest().ref(pseudo)}
    section = stage_config(config, "self_train")
    with ArtifactWriter(out, kind=CHECKPOINT, stage="self_train", config=section,
                        config_hash=config_hash(section), inputs=inputs, force=force,
                        resume=resume, resumable=True, round=round,
                        device=str(torch_device), ranks=ranks) as writer:
        if writer.up_to_date:
            return writer.result()
        # A damaged input store is refused before any training (and before it is copied).
        ranks.on_main(lambda: source_store.validate(reporter))
        identity = {"config": section, "inputs": {k: v.id for k, v in inputs.items()}}
        trained = _train(config, index, checkpoint, source_store, writer.work,
                         device=torch_device, ranks=ranks, resuming=writer.resuming,
                         identity=identity, reporter=reporter)
        summary: dict[str, Any] = {}
        if ranks.is_main:
            summary, store_summary = trained
            # The store artifact first, then the run's own manifest (written last).
            with ArtifactWriter(writer.work / STORE_DIR, kind=PSEUDO_LABELS, stage="self_train",
                                config=section, config_hash=config_hash(section),
                                inputs={**inputs, "parent": inputs["pseudo"]}, resumable=True,
                                resume=True, round=round, device=str(torch_device),
                                lock=False) as store_writer:
                store_writer.finish(store_summary, content=[STORE_METADATA])
        writer.finish(summary, content=[MODEL_FILE])
        if ranks.is_main:
            # Scratch space for resuming, not part of the artifact: removed once the run is
            # finished (a crash before this line leaves a resumable run, after it a finished
            # one).
            shutil.rmtree(writer.path / SNAPSHOTS_DIR, ignore_errors=True)
    return writer.result()


# ---------------------------------------------------------------------------- the loop


def _train(config: Config, index: DatasetIndex, checkpoint: Path,
           source_store: PseudoLabelStore, out: Path, *, device: torch.device, ranks: Ranks,
           resuming: bool, identity: dict[str, Any], reporter: Reporter,
           ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The training loop: (summary, store summary) on rank 0, None on the others."""
    cfg = config.self_train
    num_classes = index.num_classes
    state_path, metrics_path = out / TRAIN_STATE_FILE, out / METRICS_FILE
    store_path, snapshots = out / STORE_DIR, out / SNAPSHOTS_DIR
    seed_everything(config.seed)

    student = _initial_student(config, index, checkpoint).to(device).train()
    # The teacher is copied before any batch-norm synchronisation: plain BN (ALGORITHM.md E.1).
    teacher = MeanTeacher(student, cfg.teacher, cfg.ema_decay).to(device)
    teacher_norms = batchnorm_statistics(teacher)
    ranks.announce(reporter, f"{cfg.source_batch_size} source + {cfg.target_batch_size} "
                   "target crops per process")
    optimizer = build_optimizer(parameter_groups(student, cfg.optimizer.lr,
                                                 cfg.optimizer.backbone_lr_multiplier,
                                                 cfg.optimizer.weight_decay), cfg.optimizer)
    fp16 = device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    source_loader = _loader(config, index, "source", cfg.source_batch_size, config.seed, device,
                            ranks)
    target_loader = _loader(config, index, "target", cfg.target_batch_size, config.seed + 1,
                            device, ranks)
    ranks.seed_apart(config.seed)  # models built alike; from here each rank its own dropout
    has_state = resuming and state_path.is_file()  # read before rank 0 writes one

    progress: dict[str, Any] = {"iteration": 0, "miou_last": None, "miou_best": None,
                                "best_iteration": None, "offline_changes": _zero_changes(
                                    num_classes)}
    if has_state:
        state = load_train_state(state_path)
        check_resume_config(state["identity"], identity, out)
        ranks.check_resume(state, out)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        if fp16 and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        source_loader.load_state_dict(state["source_loader"])
        target_loader.load_state_dict(state["target_loader"])
        progress.update(state["progress"])
        _check_snapshot(snapshots / state["store_snapshot"])
        restore_rng_state(ranks.rng_state_of_rank(state))
        if ranks.is_main:
            _restore_snapshot(snapshots / state["store_snapshot"], store_path)
            truncate_metrics(metrics_path, progress["iteration"])
        reporter.info(f"resuming {out} at iteration {progress['iteration']}")
    elif ranks.is_main:
        metrics_path.unlink(missing_ok=True)
        shutil.rmtree(store_path, ignore_errors=True)
        shutil.rmtree(snapshots, ignore_errors=True)
        copy_store(source_store, store_path)
    ranks.barrier()  # rank 0 has put the working store in place
    store = open_unfinished(store_path)
    net = ranks.data_parallel(student, cfg.sync_batchnorm)  # what the training step calls

    def save_state() -> None:
        ranks.barrier()  # every rank's store writes are done
        rng = ranks.gather(capture_rng_state())
        if ranks.is_main:
            _save_state(rng)
        ranks.barrier()  # no rank writes the store again before the snapshot is taken

    def _save_state(rng: list[dict[str, Any]]) -> None:
        name = _snapshot(store_path, snapshots, progress["iteration"])
        save_train_state(state_path, {
            "identity": identity,
            "world_size": ranks.world_size,
            "progress": dict(progress),
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if fp16 else None,
            "source_loader": source_loader.state_dict(),
            "target_loader": target_loader.state_dict(),
            "store_snapshot": name,
            "rng": rng,
        })
        for old in snapshots.iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    if not has_state:
        save_state()  # iteration 0: a resume before the first checkpoint starts cleanly

    start = progress["iteration"]
    started = time.monotonic()
    window: dict[str, list[float]] = {}
    try:
        with reporter.task("self-train", total=cfg.iterations, completed=start,
                           log_every=cfg.log_every) as task:
            for it in range(start, cfg.iterations):
                lr = apply_lr_factor(optimizer, learning_rate_factor(it, cfg.iterations,
                                                                     cfg.optimizer))
                alpha = alpha_schedule(it, cfg.iterations, cfg.alpha_start, cfg.alpha_end,
                                       cfg.alpha_ramp_start, cfg.alpha_power)
                beta = beta_schedule(it, cfg.iterations, cfg.beta_start, cfg.beta_end,
                                     cfg.beta_offset, cfg.offline_start, cfg.beta_power)
                offline_update = it >= cfg.offline_start
                source = next(source_loader)
                target = next(target_loader)
                indices = target["index"].tolist()
                batch = StepInputs(
                    source_image=source["image"].to(device, non_blocking=True),
                    source_label=source["label"].to(device, non_blocking=True),
                    target_image=target["image"].to(device, non_blocking=True),
                    target_params=target["params"],
                    target_full=target["full_image"].to(device, non_blocking=True),
                    offline_label=_offline_crops(store, indices, target["params"],
                                                 config.input.target_size).to(device),
                )
                outputs = self_train_step(
                    net, teacher, batch, weights=cfg.loss, alpha=alpha, optimizer=optimizer,
                    scaler=scaler, precision=cfg.precision, offline_update=offline_update,
                    consistency_teacher_mode=cfg.consistency_teacher_mode,
                    reproduce_teacher_bn_quirk=cfg.reproduce_teacher_bn_quirk)
                teacher.update(student)  # E.2 step 11
                ranks.average(teacher_norms)
                if offline_update:
                    changes = _offline_update(store, indices, outputs.teacher_probabilities,
                                              beta, cfg.offline_cap,
                                              cfg.agree_requires_confidence)
                    # Summed over ranks; the all-reduce also waits for every rank's writes.
                    changes = dict(zip(changes, ranks.sum(np.array(list(changes.values()),
                                                                   dtype=np.int64)).tolist()))
                    for key, counts in changes.items():
                        progress["offline_changes"][key] = [
                            a + b for a, b in zip(progress["offline_changes"][key], counts)]
                        window.setdefault(f"offline/{key}", []).append(float(sum(counts)))

                for name, value in outputs.terms.items():
                    window.setdefault(name, []).append(value)
                if outputs.online_label is not None:
                    online, offline, agreement = label_agreement(outputs.online_label.cpu(),
                                                                 batch.offline_label.cpu())
                    window.setdefault("online/coverage", []).append(online)
                    window.setdefault("online/offline_agreement", []).append(agreement)
                    window.setdefault("offline/crop_coverage", []).append(offline)

                iteration = it + 1
                progress["iteration"] = iteration
                figures: dict[str, Any] = {}
                if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                    record = {name: _mean(values) for name, values in window.items()}
                    if outputs.online_thresholds is not None:
                        record["online/thresholds"] = outputs.online_thresholds.tolist()
                    record = ranks.mean_of(record)
                    check_finite(record, iteration, "self-training", "self_train")
                    if "online/thresholds" in record:
                        record["online/thresholds"] = [
                            round(v, 4) for v in record["online/thresholds"]]
                    record.update(lr=lr, alpha=alpha, beta=beta)
                    if ranks.is_main:
                        append_metrics(metrics_path, {"iteration": iteration, **record})
                    figures = {k.removeprefix("loss/"): v for k, v in record.items()
                               if k.startswith("loss/") or k in ("alpha", "beta", "lr")}
                    window = {}
                if cfg.eval_every and iteration % cfg.eval_every == 0:
                    ranks.barrier()  # the store is complete for the quality figures
                    if ranks.is_main:  # the others wait for its recalibrated teacher
                        figures.update(_evaluate(config, index, student, teacher, store,
                                                 progress, out, metrics_path, device,
                                                 reporter))
                        student.train()
                    ranks.broadcast_tensors(teacher_norms)
                task.advance(1, **figures)
                if iteration % cfg.checkpoint_every == 0 and iteration != cfg.iterations:
                    save_state()
    finally:
        source_loader.close()
        target_loader.close()

    ranks.barrier()  # every rank's store writes are done
    if not ranks.is_main:
        return None
    # E.9 #6: the teacher's BN statistics are recalibrated before saving.
    _recalibrate(config, index, teacher, device)
    write_model_file(out / MODEL_FILE, student=student, teacher=teacher,
                     model_config=config.model, class_names=index.classes.names,
                     iteration=progress["iteration"])
    store_quality = quality(store, index)
    store.set_statistics({**store.class_statistics(),
                          "offline_changes": progress["offline_changes"]})
    elapsed = time.monotonic() - started
    summary: dict[str, Any] = {
        "iteration": progress["iteration"],
        "backbone": config.model.backbone,
        "num_classes": num_classes,
        "teacher": cfg.teacher,
        **ranks.describe(device, cfg.precision, cfg.sync_batchnorm,
                         batch=cfg.source_batch_size + cfg.target_batch_size),
        "iterations_per_second": (progress["iteration"] - start) / elapsed if elapsed else None,
        "offline_changes": {k: sum(v) for k, v in progress["offline_changes"].items()},
    }
    if progress["miou_last"] is not None:
        summary.update(miou_last=progress["miou_last"], miou_best=progress["miou_best"],
                       best_iteration=progress["best_iteration"],
                       best_protocol=f"target-val mIoU-{index.classes.primary_protocol[0]} of the "
                                     "mean teacher (model selection on the evaluation split)")
    store_summary = {**store.class_statistics(),
                     "offline_changes": progress["offline_changes"],
                     "diagnostics": store_quality}
    return summary, store_summary


def _initial_student(config: Config, index: DatasetIndex, checkpoint: Path) -> torch.nn.Module:
    """A model of config.model loaded with the checkpoint's teacher (or student) weights."""
    data, model_config, class_names = read_model_file(checkpoint / MODEL_FILE)
    if tuple(class_names) != tuple(index.classes.names):
        raise DudaError(f"checkpoint {checkpoint} was trained for {len(class_names)} classes "
                        f"({', '.join(class_names[:3])}, …) but dataset index {index.path} "
                        f"has {index.classes.describe()}",
                        "use a checkpoint trained on this dataset index's class table")
    if (model_config.backbone, model_config.width_multiplier) != (
            config.model.backbone, config.model.width_multiplier):
        raise DudaError(f"checkpoint {checkpoint} holds a {model_config.backbone} "
                        f"(width {model_config.width_multiplier}) model but the config asks "
                        f"for {config.model.backbone} (width {config.model.width_multiplier})",
                        "set model.backbone / model.width_multiplier to the checkpoint's")
    model = build_model(config.model, index.num_classes)
    state = data.get("teacher") or data["student"]
    model.load_state_dict(state)
    return model


def _loader(config: Config, index: DatasetIndex, domain: str, batch_size: int, seed: int,
            device: torch.device, ranks: Ranks) -> InfiniteLoader:
    """Source crops with labels; target weak crops with the full image and no label (the
    offline labels come from the store, read in this process at the step that uses them)."""
    source = domain == "source"
    samples = index.samples(domain, "train")  # type: ignore[arg-type]
    if not source:  # target-train ground truth, where present, is never read for training
        samples = [dataclasses.replace(sample, label=None) for sample in samples]
    dataset = CropDataset(samples, config.input.source_size if source
                          else config.input.target_size, config.input.crop_size,
                          config.input.scale_range, config.input.flip_probability,
                          config.model.normalization, seed=seed, with_full_image=not source,
                          with_labels=source)
    return InfiniteLoader(dataset, batch_size, seed=seed,
                          num_workers=config.self_train.num_workers, rank=ranks.rank,
                          world_size=ranks.world_size, pin_memory=device.type == "cuda")


def _offline_crops(store: PseudoLabelStore, indices: list[int], params: torch.Tensor,
                   base_size: list[int]) -> torch.Tensor:
    """The stored offline labels of `indices`, brought to the base size and cropped with the
    student's recorded parameters: (B, h, w) int64."""
    crops = []
    for i, row in zip(indices, params):
        label = store.read_labels(i)
        if list(label.shape) != list(base_size):
            label = resize_label(label, base_size)
        crops.append(crop_label(torch.from_numpy(label.astype(np.int64)),
                                CropParams.from_tensor(row)))
    return torch.stack(crops)


@torch.no_grad()
def _offline_update(store: PseudoLabelStore, indices: list[int], probabilities: torch.Tensor,
                    beta: float, cap: float, agree_requires_confidence: bool,
                    ) -> dict[str, list[int]]:
    """ALGORITHM.md E.6 on the batch's images: τ^β over the batch's full images jointly, the
    4-case merge with the stored labels, written back to the working store."""
    size = (store.height, store.width)
    if tuple(probabilities.shape[-2:]) != size:
        probabilities = F.interpolate(probabilities, size=size, mode="bilinear",
                                      align_corners=True)
    thresholds = offline_thresholds(probabilities, beta, cap)
    confidence, prediction = confidence_and_prediction(probabilities)
    stored = torch.stack([torch.from_numpy(store.read_labels(i)) for i in indices]).to(
        prediction.device)
    merged, changes = merge_offline(stored, prediction, confidence, thresholds,
                                    agree_requires_confidence)
    merged, confidence = merged.cpu().numpy(), confidence.clamp(0, 1).cpu().numpy()
    for b, i in enumerate(indices):
        store.write(i, merged[b], confidence[b])
    return {key: value.tolist() for key, value in changes.items()}


def _zero_changes(num_classes: int) -> dict[str, list[int]]:
    return {key: [0] * num_classes for key in ("kept", "added", "dropped")}


# ------------------------------------------------------------------ evaluation and resume


def _recalibrate(config: Config, index: DatasetIndex, teacher: MeanTeacher,
                 device: torch.device) -> int:
    """E.7: recompute the teacher's BN statistics on weak target-train crops (a fixed,
    seeded sequence, so a resumed run recalibrates identically)."""
    batches = config.self_train.recalibrate_batches
    dataset = CropDataset(index.samples("target", "train"), config.input.target_size,
                          config.input.crop_size, config.input.scale_range,
                          config.input.flip_probability, config.model.normalization,
                          seed=config.seed + 2, with_labels=False)
    loader = InfiniteLoader(dataset, config.self_train.target_batch_size, seed=config.seed + 2,
                            num_workers=0)
    count = batches or loader.batches_per_epoch
    try:
        return recalibrate_batchnorm(teacher.module,
                                     (next(loader)["image"] for _ in range(count)), device)
    finally:
        loader.close()


def _evaluate(config: Config, index: DatasetIndex, student: torch.nn.Module,
              teacher: MeanTeacher, store: PseudoLabelStore, progress: dict[str, Any],
              out: Path, metrics_path: Path, device: torch.device,
              reporter: Reporter) -> dict[str, float]:
    """E.8: recalibrate the teacher's BN, evaluate it on target-val, keep the best."""
    _recalibrate(config, index, teacher, device)
    miou = target_val_miou(teacher.module, config, index, device,
                           num_workers=config.self_train.num_workers,
                           precision=config.self_train.precision)
    teacher.train()
    iteration = progress["iteration"]
    progress["miou_last"] = miou
    if progress["miou_best"] is None or miou > progress["miou_best"]:
        progress["miou_best"], progress["best_iteration"] = miou, iteration
        write_model_file(out / BEST_FILE, student=student, teacher=teacher,
                         model_config=config.model, class_names=index.classes.names,
                         iteration=iteration)
    record: dict[str, Any] = {"iteration": iteration, "val/miou": miou}
    store_quality = quality(store, index)
    if store_quality is not None:
        record["offline_store/accuracy"] = store_quality["accuracy"]
        record["offline_store/coverage"] = store_quality["coverage"]
    append_metrics(metrics_path, record)
    reporter.info(f"iteration {iteration}: teacher target-val mIoU {miou:.4f}")
    return {"miou": miou}


def _snapshot(store_path: Path, snapshots: Path, iteration: int) -> str:
    """Hard-link the working store into snapshots/pseudo-<iteration>; return its name."""
    name = f"pseudo-{iteration:08d}"
    snapshots.mkdir(exist_ok=True)
    final, partial = snapshots / name, snapshots / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(store_path, partial, copy_function=link_or_copy)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return name


def _check_snapshot(snapshot: Path) -> None:
    if not snapshot.is_dir():
        raise DudaError(f"the run's store snapshot {snapshot} is missing",
                        "the run directory was edited; start over with --force")


def _restore_snapshot(snapshot: Path, store_path: Path) -> None:
    """Replace the working store by the snapshot (hard links)."""
    shutil.rmtree(store_path, ignore_errors=True)
    shutil.copytree(snapshot, store_path, copy_function=link_or_copy)


def _mean(values: list[float | torch.Tensor]) -> float:
    """The mean of a log window's values, NaN ones left out (read from the device here,
    once per log interval, not every step)."""
    finite = [v for v in (float(value) for value in values) if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


