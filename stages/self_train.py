"""The `self-train` stage: DUDA mean-teacher self-training with online and offline pseudo labels.

One readable loop around `self_train_step` (docs/method.md, one self-training step): source
cross-entropy, symmetric cross-entropy on the stored offline labels, consistency with the mean
teacher's full-image view mapped into the student's crop, online pseudo labels at the α schedule
with the IAST regularisers; then the teacher update and, from `offline_start`, the in-loop
offline update of this run's own pseudo-label store (`stages.method.offline.offline_update`).

The run directory is a checkpoint artifact (`model.pt`: student and mean teacher) and holds a
second artifact, `pseudo/`: the offline store as this run left it. The input store is never
modified: the run starts from a hard-linked copy of it (`copy_store`).

Resume and the offline store: the updates made after a checkpoint must not survive into a run
resumed from it, so every checkpoint snapshots the working store (`stages.store.working_copy`).

Under `torchrun` each process takes its share of every epoch's crops (the batch sizes are per
process) and DistributedDataParallel averages the student's gradients, with synchronised batch
norm when `self_train.runtime.sync_batchnorm` (stages.runtime.distributed). The mean teacher stays
identical on every rank: its parameters follow the identical student, and its batch-norm
buffers, which each rank's train-mode teacher passes move, are averaged over the ranks after
every step. Online and offline thresholds are computed per process over its own batch, as in
the reference's two-GPU runs. The images of one step are distinct across ranks, so each rank
writes its own store chunks; the all-reduce of the change counts that follows the writes keeps a
rank from reading an image another rank is still writing. Rank 0 takes the snapshots, writes
checkpoints, metrics and manifests and runs the periodic evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts.checkpoint import (
    BEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    check_compatible,
    load_checkpoint_manifest,
    load_model,
    write_model_file,
)
from stages.artifacts.manifest import CHECKPOINT, PSEUDO_LABELS, StageResult
from stages.artifacts.writer import ArtifactWriter
from stages.config import (
    Config,
    EmaTeacherConfig,
    StudentTeacherConfig,
    hashed_config,
    stage_config,
    stage_hash,
)
from stages.data.crops import CropDataset, InfiniteLoader, resize_label
from stages.data.index import DatasetIndex, load_dataset_index
from stages.data.rare_classes import rare_class_sampler
from stages.data.transforms import CropParams, crop_label
from stages.engine.inference import recalibrate_on_target, target_val_miou
from stages.engine.metrics import LabelQuality, label_statistics, quality
from stages.engine.training import (
    LogWindow,
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
from stages.method.offline import OfflineChanges, offline_update
from stages.method.step import StepInputs, StepOutputs, label_agreement, self_train_step
from stages.nn.model import build_model
from stages.nn.teacher import MeanTeacher, StudentAsTeacher, batchnorm_statistics
from stages.runtime.devices import evaluation_workers, worker_count
from stages.runtime.distributed import Ranks, process_group
from stages.runtime.progress import Reporter
from stages.runtime.schedules import alpha_schedule, beta_schedule
from stages.runtime.seeding import seed_everything
from stages.store.pseudo_store import (
    STORE_METADATA,
    PseudoLabelStore,
    open_store,
)
from stages.store.working_copy import SNAPSHOTS_DIR, STORE_DIR, WorkingStore

Teacher = MeanTeacher | StudentAsTeacher


def run(config: Config, data: str | Path, checkpoint: str | Path, pseudo: str | Path,
        out: str | Path, *, resume: bool = False, force: bool = False, device: str = "auto",
        reporter: Reporter | None = None, round: int = 1) -> StageResult:
    """Self-train from `checkpoint` on the offline labels `pseudo`; write the run at `out`.

    The initial student (and teacher) is the checkpoint's mean teacher when it has one, else
    its student (a warmup checkpoint). `out/pseudo` receives the offline-updated store.
    """
    with process_group(device) as ranks:
        reporter = ranks.reporter(reporter)
        index = load_dataset_index(data)
        checkpoint = Path(checkpoint)
        checkpoint_manifest = load_checkpoint_manifest(checkpoint)
        source_store = open_store(pseudo, index)
        inputs = {"data": index.ref, "checkpoint": checkpoint_manifest.ref(checkpoint),
                  "pseudo": source_store.manifest().ref(pseudo)}
        section = stage_config(config, "self_train")
        device_name = str(ranks.compute_device)
        with ArtifactWriter(out, kind=CHECKPOINT, stage="self_train", config=section,
                            config_hash=stage_hash(config, "self_train"), inputs=inputs,
                            force=force,
                            resume=resume, resumable=True, round=round, device=device_name,
                            ranks=ranks) as writer:
            if writer.up_to_date:
                return writer.result()
            writer.require_run_space(config.model, index.num_classes, source_store.path)
            # A damaged input store is refused before any training (and before it is copied).
            ranks.on_main(lambda: source_store.validate(reporter))
            identity = {"config": hashed_config(config, "self_train"),
                        "inputs": {k: v.id for k, v in inputs.items()}}
            trained = _train(config, index, checkpoint, source_store, writer.work, ranks=ranks,
                             resuming=writer.resuming, identity=identity, reporter=reporter)
            summary: dict[str, Any] = {}
            if ranks.is_main:
                summary, store_summary = trained
                # The store artifact first, then the run's own manifest (written last).
                with ArtifactWriter(writer.work / STORE_DIR, kind=PSEUDO_LABELS,
                                    stage="self_train", config=section,
                                    config_hash=stage_hash(config, "self_train"),
                                    inputs={**inputs, "parent": inputs["pseudo"]},
                                    resumable=True, resume=True, round=round,
                                    device=device_name, lock=False) as store_writer:
                    store_writer.finish(store_summary, content=STORE_METADATA)
            writer.finish(summary, content=[MODEL_FILE])
            if ranks.is_main:
                # Scratch space for resuming, not part of the artifact: removed once the run
                # is finished (a crash before this line leaves a resumable run, after it a
                # finished one).
                shutil.rmtree(writer.path / SNAPSHOTS_DIR, ignore_errors=True)
        return writer.result()


# ---------------------------------------------------------------------------- the loop


def _train(config: Config, index: DatasetIndex, checkpoint: Path,
           source_store: PseudoLabelStore, out: Path, *, ranks: Ranks, resuming: bool,
           identity: dict[str, Any], reporter: Reporter,
           ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The training loop: (summary, store summary) on rank 0, None on the others."""
    cfg = config.self_train
    device = ranks.compute_device
    batches = step_batches(config, ranks.world_size)
    batch_line = (f"{cfg.source_batch_size} source + {cfg.target_batch_size} target crops per "
                  f"step: {batches['source_per_process']} + {batches['target_per_process']} per "
                  f"process in {cfg.gradient_accumulation} micro-batch(es)")
    if ranks.world_size > 1:
        ranks.announce(reporter, batch_line)
    else:
        reporter.info(batch_line)
    student, teacher, optimizer, scaler = _models(config, index, checkpoint, device)
    # The mean teacher's own BN statistics, kept equal on every rank (the student-as-teacher
    # ablation has none of its own).
    teacher_norms = batchnorm_statistics(teacher) if isinstance(teacher, MeanTeacher) else []
    # Each process loads its share of a step; the step splits it into micro-batches.
    source_loader = _loader(config, index, "source",
                            batches["source_per_process"] * cfg.gradient_accumulation,
                            config.seed, ranks)
    target_loader = _loader(config, index, "target",
                            batches["target_per_process"] * cfg.gradient_accumulation,
                            config.seed + 1, ranks)
    ranks.seed_apart(config.seed)  # models built alike; from here each rank its own dropout

    progress, changes = Progress(), OfflineChanges(index.num_classes)
    metrics = MetricsLog(out / METRICS_FILE, progress, writer=ranks.is_main,
                         tensorboard=config.logging.tensorboard, class_names=index.classes.names)
    working = WorkingStore(out, progress, ranks)
    state = TrainState(out / TRAIN_STATE_FILE, "self_train", identity, ranks, {
        "student": student, "teacher": teacher, "optimizer": optimizer, "scaler": scaler,
        "source_loader": source_loader, "target_loader": target_loader, "progress": progress,
        "offline_changes": changes, "store": working, "metrics": metrics,
        "rng": RandomState(ranks)})
    has_state = resuming and state.path.is_file()  # read before rank 0 writes one
    if has_state:
        state.load(out)
        reporter.info(f"resuming {out} at iteration {progress.iteration}")
    else:
        metrics.start()
        working.start(source_store)
    ranks.barrier()  # rank 0 has put the working store in place
    store = working.open(cfg.runtime.prefetch)
    net = ranks.data_parallel(student, cfg.runtime.sync_batchnorm)  # what the step calls
    labels_seen = LabelQuality.of(store, index) if config.logging.label_quality else None

    def save_state() -> None:
        working.flush()
        ranks.barrier()  # every rank's store writes are done
        working.snapshot()
        state.save()
        working.prune()
        ranks.barrier()  # no rank writes the store again before the snapshot is taken

    if not has_state:
        save_state()  # iteration 0: a resume before the first checkpoint starts cleanly

    start, started, window = progress.iteration, time.monotonic(), LogWindow()
    try:
        with reporter.task("self-train", total=cfg.iterations, completed=start,
                           log_every=cfg.log_every) as task:
            for it in range(start, cfg.iterations):
                lr = apply_lr_factor(optimizer, learning_rate_factor(it, cfg.iterations,
                                                                     cfg.optimizer))
                alpha = alpha_schedule(it, cfg.iterations, cfg.alpha.start, cfg.alpha.end,
                                       cfg.alpha.offset, cfg.alpha.power)
                beta = beta_schedule(it, cfg.iterations, cfg.beta.start, cfg.beta.end,
                                     cfg.beta.offset, cfg.offline_start, cfg.beta.power)
                updating = cfg.offline_update and it >= cfg.offline_start
                batch, indices = _batch(config, next(source_loader), next(target_loader),
                                        working, device)
                working.prefetch(target_loader.upcoming())
                outputs = self_train_step(
                    net, teacher, batch, weights=cfg.loss, alpha=alpha, optimizer=optimizer,
                    scaler=scaler, precision=cfg.runtime.precision, offline_update=updating,
                    consistency_teacher_mode=cfg.consistency_teacher_mode,
                    reproduce_teacher_bn_quirk=cfg.reproduce_teacher_bn_quirk,
                    micro_batches=cfg.gradient_accumulation)
                teacher.update(student)
                ranks.average(teacher_norms)
                if updating:
                    counts = offline_update(working.writes, indices,
                                            outputs.teacher_probabilities, beta,
                                            cfg.offline_rule).changes
                    # Summed over ranks; the all-reduce also waits for every rank's writes.
                    counts = changes.add(counts, ranks)
                    for key, per_class in counts.items():
                        window.add(f"offline/{key}", float(per_class.sum()))
                window.add_all(outputs.terms)
                _watch_labels(window, labels_seen, config, indices, batch, outputs)

                progress.iteration = iteration = it + 1
                figures: dict[str, Any] = {}
                if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                    record = _log_record(window, outputs.online_thresholds, ranks, iteration)
                    record.update(labels_seen.record(ranks) if labels_seen else {})
                    record.update(lr=lr, alpha=alpha, beta=beta)
                    metrics.append({"iteration": iteration, **record})
                    figures = {k.removeprefix("loss/"): v for k, v in record.items()
                               if k.startswith("loss/") or k in ("alpha", "beta", "lr")}
                if cfg.eval_every and iteration % cfg.eval_every == 0:
                    working.flush()
                    ranks.barrier()  # the store is complete for the quality figures
                    if ranks.is_main:  # the others wait for its recalibrated teacher
                        figures["miou"] = _evaluate(config, index, student, teacher, store,
                                                    progress, metrics, out, reporter, device)
                        student.train()
                    ranks.broadcast_tensors(teacher_norms)
                task.advance(1, **figures)
                if iteration % cfg.checkpoint_every == 0 and iteration != cfg.iterations:
                    save_state()
        working.flush()
    finally:
        source_loader.close()
        target_loader.close()
        working.close()
        metrics.close()

    ranks.barrier()  # every rank's store writes are done
    if not ranks.is_main:
        return None
    return _finish(config, index, student, teacher, store, progress, changes, out,
                   ranks, (progress.iteration - start) / max(time.monotonic() - started, 1e-9),
                   reporter)


