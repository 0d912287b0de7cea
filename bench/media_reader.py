"""The streaming media reader beside webdataset's own pipeline: `python bench/media_reader.py`.

1. decode: samples/s of img2dataset-like shards (jpg + txt + json, 320x240 JPEGs) decoded and tiled by the
   Llama 3.2 tile transform (`encoders.tiling.tile_image`, 224-px tiles, up to 4 a picture) in batches of 16, with
   0, 1 and 2 DataLoader workers: `data.media_stream.MediaStreamLoader` (decode and transform in the workers,
   collation here) beside `webdataset.WebDataset(urls, shardshuffle=100).shuffle(256).decode("pil").map(...)` in a
   DataLoader with as many workers (both shuffle shards and hold 256 undecoded samples per worker).
2. start-up: seconds from building the reader to its first sample, and the resident memory that added, over 10,
   1,000 and 10,000 tiny shards (hard links to one 1-sample tar): ours, webdataset's, and `data.media.MediaSamples`
   (the trainers' reader, which indexes every shard when it is built). Each in a fresh process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, TILE, MAX_TILES = 16, 224, 4
READERS = ("ours", "webdataset", "MediaSamples")


def picture(rng: np.random.Generator, width: int = 320, height: int = 240) -> bytes:
    """A JPEG of a smooth random gradient with a few rectangles: photo-like sizes, not noise."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.4, 0.4, (3, 2))
    pixels = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        draw.rectangle([x0, y0, x0 + 40, y0 + 30], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_image_shards(out: Path, shards: int, per_shard: int) -> list[str]:
    """img2dataset-like shards written by webdataset's TarWriter."""
    import webdataset

    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        path = out / f"images-{s:06d}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                key = f"{s:06d}{i:04d}"
                sink.write({"__key__": key, "jpg": picture(rng), "txt": f"picture {key}", "json": {"key": key}})
        urls.append(str(path))
    return urls


def tile_sample(sample: dict) -> dict:
    """Our transform: the decoded PIL image tiled for the model, beside its caption."""
    from encoders.tiling import tile_image

    tiled = tile_image(sample["image"], TILE, MAX_TILES)
    return {"pixel_values": tiled.pixel_values, "aspect_ratio_id": tiled.aspect_ratio_id, "text": sample["text"]}


def tile_pair(pair: tuple) -> dict:
    """webdataset's transform: the same tiling of its ("jpg", "txt") tuple."""
    return tile_sample({"image": pair[0], "text": pair[1]})


def collate_tiles(samples: list[dict]) -> dict:
    """Batch the tiled samples: pixels [B, tiles, 3, S, S], grid ids [B], captions."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "aspect_ratio_id": torch.tensor([s["aspect_ratio_id"] for s in samples]),
        "text": [s["text"] for s in samples],
    }


def batches(reader: str, urls: list[str], workers: int):
    """An endless iterator of tiled batches from `reader`."""
    if reader.startswith("ours"):
        from data.media_stream import MediaStreamLoader

        loader = MediaStreamLoader(
            urls,
            kind="image",
            batch_size=BATCH,
            num_workers=workers,
            image_format="pil",
            transform=tile_sample,
            collate=collate_tiles,
            collate_in_workers=reader == "ours, collated in workers",
        )
        return iter(loader)
    import webdataset
    from torch.utils.data import DataLoader

    dataset = webdataset.WebDataset(urls, shardshuffle=100, seed=0).repeat().shuffle(256).decode("pil")
    dataset = dataset.to_tuple("jpg", "txt").map(tile_pair)
    return iter(DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collate_tiles))


def samples_per_s(reader: str, urls: list[str], workers: int, steps: int) -> float:
    """Tiled samples/s handed to a consumer that does nothing, after the first two batches (worker start)."""
    it = batches(reader, urls, workers)
    for _ in range(2):
        next(it)
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        assert batch["pixel_values"].shape[1:] == (MAX_TILES, 3, TILE, TILE)
    seconds = time.perf_counter() - started
    if hasattr(it, "close"):  # ours: stop its workers before the next run forks its own
        it.close()
    del it
    return steps * BATCH / seconds


# --------------------------------------------------------------------------------------------------- start-up


def resident_mib() -> float:
    """This process's resident memory now, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def startup_child(reader: str, shard_dir: str) -> None:
    """In a fresh process: build `reader` over the shards of `shard_dir`, take one sample; print the figures."""
    import webdataset  # noqa: F401  (every reader's imports are paid before the clock starts)

    from data.media import MediaSamples, decode_image
    from data.media_stream import MediaStreamLoader

    urls = sorted(str(p) for p in Path(shard_dir).glob("tiny-*.tar"))
    decode_image(tiny_png(), "warm-up")  # PIL and its PNG plugin loaded before the clock starts, and numpy.random
    np.random.default_rng(0)
    before = resident_mib()
    started = time.perf_counter()
    if reader == "ours":
        stream = iter(MediaStreamLoader(urls, kind="image"))
    elif reader == "webdataset":
        stream = iter(webdataset.WebDataset(urls, shardshuffle=100, seed=0).decode("pil"))
    else:
        stream = iter(MediaSamples(urls, kind="image"))
    built = time.perf_counter() - started
    next(stream)
    first = time.perf_counter() - started
    print(json.dumps({"built_s": built, "first_s": first, "added_mib": resident_mib() - before}))


def tiny_png() -> bytes:
    """An 8x8 red PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_shards(out: Path, count: int) -> None:
    """`count` hard links to one tar of a single 8x8 PNG + txt sample."""
    import webdataset

    source = out / "source.tar"
    with webdataset.TarWriter(str(source)) as sink:
        sink.write({"__key__": "tiny", "png": tiny_png(), "txt": "a red square"})
    for n in range(count):
        os.link(source, out / f"tiny-{n:06d}.tar")


def startup(reader: str, shard_dir: Path) -> dict:
    """The start-up figures of `reader`, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--startup-child", reader, str(shard_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{reader} start-up run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run both measurements and print ours beside webdataset's with the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed batches of 16 per decode run")
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 1000, 10000], help="start-up shard counts")
    parser.add_argument("--startup-child", nargs=2, metavar=("READER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_child:
        startup_child(*args.startup_child)
        return
    import webdataset

    print(f"torch {torch.__version__}, webdataset {webdataset.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_image_shards(Path(tmp), shards=12, per_shard=40)
        print(f"\ndecode + tile ({TILE}-px tiles, up to {MAX_TILES}) of 320x240 JPEGs, batches of {BATCH}, samples/s")
        header = ["DataLoader workers", "ours (collated here)", "ours (collated in workers)", "webdataset"]
        print("| " + " | ".join([*header, "ours / webdataset"]) + " |\n" + "|---" * 5 + "|")
        for workers in (0, 1, 2):
            readers = ("ours", "ours, collated in workers", "webdataset") if workers else ("ours", "webdataset")
            rates = {r: samples_per_s(r, urls, workers, args.steps) for r in readers}
            in_workers = rates.get("ours, collated in workers")
            ratios = f"{rates['ours'] / rates['webdataset']:.2f}"
            ratios += f" / {in_workers / rates['webdataset']:.2f}" if in_workers else ""
            cell = f"{in_workers:.1f}" if in_workers else "-"
            print(f"| {workers} | {rates['ours']:.1f} | {cell} | {rates['webdataset']:.1f} | {ratios} |")
        print("\nstart-up over tiny shards: seconds to the first sample (build), MiB resident added")
        print("| shards | ours | webdataset | ours / webdataset | MediaSamples (indexes all) |\n|---|---|---|---|---|")
        for count in args.shards:
            shard_dir = Path(tmp) / f"tiny{count}"
            shard_dir.mkdir()
            write_tiny_shards(shard_dir, count)
            figures = {reader: startup(reader, shard_dir) for reader in READERS}
            cells = [f"{f['first_s']:.3f} s ({f['built_s']:.3f}), {f['added_mib']:.1f} MiB" for f in figures.values()]
            ratio = figures["ours"]["first_s"] / figures["webdataset"]["first_s"]
            print(f"| {count:,} | {cells[0]} | {cells[1]} | {ratio:.2f} | {cells[2]} |")


if __name__ == "__main__":
    main()
