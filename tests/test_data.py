"""Data pipeline: sources, decoding of awkward files, determinism, sharding. Nothing downloaded."""

import io
import tarfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from first_stage.config import DataConfig
from first_stage.data import (
    DataError,
    ImageDataset,
    check_decodable,
    collate,
    load_image_dataset,
    load_sample,
    make_dataloader,
)

SMALL = dict(resolution=32, resize=48)  # sample pictures shrunk first: fast to crop


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that imagefolder / webdataset write out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """(h, w, channels) uint8 random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A flat folder of 9 files: 7 decodable (one of them 8x8), one corrupt, one truncated."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(_noise(64, 80)).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(_noise(48, 56, seed=1)[..., 0]).save(folder / "gray.png")
    # Fully transparent, black underneath: must come out white.
    Image.fromarray(np.zeros((48, 48, 4), np.uint8)).save(folder / "rgba.png")
    Image.new("CMYK", (48, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    # Mid-grey at 16 bits: 32768 / 65535, must not be clipped to white.
    Image.fromarray(np.full((40, 48), 32768, np.uint16)).save(folder / "gray16.png")
    Image.fromarray(_noise(40, 40, seed=2)).convert("P").save(folder / "palette.png")
    Image.fromarray(_noise(8, 8, seed=3)).save(folder / "tiny.png")
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(4).bytes(2000))
    jpeg = io.BytesIO()
    Image.fromarray(_noise(128, 128, seed=5)).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return folder


def _folder_cfg(folder, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", path=str(folder), resolution=32, **kw)


def test_sample_splits_are_disjoint_and_cover_all():
    split = {s: load_image_dataset(DataConfig(split=s)) for s in ("train", "validation", "all")}
    images = {s: [row["image"]["bytes"] for row in ds] for s, ds in split.items()}
    assert images["train"] and images["validation"]
    assert not set(images["train"]) & set(images["validation"])
    assert sorted(images["train"] + images["validation"]) == sorted(images["all"])
    assert len(set(images["all"])) == len(images["all"])  # no picture twice


def test_sample_batch_shape_and_range():
    batch = next(iter(make_dataloader(DataConfig(**SMALL), batch_size=4, seed=0)))
    x = batch["pixel_values"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert batch["skipped"] == 0 and batch["upsized"] == 0


def test_same_seed_epoch_index_gives_same_sample():
    cfg = DataConfig(resolution=32)  # no resize: 512x512 astronaut, many possible crops
    hf = load_image_dataset(cfg)
    a, b = ImageDataset(hf, cfg, seed=3), ImageDataset(hf, cfg, seed=3)  # b: a resumed run
    assert torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])
    assert torch.equal(a[0]["pixel_values"], a[0]["pixel_values"])
    b.set_epoch(1)
    assert not torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])
    assert not torch.equal(a[0]["pixel_values"], ImageDataset(hf, cfg, seed=4)[0]["pixel_values"])


def test_batches_do_not_depend_on_num_workers():
    """Two epochs with persistent workers: set_epoch must reach the workers."""
    runs = []
    for workers in (0, 2):
        loader = make_dataloader(DataConfig(num_workers=workers, **SMALL), batch_size=3, seed=7)
        run = []
        for epoch in range(2):
            loader.dataset.set_epoch(epoch)
            run += [batch["pixel_values"] for batch in loader]
        runs.append(run)
    assert len(runs[0]) == len(runs[1]) == 4
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not torch.equal(runs[0][0], runs[0][2])  # epoch 1 differs from epoch 0


@pytest.mark.parametrize("resize", [None, 40])
def test_awkward_files_are_converted_or_skipped(image_folder, resize):
    loader = make_dataloader(_folder_cfg(image_folder, resize=resize), batch_size=4, seed=0, drop_last=False)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 2  # corrupt.jpg, truncated.jpg
    assert sum(b["upsized"] for b in batches) == 1  # tiny.png
    x = torch.cat([b["pixel_values"] for b in batches])
    assert x.shape == (7, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1


def test_16_bit_is_rescaled_and_alpha_is_white(image_folder):
    cfg = _folder_cfg(image_folder)
    rng = np.random.default_rng(0)
    grey = load_sample({"bytes": None, "path": str(image_folder / "gray16.png")}, cfg, rng)["pixel_values"]
    assert grey.abs().max() < 0.01  # 32768 / 257 = 127.5, the middle of [-1, 1]
    white = load_sample({"bytes": None, "path": str(image_folder / "rgba.png")}, cfg, rng)["pixel_values"]
    assert torch.equal(white, torch.ones(3, 32, 32))
    red = load_sample({"bytes": None, "path": str(image_folder / "cmyk.jpg")}, cfg, rng)["pixel_values"]
    assert red[0].mean() > 0.9 and red[1:].mean() < -0.9


def test_all_skipped_batch_is_empty():
    skipped = {"pixel_values": None, "skipped": 1, "upsized": 0}
    batch = collate([skipped, skipped], resolution=16)
    assert batch["pixel_values"].shape == (0, 3, 16, 16) and batch["skipped"] == 2


def test_missing_column_and_folder_are_named(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"'photo'.*\['image'\]"):
        load_image_dataset(_folder_cfg(image_folder, image_column="photo"))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_image_dataset(_folder_cfg(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="nothing-"):
        load_image_dataset(DataConfig(source="webdataset", path=str(tmp_path / "nothing-*.tar")))
    with pytest.raises(ValueError, match="resolution"):
        load_image_dataset(DataConfig(resolution=0))


def _stream(cfg: DataConfig, rank: int, world_size: int) -> tuple[list[bytes], int]:
    """Every valid image of one rank's stream as bytes, and the number skipped."""
    loader = make_dataloader(cfg, batch_size=2, seed=0, drop_last=False, rank=rank, world_size=world_size)
    batches = list(loader)
    images = [x.numpy().tobytes() for b in batches for x in b["pixel_values"]]
    return images, sum(b["skipped"] for b in batches)