def step_batches(config: Config, world_size: int) -> dict[str, int]:
    """The crops of one step, in all and per process and micro-batch
    (docs/method.md#the-batch): the step's batch is the config's whatever the launch."""
    cfg = config.self_train
    micro = cfg.gradient_accumulation
    return {
        "source_per_step": cfg.source_batch_size,
        "target_per_step": cfg.target_batch_size,
        "processes": world_size,
        "micro_batches": micro,
        "source_per_process": per_process_batch(cfg.source_batch_size, world_size, micro,
                                                "self_train.source_batch_size"),
        "target_per_process": per_process_batch(cfg.target_batch_size, world_size, micro,
                                                "self_train.target_batch_size"),
    }


def _batch(config: Config, source: dict[str, Any], target: dict[str, Any],
           working: WorkingStore, device: torch.device) -> tuple[StepInputs, list[int]]:
    """One step's tensors on the device (the offline labels read from the working store and
    cropped like the student's view), and the target images' store indices."""
    indices = target["index"].tolist()
    return StepInputs(
        source_image=source["image"].to(device, non_blocking=True),
        source_label=source["label"].to(device, non_blocking=True),
        target_image=target["image"].to(device, non_blocking=True),
        target_params=target["params"],
        target_full=target["full_image"].to(device, non_blocking=True),
        offline_label=_offline_crops(working.labels(indices), target["params"],
                                     config.input.target_size).to(device),
    ), indices


