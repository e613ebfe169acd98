"""Training crops and the resumable, shardable loader that serves them.

`CropDataset` owns the training view of one domain (docs/method.md#data-and-augmentation): resize to
the base size (image Lanczos, label nearest), then a random scale, crop and flip with recorded
`CropParams`, then normalisation. Its randomness is a pure function of (seed, epoch, position in the
epoch), so a batch does not depend on the worker that made it, and a resumed run sees the same
crops. With rare-class sampling (stages.data.rare_classes, docs/method.md#rare-class-sampling) the
same generator also draws the item's class and image, and the key's sample index is not used.

`InfiniteLoader` serves batches forever. Epoch e visits the permutation drawn from (seed, e), the
same on every rank; rank r takes every world_size-th position of it (the semantics of
`DistributedSampler` with `set_epoch` called, docs/method.md#epochs-reshuffled). Its `state_dict()`
records how far the consumer got, so `load_state_dict()` continues with exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from stages.data.index import Sample
from stages.data.io import read_image
from stages.data.rare_classes import MAX_CROP_TRIES, RareClassSampler
from stages.data.transforms import (
    CropParams,
    Normalization,
    apply_crop,
    crop_label,
    normalize,
    sample_crop_params,
)
from stages.runtime.errors import DudaError

# What the sampler hands the dataset: (sample index, epoch, position in the epoch's permutation).
ItemKey = tuple[int, int, int]


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8 with PIL Lanczos
    (docs/method.md#data-and-augmentation)."""
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 -> (size[0], size[1]) uint8 by nearest neighbour
    (docs/method.md#data-and-augmentation)."""
    height, width = int(size[0]), int(size[1])
    if label.shape == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))