@pytest.mark.parametrize("source, world_size", [("imagefolder", 2), ("sample", 3)])
def test_streaming_ranks_are_disjoint_and_cover_the_data(image_folder, source, world_size):
    """A streamed folder is 1 shard (ranks split by example), the 9 sample pictures 9 (by shard)."""
    if source == "imagefolder":
        cfg = DataConfig(source="imagefolder", path=str(image_folder), streaming=True, **SMALL)
    else:
        cfg = DataConfig(split="all", streaming=True, **SMALL)
    # Crops are seeded by content, so an image gives the same tensor whichever rank reads it.
    everything, skipped = _stream(cfg, rank=0, world_size=1)
    shards = [_stream(cfg, rank, world_size) for rank in range(world_size)]
    seen = [image for images, _ in shards for image in images]
    assert all(images for images, _ in shards)
    assert sorted(seen) == sorted(everything)  # disjoint and covering
    assert sum(s for _, s in shards) == skipped == (2 if source == "imagefolder" else 0)


def test_streaming_does_not_depend_on_num_workers():
    """Crops are seeded by content, so the same images come out whichever worker reads them."""
    runs = []
    for workers in (0, 2):
        cfg = DataConfig(split="all", streaming=True, num_workers=workers, **SMALL)
        loader = make_dataloader(cfg, batch_size=2, seed=0, drop_last=False)
        loader.dataset.set_epoch(1)
        runs.append(sorted(x.numpy().tobytes() for b in loader for x in b["pixel_values"]))
    assert len(runs[0]) == 9 and runs[0] == runs[1]


def test_webdataset_from_local_tar(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        members = [(f"{i:04d}.png", _noise(40, 40, seed=i)) for i in range(3)]
        for name, pixels in members:
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            for member, data in ((name, png.getvalue()), (name.replace("png", "txt"), b"a caption")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pattern = str(tmp_path / "shard-*.tar")
    with pytest.raises(ValueError, match=r"'jpg'.*'png'"):
        load_image_dataset(DataConfig(source="webdataset", path=pattern, image_column="jpg"))
    for streaming in (False, True):
        cfg = DataConfig(source="webdataset", path=pattern, image_column="png", streaming=streaming, resolution=32)
        batches = list(make_dataloader(cfg, batch_size=2, seed=0, drop_last=False))
        assert sum(len(b["pixel_values"]) for b in batches) == 3
        assert sum(b["skipped"] for b in batches) == 0


def test_folder_without_images_names_the_folder_and_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(FileNotFoundError, match=r"no image files in .*looked for .*\.jpg.*\.png"):
        load_image_dataset(DataConfig(source="imagefolder", path=str(tmp_path)))


def test_data_where_nothing_decodes_is_refused_before_training(tmp_path):
    tmp_path = tmp_path / "images"  # a plain folder name (datasets infers splits from folder names)
    tmp_path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(rng.integers(0, 255, 300, dtype=np.uint8).tobytes())
    cfg = DataConfig(source="imagefolder", path=str(tmp_path), resolution=16)
    with pytest.raises(DataError, match=r"no image decodes .*tried 3 of its 3 files"):
        check_decodable(ImageDataset(load_image_dataset(cfg), cfg))
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    check_decodable(ImageDataset(load_image_dataset(cfg), cfg))  # one decodable image is enough