def _watch_labels(window: LogWindow, labels_seen: LabelQuality | None, config: Config,
                  indices: list[int], batch: StepInputs, outputs: StepOutputs) -> None:
    """The step's label figures for the log: online coverage and agreement with the offline
    labels and, with `labels_seen`, both kinds of label crops counted against the ground truth,
    cropped alike. Nothing here reaches the step."""
    if outputs.online_label is not None:
        online, offline, agreement = label_agreement(outputs.online_label.cpu(),
                                                     batch.offline_label.cpu())
        window.add_all({"online/coverage": online, "online/offline_agreement": agreement,
                        "offline/crop_coverage": offline})
    if labels_seen is None:
        return
    truth = labels_seen.truth(indices)
    if truth is None:
        return
    truth_crops = _offline_crops(truth, batch.target_params, config.input.target_size)
    labels_seen.add("offline", batch.offline_label, truth_crops)
    if outputs.online_label is not None:
        labels_seen.add("online", outputs.online_label, truth_crops)


def _log_record(window: LogWindow, thresholds: torch.Tensor | None, ranks: Ranks,
                iteration: int) -> dict[str, Any]:
    """The means of the log window over the steps and ranks, checked to be finite."""
    record: dict[str, Any] = window.means()
    if thresholds is not None:
        record["online/thresholds"] = thresholds.tolist()
    record = ranks.mean_of(record)
    check_finite(record, iteration, "self-training", "self_train")
    if "online/thresholds" in record:
        record["online/thresholds"] = [round(v, 4) for v in record["online/thresholds"]]
    window.clear()
    return record


