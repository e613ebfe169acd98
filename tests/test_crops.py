"""Training crops: reproducible draws, aligned labels, resumable and shardable batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.data.crops import CropDataset, InfiniteLoader, rank_keys
from stages.data.index import load_dataset_index
from stages.data.io import read_image, read_label
from stages.data.transforms import CropParams, normalize


def _dataset(index_path, seed=0, **kwargs) -> CropDataset:
    samples = load_dataset_index(index_path).samples("source", "train")
    options = {"base_size": [32, 64], "crop_size": [24, 48], "scale_range": [0.8, 1.2],
               "flip_probability": 0.5, "normalization": "imagenet_rgb", "seed": seed}
    options.update(kwargs)
    return CropDataset(samples, **options)


def test_same_seed_epoch_position_gives_the_same_crop(tiny_index):
    dataset = _dataset(tiny_index)
    first, again = dataset[(3, 1, 5)], dataset[(3, 1, 5)]
    assert torch.equal(first["params"], again["params"])
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["label"], again["label"])
    draws = {tuple(dataset[(3, epoch, position)]["params"].tolist())
             for epoch in range(3) for position in range(3)}
    assert len(draws) > 1  # another epoch or position draws another view
    other_seed = _dataset(tiny_index, seed=1)[(3, 1, 5)]
    assert not torch.equal(other_seed["params"], first["params"])


def test_item_shapes_dtypes_and_recorded_params(tiny_index):
    item = _dataset(tiny_index, with_full_image=True)[(2, 0, 0)]
    assert item["index"] == 2
    assert item["image"].shape == (3, 24, 48) and item["image"].dtype == torch.float32
    assert item["label"].shape == (24, 48) and item["label"].dtype == torch.int64
    assert item["params"].shape == (7,) and item["params"].dtype == torch.int64
    params = CropParams.from_tensor(item["params"])
    assert (params.crop_h, params.crop_w) == (24, 48)
    assert 0.8 * 32 - 1 <= params.scaled_h <= 1.2 * 32 and 0.8 * 64 - 1 <= params.scaled_w <= 1.2 * 64
    assert 0 <= params.y1 <= params.scaled_h - 24 and 0 <= params.x1 <= params.scaled_w - 48
    # The full image is the base-size image, normalised, with no augmentation.
    samples = load_dataset_index(tiny_index).samples("source", "train")
    expected = normalize(read_image(samples[2].image), "imagenet_rgb")
    assert torch.equal(item["full_image"], expected)


def test_label_stays_aligned_with_the_image(tiny_index):
    # Each class has its own flat colour in the fixture, so the label decides the pixel colour.
    dataset = _dataset(tiny_index, flip_probability=1.0, scale_range=[1.0, 1.0])
    samples = dataset.samples
    for position in range(4):
        item = dataset[(1, 0, position)]
        params = CropParams.from_tensor(item["params"])
        assert params.flip and (params.scaled_h, params.scaled_w) == (32, 64)
        label = read_label(samples[1].label)
        rows = slice(params.y1, params.y1 + 24)
        columns = slice(params.x1, params.x1 + 48)
        expected = torch.from_numpy(label[rows, columns][:, ::-1].astype(np.int64))
        assert torch.equal(item["label"], expected)
        image = read_image(samples[1].image)[rows, columns][:, ::-1]
        assert torch.allclose(item["image"], normalize(image.copy(), "imagenet_rgb"), atol=1e-4)


def test_label_reader_replaces_the_label_file(tiny_index):
    pseudo = np.full((16, 32), 7, np.uint8)  # another size: resized to the base by nearest
    dataset = _dataset(tiny_index, label_reader=lambda index: pseudo)
    item = dataset[(0, 0, 0)]
    assert torch.equal(item["label"], torch.full((24, 48), 7, dtype=torch.int64))


def _indices(loader: InfiniteLoader, count: int) -> list[list[int]]:
    return [next(loader)["index"].tolist() for _ in range(count)]


def test_loader_epochs_are_permutations_that_change(tiny_index):
    loader = InfiniteLoader(_dataset(tiny_index), batch_size=2, seed=0, num_workers=0)
    batches = _indices(loader, 12)  # 8 samples, 4 batches per epoch
    epochs = [[i for batch in batches[e:e + 4] for i in batch] for e in (0, 4, 8)]
    assert all(sorted(epoch) == list(range(8)) for epoch in epochs)
    # set_epoch semantics (docs/method.md#epochs-reshuffled)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    assert loader.state_dict() == {"epoch": 3, "position": 0}


def test_loader_resume_gives_the_same_batches(tiny_index):
    straight = InfiniteLoader(_dataset(tiny_index), batch_size=3, seed=4, num_workers=0)
    expected = [next(straight) for _ in range(7)]
    first = InfiniteLoader(_dataset(tiny_index), batch_size=3, seed=4, num_workers=0)
    got = [next(first) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 1}  # 8 samples, batch 3, drop_last: 2 per epoch
    resumed = InfiniteLoader(_dataset(tiny_index), batch_size=3, seed=4, num_workers=0)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(4)]
    for a, b in zip(expected, got):
        for key in ("index", "image", "label", "params"):
            assert torch.equal(a[key], b[key])


def test_workers_give_the_same_batches_as_the_main_process(tiny_index):
    serial = InfiniteLoader(_dataset(tiny_index), batch_size=2, seed=1, num_workers=0)
    parallel = InfiniteLoader(_dataset(tiny_index), batch_size=2, seed=1, num_workers=2)
    try:
        for _ in range(6):
            a, b = next(serial), next(parallel)
            assert torch.equal(a["params"], b["params"]) and torch.equal(a["image"], b["image"])
    finally:
        parallel.close()


@pytest.mark.parametrize("size,world_size", [(8, 2), (9, 2), (10, 3)])
def test_rank_shards_cover_the_epoch_without_overlap(size, world_size):
    shards = [rank_keys(size, seed=0, epoch=2, rank=r, world_size=world_size)
              for r in range(world_size)]
    positions = [key[2] for shard in shards for key in shard]
    indices = [key[0] for shard in shards for key in shard]
    usable = size - size % world_size
    assert sorted(positions) == list(range(usable))
    assert len(set(indices)) == usable
    assert len({len(shard) for shard in shards}) == 1
    assert all(key[1] == 2 for shard in shards for key in shard)


def test_rank_loaders_split_each_batch_step(tiny_index):
    loaders = [InfiniteLoader(_dataset(tiny_index), batch_size=2, seed=0, num_workers=0,
                              rank=r, world_size=2) for r in range(2)]
    seen = [index for loader in loaders for batch in _indices(loader, 2) for index in batch]
    assert sorted(seen) == list(range(8))