class CropDataset(Dataset):
    """Randomly scaled, cropped and flipped training views of a list of samples.

    Index it with an `ItemKey` (index, epoch, position). Items are dicts:
    - index: int, the sample's position in `samples`;
    - image: (3, crop_h, crop_w) float32, normalised;
    - label: (crop_h, crop_w) int64 trainIds, 255 = ignore;
    - params: (7,) int64, `CropParams.to_tensor()` of the draw (in base-size pixels);
    - full_image (only if `with_full_image`): (3, H, W) float32 at the base size, normalised, not
      augmented (the teacher's view, docs/method.md#the-teachers-full-view-and-the-crop-mapping).
    `label_reader(index) -> (H, W) uint8` replaces the sample's label file (offline pseudo
    labels); it is resized to the base size by nearest neighbour like any label. With
    `with_labels=False` (unlabelled target crops) items have no "label" and nothing is read.
    With `rare_classes` (labelled source crops only) each item's class and image are drawn from
    the item's generator and its crop re-drawn until it holds enough of the class; "index" is
    then the drawn sample's.
    """

    def __init__(self, samples: Sequence[Sample], base_size: Sequence[int],
                 crop_size: Sequence[int], scale_range: Sequence[float],
                 flip_probability: float, normalization: Normalization, seed: int,
                 with_full_image: bool = False,
                 label_reader: Callable[[int], np.ndarray] | None = None,
                 with_labels: bool = True,
                 rare_classes: RareClassSampler | None = None) -> None:
        self.samples = list(samples)
        self.base_size = (int(base_size[0]), int(base_size[1]))
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_probability = float(flip_probability)
        self.normalization = normalization
        self.seed = int(seed)
        self.with_full_image = with_full_image
        self.label_reader = label_reader
        self.with_labels = with_labels
        if rare_classes is not None and (not with_labels or label_reader is not None):
            raise ValueError("rare-class sampling draws by the samples' own label files")
        self.rare_classes = rare_classes
        if with_labels and label_reader is None:
            unlabelled = [s.id for s in self.samples if s.label is None]
            if unlabelled:
                raise DudaError(f"{len(unlabelled)} training samples have no label "
                                f"(first: {unlabelled[0]})",
                                "train on a split with labels, or rebuild the dataset index")

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, epoch: int, position: int) -> np.random.Generator:
        """The augmentation generator of one draw: a pure function of (seed, epoch, position)."""
        return np.random.default_rng([self.seed, epoch, position])

    def base_view(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The sample resized to the base size: (H, W, 3) uint8 image, (H, W) uint8 label (None
        without labels)."""
        sample = self.samples[index]
        image = resize_image(read_image(sample.image), self.base_size)
        if not self.with_labels:
            return image, None
        if self.label_reader is not None:
            label = np.asarray(self.label_reader(index), dtype=np.uint8)
        else:
            label = sample.read_label()
        return image, resize_label(label, self.base_size)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        try:
            return self._item(key)
        except DudaError as error:  # a damaged or edited file: see `collate_crops`
            return {"error": (error.message, error.fix)}

    def _item(self, key: ItemKey) -> dict[str, Any]:
        index, epoch, position = (int(v) for v in key)
        rng = self.rng(epoch, position)
        sampler, rare_class = self.rare_classes, None
        if sampler is not None:
            rare_class, index = sampler.draw(rng)
        image, label = self.base_view(index)
        label_tensor = None if label is None else torch.from_numpy(label.astype(np.int64))
        params = self._crop_params(rng)
        if sampler is not None and rare_class is not None and label_tensor is not None:
            # DAFormer's re-draw: further crops from the same generator until one holds enough
            # of the class; the last is kept when none does (docs/method.md#rare-class-sampling).
            for _ in range(MAX_CROP_TRIES):
                if sampler.accepts(crop_label(label_tensor, params).numpy(), rare_class):
                    break
                params = self._crop_params(rng)
        image_tensor = torch.tensor(image).permute(2, 0, 1).float()  # (3, H, W), 0..255
        image_crop, label_crop = apply_crop(image_tensor, label_tensor, params)
        item: dict[str, Any] = {"index": index, "image": normalize(image_crop, self.normalization),
                                "params": params.to_tensor()}
        if label_crop is not None:
            item["label"] = label_crop  # (crop_h, crop_w) int64
        if self.with_full_image:
            item["full_image"] = normalize(image_tensor, self.normalization)  # (3, H, W)
        return item

    def _crop_params(self, rng: np.random.Generator) -> CropParams:
        return sample_crop_params(rng, *self.base_size, *self.crop_size,
                                  scale_range=self.scale_range,
                                  flip_probability=self.flip_probability)


def collate_crops(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; an item that failed with a DudaError makes the batch that error, so that
    it reaches the main process as the user's message rather than as a loader worker's
    traceback (`InfiniteLoader` raises it there)."""
    failed = [item["error"] for item in items if isinstance(item, dict) and "error" in item]
    return {"error": failed[0]} if failed else default_collate(items)


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of epoch `epoch`: a permutation drawn from (seed, epoch)."""
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]))
    return torch.randperm(size, generator=generator).tolist()


def rank_keys(size: int, seed: int, epoch: int, rank: int, world_size: int,
              drop_last: bool = True) -> list[ItemKey]:
    """The (index, epoch, position) keys rank `rank` visits in `epoch`.

    As `DistributedSampler`: with `drop_last` the permutation is cut to a multiple of
    world_size, otherwise padded by repeating its start; rank r takes positions r, r + w, ….
    """
    order = epoch_permutation(size, seed, epoch)
    if drop_last:
        order = order[:size - size % world_size]
    else:
        padding = (-size) % world_size
        order = order + (order * (padding // size + 1))[:padding]
    return [(order[p], epoch, p) for p in range(rank, len(order), world_size)]


class _BatchKeys:
    """An endless iterable of key batches, starting at (epoch, batch) of the rank's stream."""

    def __init__(self, loader: InfiniteLoader, epoch: int, batch: int) -> None:
        self.loader = loader
        self.epoch = epoch
        self.batch = batch

    def __iter__(self) -> Iterator[list[ItemKey]]:
        epoch, batch = self.epoch, self.batch
        while True:
            batches = self.loader.epoch_batches(epoch)
            yield from batches[batch:]
            epoch, batch = epoch + 1, 0


class InfiniteLoader:
    """Endless, resumable batches of a `CropDataset` (or any dataset indexed by `ItemKey`).

    `next(loader)` returns the collated batch (dict of stacked tensors). With drop_last every
    batch is full and each epoch's incomplete tail batch is skipped.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batch = 0  # batches consumed in `epoch`
        self._iterator: Iterator[dict[str, Any]] | None = None
        size = len(dataset)  # type: ignore[arg-type]
        per_rank = size // world_size if drop_last else -(-size // world_size)
        self.batches_per_epoch = (per_rank // batch_size if drop_last
                                  else -(-per_rank // batch_size))
        if self.batches_per_epoch < 1:
            raise DudaError(f"{size} samples give {per_rank} per rank, fewer than one batch "
                            f"of {batch_size} (world size {world_size})",
                            "use a smaller batch size or fewer processes")

    def epoch_batches(self, epoch: int) -> list[list[ItemKey]]:
        keys = rank_keys(len(self.dataset), self.seed, epoch, self.rank,  # type: ignore[arg-type]
                         self.world_size, self.drop_last)
        batches = [keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _start(self) -> Iterator[dict[str, Any]]:
        # A private generator: creating the iterator must not draw from torch's global RNG,
        # or a resumed run (which creates it at another point) would diverge.
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        loader = DataLoader(self.dataset, batch_sampler=_BatchKeys(self, self.epoch, self.batch),
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=generator, collate_fn=collate_crops,
                            prefetch_factor=2 if self.num_workers > 0 else None)
        return iter(loader)

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        if isinstance(batch, dict) and "error" in batch:
            raise DudaError(*batch["error"])
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def upcoming(self) -> list[int]:
        """The sample indices of the batch the next `next()` returns (nothing is consumed)."""
        return [int(key[0]) for key in self.epoch_batches(self.epoch)[self.batch]]

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position"}: the epoch and the number of its batches already consumed."""
        return {"epoch": self.epoch, "position": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches `state` says were consumed (stops any running workers)."""
        self.close()
        self.epoch, self.batch = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        """Stop the worker processes, if any."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