def _finish(config: Config, index: DatasetIndex, student: torch.nn.Module, teacher: Teacher,
            store: PseudoLabelStore, progress: Progress, changes: OfflineChanges, out: Path,
            ranks: Ranks, rate: float, reporter: Reporter,
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0 after the loop: the teacher recalibrated and saved, the store's statistics, and
    the run's and the store's summaries."""
    cfg = config.self_train
    mean_teacher = teacher if isinstance(teacher, MeanTeacher) else None
    if mean_teacher is not None:  # its BN statistics are recalibrated before saving
        _recalibrate(config, index, mean_teacher.module, ranks.compute_device, reporter)
    write_model_file(out / MODEL_FILE, student=student, teacher=mean_teacher,
                     model_config=config.model, class_names=index.classes.names,
                     iteration=progress.iteration)
    store_quality = quality(store, index)
    store.set_statistics({**label_statistics(store), "offline_changes": changes.per_class()})
    summary: dict[str, Any] = {
        "iteration": progress.iteration,
        "backbone": config.model.backbone,
        "num_classes": index.num_classes,
        "teacher": cfg.teacher.name,
        **ranks.describe(ranks.compute_device, cfg.runtime.precision,
                         cfg.runtime.sync_batchnorm,
                         batch=cfg.source_batch_size + cfg.target_batch_size),
        "iterations_per_second": rate,
        "batch": step_batches(config, ranks.world_size),
        "offline_changes": changes.totals(),
        **progress.summary(f"target-val mIoU-{index.classes.primary_protocol[0]} of the mean "
                           "teacher (model selection on the evaluation split)"),
    }
    store_summary = {**label_statistics(store), "offline_changes": changes.per_class(),
                     "diagnostics": store_quality}
    return summary, store_summary


# ---------------------------------------------------------------------------- building blocks


def _models(config: Config, index: DatasetIndex, checkpoint: Path, device: torch.device,
            ) -> tuple[torch.nn.Module, Teacher, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The student (from the checkpoint), its mean teacher, the optimizer and the AMP scaler,
    built in a fixed order from the seed."""
    cfg = config.self_train
    seed_everything(config.seed)
    student = _initial_student(config, index, checkpoint).to(device).train()
    # The teacher is copied before any batch-norm synchronisation: plain BN.
    teacher = _teacher(config, student)  # a copy of the student: already on the device
    optimizer = build_optimizer(optimizer_groups(student, cfg.optimizer), cfg.optimizer)
    fp16 = device.type == "cuda" and cfg.runtime.precision == "fp16"
    return student, teacher, optimizer, torch.amp.GradScaler("cuda", enabled=fp16)


def _initial_student(config: Config, index: DatasetIndex, checkpoint: Path) -> torch.nn.Module:
    """A model of config.model loaded with the checkpoint's teacher (or student) weights."""
    loaded = load_model(checkpoint, "teacher")
    check_compatible(loaded, index.classes.names, config.model,
                     what=f"dataset index {index.path}")
    model = build_model(config.model, index.num_classes)
    model.load_state_dict(loaded.model.state_dict())
    return model


def _teacher(config: Config, student: torch.nn.Module) -> Teacher:
    teacher = config.self_train.teacher
    if isinstance(teacher, EmaTeacherConfig):
        return MeanTeacher(student, "ema", teacher.decay)
    if isinstance(teacher, StudentTeacherConfig):
        return StudentAsTeacher(student)
    return MeanTeacher(student, "mean")


def _loader(config: Config, index: DatasetIndex, domain: str, batch_size: int, seed: int,
            ranks: Ranks) -> InfiniteLoader:
    """Source crops with labels, by rare classes when input.rare_class_sampling is on
    (docs/method.md#rare-class-sampling); target weak crops with the full image and no label
    (the offline labels come from the store, read in this process at the step that uses them)."""
    source = domain == "source"
    samples = index.samples(domain, "train")  # type: ignore[arg-type]
    if not source:  # target-train ground truth, where present, is never read for training
        samples = [dataclasses.replace(sample, label=None) for sample in samples]
    dataset = CropDataset(samples, config.input.source_size if source
                          else config.input.target_size, config.input.crop_size,
                          config.input.scale_range, config.input.flip_probability,
                          config.model.normalization, seed=seed, with_full_image=not source,
                          with_labels=source,
                          rare_classes=rare_class_sampler(config.input.rare_class_sampling,
                                                          index, "source") if source else None)
    return InfiniteLoader(dataset, batch_size, seed=seed,
                          num_workers=worker_count(config.self_train.runtime.num_workers, 2),
                          rank=ranks.rank,
                          world_size=ranks.world_size,
                          pin_memory=ranks.compute_device.type == "cuda")


def _offline_crops(labels: list[np.ndarray], params: torch.Tensor,
                   base_size: list[int]) -> torch.Tensor:
    """Stored offline labels brought to the base size and cropped with the student's recorded
    parameters: (B, h, w) int64."""
    crops = []
    for label, row in zip(labels, params, strict=True):
        if list(label.shape) != list(base_size):
            label = resize_label(label, base_size)
        crops.append(crop_label(torch.from_numpy(label.astype(np.int64)),
                                CropParams.from_tensor(row)))
    return torch.stack(crops)


def _recalibrate(config: Config, index: DatasetIndex, model: torch.nn.Module,
                 device: torch.device, reporter: Reporter) -> None:
    """Recompute a model's BN statistics on weak target-train crops: a fixed, seeded sequence,
    so a resumed run, and `duda evaluate` with the same batches, recalibrate identically. The
    crops are decoded by loader workers ahead of the model, as in training."""
    cfg = config.self_train
    recalibrate_on_target(model, config.model.normalization, config, index, cfg.recalibration,
                          device, reporter, evaluation_workers(cfg.runtime.num_workers, device))


def recalibrated_val_miou(config: Config, index: DatasetIndex, model: torch.nn.Module,
                          device: torch.device, reporter: Reporter) -> float:
    """The periodic evaluation of a teacher: its BN recalibrated, then target-val mIoU."""
    _recalibrate(config, index, model, device, reporter)
    return target_val_miou(model, config, index, device,
                           num_workers=evaluation_workers(config.self_train.runtime.num_workers,
                                                          device))


def _evaluate(config: Config, index: DatasetIndex, student: torch.nn.Module,
              teacher: Teacher, store: PseudoLabelStore, progress: Progress,
              metrics: MetricsLog, out: Path, reporter: Reporter, device: torch.device,
              ) -> float:
    """Recalibrate the teacher's BN, evaluate it on target-val, keep the best. The mean teacher
    keeps its recalibrated statistics (as in the reference); the student-as-teacher ablation is
    evaluated as a copy, so evaluating does not change its training."""
    model = teacher.module if isinstance(teacher, MeanTeacher) else copy.deepcopy(teacher.module)
    miou = recalibrated_val_miou(config, index, model, device, reporter)
    teacher.train()
    if progress.record_evaluation(miou):
        write_model_file(out / BEST_FILE, student=student,
                         teacher=teacher if isinstance(teacher, MeanTeacher) else None,
                         model_config=config.model, class_names=index.classes.names,
                         iteration=progress.iteration)
    record: dict[str, Any] = {"iteration": progress.iteration, "val/miou": miou}
    store_quality = quality(store, index)
    if store_quality is not None:
        record["offline_store/accuracy"] = store_quality["accuracy"]
        record["offline_store/coverage"] = store_quality["coverage"]
    metrics.append(record)
    reporter.info(f"iteration {progress.iteration}: teacher target-val mIoU {miou:.4f}")
    return miou
