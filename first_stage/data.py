"""Images for training and evaluating the autoencoder, through Hugging Face ``datasets``.

Every source is loaded with its image column cast to ``datasets.Image(decode=False)``, so images are
decoded here: a corrupt, truncated or undecodable file becomes a skipped sample that the batch
counts, never a crash. Each image is converted to 8-bit RGB, resized, cropped to ``resolution``²,
maybe flipped, and returned as a (3, R, R) float tensor in [-1, 1].

Crops and flips are drawn from a numpy generator seeded by (seed, epoch, sample), never from the
global RNG or worker state, so a batch does not depend on ``num_workers`` or on where a run was
resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import os

import datasets
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
import datasets.distributed
import numpy as np
import PIL.Image
import skimage.data
import torch

from .config import DataConfig

# scikit-image's bundled RGB(A) pictures that load offline ("lily" needs a download, "cat" is
# "chelsea" again, so it would leak the training set into the hold-out).
SAMPLE_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
)
SAMPLE_SPLITS = {"train": slice(None, -2), "validation": slice(-2, None), "all": slice(None)}

# datasets' own decoder: bytes, local or remote path, ``.load()`` (so truncated files fail there)
# and EXIF rotation. Used with our own try/except rather than inside the dataset.
_DECODER = datasets.Image()
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)  # what datasets' imagefolder reads
DECODE_PROBE = 100  # images tried before training: a dataset where none decodes is refused


def check_data_config(cfg: DataConfig) -> None:
    """Raise ValueError for a data config that cannot work, before any data is touched."""
    if cfg.resolution <= 0:
        raise ValueError(f"data.resolution must be positive, got {cfg.resolution}")
    if cfg.resize is not None and cfg.resize < cfg.resolution:
        raise ValueError(
            f"data.resize ({cfg.resize}) is smaller than data.resolution ({cfg.resolution}): "
            "every image would be upsized again; use resize >= resolution or resize: null"
        )
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.prefetch_factor < 1:
        raise ValueError(f"data.prefetch_factor must be >= 1, got {cfg.prefetch_factor}")
    if cfg.streaming and cfg.shuffle_buffer <= 0:
        raise ValueError(f"data.shuffle_buffer must be positive, got {cfg.shuffle_buffer}")
    if cfg.source != "sample" and not cfg.path:
        raise ValueError(f"data.path is required for data.source={cfg.source!r}")


@functools.cache
def _sample_dataset(split: str) -> datasets.Dataset:
    """scikit-image's pictures as PNG bytes in an in-memory dataset, built once per process."""
    rows = []
    for name in SAMPLE_IMAGES[SAMPLE_SPLITS[split]]:
        buffer = io.BytesIO()
        # compress_level=1: 4x faster to build than the default, and the bytes only live in memory.
        PIL.Image.fromarray(getattr(skimage.data, name)()).save(buffer, format="PNG", compress_level=1)
        rows.append({"bytes": buffer.getvalue(), "path": f"skimage.data.{name}"})  # decoded from the bytes
    features = datasets.Features({"image": datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({"image": rows}, features=features)


def load_image_dataset(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The images of ``cfg`` as a dataset with the column ``cfg.image_column``, undecoded (and ``cfg.label_column``).

    An ``IterableDataset`` when ``cfg.streaming``. Rows are ``{image_column: {"bytes", "path"}}``.
    Sources: ``sample`` (scikit-image pictures; splits train / validation / all), ``imagefolder``
    (a local folder, flat or with class sub-folders; a flat folder has the single split "train"),
    ``hub`` (``load_dataset(path, name)``) and ``webdataset`` (a local glob or URL of tar shards;
    the image column is the file extension, e.g. "jpg").
    """
    check_data_config(cfg)
    where = f"data.source={cfg.source!r}, data.path={cfg.path!r}, data.split={cfg.split!r}"
    if cfg.source == "sample":
        if cfg.split not in SAMPLE_SPLITS:
            raise ValueError(f"data.split must be one of {list(SAMPLE_SPLITS)} for source 'sample', got {cfg.split!r}")
        ds = _sample_dataset(cfg.split)
        if cfg.streaming:
            # One picture per shard, so that ranks and workers can split by shard.
            ds = ds.to_iterable_dataset(num_shards=len(ds))
    elif cfg.source == "imagefolder":
        folder = os.path.expanduser(cfg.path)
        # datasets would say "doesn't contain any data files" for a folder that does not exist.
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data.path: image folder not found: {folder}")
        # datasets would say 'Instruction "train" corresponds to no data!' for a folder without images.
        if not any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for _, _, names in os.walk(folder)
                   for name in names):
            raise FileNotFoundError(f"data.path: no image files in {folder} or its sub-folders (looked for "
                                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        ds = datasets.load_dataset("imagefolder", data_dir=folder, split=cfg.split, streaming=cfg.streaming)
    elif cfg.source == "hub":
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=cfg.streaming)
    elif cfg.source == "webdataset":
        shards = os.path.expanduser(cfg.path)
        # datasets fails with a bare IndexError when a local pattern matches nothing.
        if "://" not in shards and not glob.glob(shards):
            raise FileNotFoundError(f"data.path: no tar shards match {shards}")
        ds = datasets.load_dataset(
            "webdataset", data_files={cfg.split: shards}, split=cfg.split, streaming=cfg.streaming
        )
    else:
        raise ValueError(f"unknown data.source {cfg.source!r}")

    columns = ds.column_names  # None for a stream whose features are not known in advance
    for key, column in (("image_column", cfg.image_column), ("label_column", cfg.label_column)):
        if column is not None and columns is not None and column not in columns:
            raise ValueError(f"data.{key} {column!r} is not a column of {where}; columns: {columns}")
    kept = [cfg.image_column] + ([cfg.label_column] if cfg.label_column else [])
    ds = ds.select_columns(kept).cast_column(cfg.image_column, datasets.Image(decode=False))
    if not cfg.streaming and len(ds) == 0:
        raise ValueError(f"no images found for {where}")
    return ds


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited on white, 16-bit and float rescaled."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # PIL's convert clips these to 0..255, which turns a 16-bit image mostly white: rescale.
        a = np.asarray(image, dtype=np.float32)  # (H, W)
        if image.mode.startswith("I;16") or a.max() > 255:
            a = a / 257  # 65535 -> 255
        elif image.mode == "F" and a.max() <= 1:
            a = a * 255  # a float image in [0, 1]
        return PIL.Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if image.has_transparency_data:  # RGBA, LA, PA, or a P / L / RGB image with a transparent colour
        # Transparent pixels often hold black or garbage colours; show them as white paper.
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")  # a no-op copy for RGB; L, 1, P, CMYK, YCbCr ...


def resize_short_side(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (bicubic, antialiased)."""
    w, h = image.size
    scale = size / min(w, h)
    new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new_size == image.size:
        return image
    # PIL widens the filter when reducing, so downscaling is antialiased (unlike torch's default).
    return image.resize(new_size, PIL.Image.Resampling.BICUBIC)


def image_to_tensor(image: PIL.Image.Image, cfg: DataConfig, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """Resize, crop and flip an RGB image to a (3, R, R) float32 tensor in [-1, 1]; also whether it was upsized."""
    size = cfg.resolution
    # Judged on the original: an image too small for the crop is counted even when data.resize
    # (>= resolution) is what enlarges it.
    upsized = min(image.size) < size
    if cfg.resize is not None:
        image = resize_short_side(image, cfg.resize)
    elif upsized:
        image = resize_short_side(image, size)
    # Always draw three numbers, so the crop of a sample does not change when hflip is toggled.
    u_left, u_top, u_flip = rng.random(3)
    w, h = image.size
    if cfg.random_crop:
        left, top = int(u_left * (w - size + 1)), int(u_top * (h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, R, R) uint8
    if cfg.hflip and u_flip < 0.5:
        x = x.flip(-1)
    return x.float() / 127.5 - 1.0, upsized


def image_name(value: dict | None) -> str:
    """How reports name an image: its path, else ``<bytes>`` (a dataset that stores only bytes)."""
    return str((value or {}).get("path") or "<bytes>")


def load_sample(value: dict | None, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Decode one image value ``{"bytes", "path"}`` into ``{"pixel_values", "skipped", "upsized",
    "name"}``.

    ``pixel_values`` is a (3, R, R) tensor in [-1, 1], or None (and ``skipped`` 1) when the image
    cannot be decoded; ``name`` is :func:`image_name`.
    """
    try:
        image = to_rgb(_DECODER.decode_example(value))
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ... for bad files
        return {"pixel_values": None, "skipped": 1, "upsized": 0, "name": image_name(value)}
    pixels, upsized = image_to_tensor(image, cfg, rng)
    return {"pixel_values": pixels, "skipped": 0, "upsized": int(upsized), "name": image_name(value)}


def load_row(row: dict, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """:func:`load_sample` of a dataset row's image, with its class ``label`` when ``cfg.label_column`` is set."""
    sample = load_sample(row[cfg.image_column], cfg, rng)
    if cfg.label_column:
        sample["label"] = int(row[cfg.label_column])
    return sample


class DataError(ValueError):
    """Data that cannot train: the message names the data and what was tried."""


def check_decodable(dataset: torch.utils.data.Dataset, limit: int = DECODE_PROBE) -> None:
    """Raise :class:`DataError` when none of the first ``limit`` images of ``dataset`` (an
    :class:`ImageDataset`) decodes: a folder of corrupt files would otherwise train on empty batches
    to the end. A stream is not checked here; the training loop counts its consecutive empty steps."""
    if not isinstance(dataset, ImageDataset):
        return
    tried = min(limit, len(dataset))
    if not any(dataset[i]["pixel_values"] is not None for i in range(tried)):
        cfg = dataset.cfg
        raise DataError(f"no image decodes in data.source={cfg.source!r}, data.path={cfg.path!r}, "
                        f"data.split={cfg.split!r}: tried {tried} of its {len(dataset)} files; check the "
                        "files (corrupt, truncated, not images) or data.image_column")


class ImageDataset(torch.utils.data.Dataset):
    """Map-style images from a non-streaming HF dataset.

    Sample ``i`` of epoch ``e`` is a function of ``(seed, e, i)`` only: the same in any worker, with
    any number of workers, and after a resume. Call :meth:`set_epoch` before each epoch. A sample's
    ``id`` is ``ids[i]`` (default ``i``): which image it is, whichever process reads it.
    """

    def __init__(self, dataset: datasets.Dataset, cfg: DataConfig, seed: int = 0, ids: list[int] | None = None):
        if isinstance(dataset, datasets.IterableDataset):
            raise TypeError("ImageDataset needs a map-style dataset; use StreamingImageDataset for streams")
        self.dataset, self.cfg, self.seed, self.ids = dataset, cfg, seed, ids
        # In shared memory so that set_epoch reaches persistent DataLoader workers (datasets does the same).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # negative indices and bounds, as for a list
        rng = np.random.default_rng((self.seed, self.epoch, index))
        sample = load_row(self.dataset[index], self.cfg, rng)
        return {**sample, "id": index if self.ids is None else self.ids[index]}


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Images from a streaming HF dataset: shuffled with a buffer, then split across ``world_size`` ranks.

    The ranks get disjoint parts of the stream (whole shards when ``num_shards`` is a multiple of
    ``world_size``, else every ``world_size``-th example); DataLoader workers then split a rank's
    shards. A sample's crop and flip are seeded by ``(seed, epoch, hash of its bytes or path)``,
    so they do not depend on the rank, the worker or its place in the stream.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        cfg: DataConfig,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle:
            # The same seed on every rank, so that all ranks agree on which shards/examples to skip.
            dataset = dataset.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
        self.dataset = datasets.distributed.split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.cfg, self.seed = cfg, seed

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (the effective seed is seed + epoch) and redraw crops; reaches persistent workers."""
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        for row in self.dataset:
            value = row[self.cfg.image_column]
            rng = np.random.default_rng((self.seed, epoch, _content_seed(value)))
            yield load_row(row, self.cfg, rng)


def _content_seed(value: dict | None) -> int:
    """A 64-bit seed from an image's bytes (or path): it stands in for the index a stream lacks."""
    value = value or {}
    key = value.get("bytes") or str(value.get("path")).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def collate(samples: list[dict], resolution: int | None = None) -> dict:
    """Stack the decoded samples: ``{"pixel_values": (B, 3, R, R), "skipped": int, "upsized": int,
    "names": [B], "ids": [B], "labels": [B], "skipped_names": [...]}`` (names, ids and class labels as the
    samples carry them).

    B counts only the valid samples. A batch where every sample was skipped gives a (0, 3, R, R)
    tensor, which needs ``resolution`` (``make_dataloader`` passes it).
    """
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if pixels:
        stacked = torch.stack(pixels)
    elif resolution is not None:
        stacked = torch.empty(0, 3, resolution, resolution)
    else:
        raise ValueError("every sample of the batch was skipped: pass resolution to get a (0, 3, R, R) batch")
    return {
        "pixel_values": stacked,
        "skipped": sum(s["skipped"] for s in samples),
        "upsized": sum(s["upsized"] for s in samples),
        "names": [s.get("name") for s in samples if s["pixel_values"] is not None],
        "ids": [s.get("id") for s in samples if s["pixel_values"] is not None],
        "labels": [s.get("label") for s in samples if s["pixel_values"] is not None],  # None: unlabelled
        "skipped_names": [s.get("name") for s in samples if s["pixel_values"] is None],
    }


def make_dataloader(
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader of :func:`collate` batches over the images of ``cfg``.

    Map-style (``cfg.streaming`` False): the loader is NOT sharded here (``world_size`` only checks
    that every process gets a batch): pass it to ``accelerate.Accelerator.prepare``, which shards it per
    process. Shuffling uses a ``torch.Generator`` seeded with ``seed``.

    Streaming: the loader IS sharded here by ``rank`` / ``world_size``, so do not pass it to
    ``prepare`` (which would shard it again). Shuffling uses a buffer of ``cfg.shuffle_buffer``.
    A stream cannot be resumed exactly mid-epoch: a resumed run restarts the epoch's stream.

    Either way, call ``loader.dataset.set_epoch(epoch)`` before iterating each epoch: crops and
    flips are seeded by (seed, epoch, sample), so batches do not depend on ``cfg.num_workers``.
    After ``prepare`` call ``loader.set_epoch(epoch)`` as well: the prepared loader sets the
    dataset's epoch to its own iteration count at each ``iter()``, except with a seedable sampler,
    when it leaves the dataset alone.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ds = load_image_dataset(cfg)
    sampler = None  # in order, or a stream that shuffles itself
    if cfg.streaming:
        dataset = StreamingImageDataset(ds, cfg, seed, shuffle=shuffle, rank=rank, world_size=world_size)
    else:
        dataset = ImageDataset(ds, cfg, seed)
        if drop_last and len(dataset) < batch_size * world_size:  # Accelerate shards whole batches
            raise DataError(f"{describe(cfg)}: its {len(dataset)} images make no full batch of {batch_size} on each "
                            f"of {world_size} process(es) (incomplete batches are dropped); lower the batch size "
                            "or add images")
        # The sampler gets its own generator: the DataLoader draws a worker base seed from its
        # `generator` once per iterator, i.e. each epoch without persistent workers but only once
        # with them, so sharing one generator would make the order depend on num_workers.
        if shuffle:
            sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # Worker base seeds from here, not from the global RNG, which training uses.
        generator=torch.Generator().manual_seed(seed),
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        drop_last=drop_last,
        collate_fn=functools.partial(collate, resolution=cfg.resolution),
    )


def calibration_batches(cfg: DataConfig, num_images: int, batch_size: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1):
    """This process's share of ``num_images`` images picked at random (seeded) from ``cfg``'s data,
    as :func:`collate` batches of centre crops without flips (for measuring latent statistics).

    The pick is the same on every process; process ``rank`` gets every ``world_size``-th image of it,
    so together the processes see each picked image once. A stream is shuffled with a buffer of
    ``cfg.shuffle_buffer`` and its first ``num_images`` images are taken. A sample's ``id`` is its
    place in the random draw (0 .. num_images - 1; for a stream, in the shuffled stream), the same
    whatever the number of processes: the images with the lowest ids are a random subset.
    """
    cfg = dataclasses.replace(cfg, random_crop=False, hflip=False)
    ds = load_image_dataset(cfg)
    if cfg.streaming:
        stream = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer).take(num_images)
        rng = np.random.default_rng(seed)  # unused by centre crops without flips
        samples = ({**load_row(row, cfg, rng), "id": i}
                   for i, row in enumerate(stream) if i % world_size == rank)
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == batch_size:
                yield collate(batch, cfg.resolution)
                batch = []
        if batch:
            yield collate(batch, cfg.resolution)
        return
    # Read in file order (sorted), but each image's id is its place in the random draw: the first k
    # ids are a random k of the pick, not the k lowest files (which may be one class or picture).
    picked, draw_order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num_images].sort()
    dataset = ImageDataset(ds.select(picked[rank::world_size].tolist()), cfg, seed,
                           ids=draw_order[rank::world_size].tolist())
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=cfg.num_workers,
                                           collate_fn=functools.partial(collate, resolution=cfg.resolution))


def available_images(cfg: DataConfig) -> int | None:
    """How many images ``cfg``'s data holds (None for a stream: unknown before it is read)."""
    return None if cfg.streaming else len(load_image_dataset(cfg))


def preprocessing(cfg: DataConfig) -> dict:
    """How :func:`calibration_batches` turns ``cfg``'s files into crops, for reports."""
    return {"resize_short_side": cfg.resize, "resize_filter": "bicubic, antialiased" if cfg.resize else None,
            "crop": "centre", "resolution": cfg.resolution, "flip": False}


def describe(cfg: DataConfig) -> str:
    """A one-line description of a data config, for reports."""
    where = {"sample": "scikit-image sample photos"}.get(cfg.source, f"{cfg.source} {cfg.path}")
    name = f" ({cfg.name})" if cfg.name else ""
    return f"{where}{name}, split {cfg.split!r}, {cfg.resolution}² centre crops" + (
        f" after resizing the short side to {cfg.resize}" if cfg.resize else "")
