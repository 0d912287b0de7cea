"""The embedded default media: synthetic scenes, clips of moving shapes and spoken words, as webdataset shards.

    python -m data.synthetic {images,video,speech,all} --out DIR [--train N] [--heldout M] [--seed S] [--size PX]

Writes DIR/<kind>/{train,heldout}-NNNNNN.tar and DIR/<kind>/manifest.json (and DIR/images/tags.txt, the image
tags' vocabulary, one per line, which each image's json lists under "tags"). Everything is a pure function of the
arguments: the same seed gives byte-identical shards, whatever the number of worker threads, except that x264 now
and then codes a clip's first frame differently to the same decoded pixels (one clip in a few hundred, seen under
CPU load; the decoded frames are always identical). A kind whose
manifest matches the arguments is skipped, so rerunning is cheap; an interrupted kind (no manifest) is redone.

Held-out splits: scenes with two or three objects in `heldout` have captions that never occur in `train`; one-object
scenes (only 48 captions exist), clips (96 captions) and spoken words (100 texts) are separate draws, and no spoken
sample repeats a (text, voice, speed, pitch) of the other split.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import atomic_write_text, commit_file
from data.scenes import (
    BACKGROUNDS,
    COLOURS,
    COMMANDS,
    DIGITS,
    DIRECTIONS,
    RGB,
    SHAPES,
    SIZES,
    TAGS,
    Scene,
    SceneObject,
    caption,
    motion_caption,
    random_scene,
    scene_tags,
)

KINDS = ("images", "video", "speech")
SPLITS = ("train", "heldout")
# (train, heldout) per kind: sized so that the tiny CLIP and BEST-RQ configs learn in minutes on a CPU and `all`
# is written in about a minute on 2 cores.
DEFAULT_COUNTS = {"images": (4000, 400), "video": (800, 200), "speech": (2000, 200)}
SHARD_SIZE = 1000
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then area-averaged down: anti-aliased edges
SAMPLE_RATE = 16000
ESPEAK_RATE = 22050  # espeak-ng's own output rate
# The espeak-ng voices (all ship with the Debian package) and the voice variants mixed in for speaker variety.
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("", "f1", "f2", "f3", "f4", "m1", "m2", "m3", "m4")
SPEEDS = (120, 200)  # words per minute, inclusive range
PITCHES = (25, 75)  # espeak-ng pitch 0..99, inclusive range
# The image tags' vocabulary beside the image shards (train/encoder.py's tags objective reads it).
TAGS_FILE = "tags.txt"
VERSION = 2  # bump when the rendering changes, so old manifests no longer match


# ----------------------------------------------------------------------------------------------------- images


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a square, triangle or star centred at (cx, cy) with extent r."""
    if shape == "square":
        h = 0.85 * r  # corners reach 1.2 r: the same visual weight as a circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, its centroid on the centre.
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no outline for shape {shape!r}; have {SHAPES}")


def draw_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene as an RGB image of size x size pixels, painting each object in its caption's colour."""
    canvas = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), RGB[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * canvas, obj.y * canvas, obj.radius * canvas
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=RGB[obj.colour])
        else:
            draw.polygon(shape_outline(obj.shape, cx, cy, r), fill=RGB[obj.colour])
    # BOX is an exact area average: smooth edges, and no ringing that would tint flat regions.
    return image.resize((size, size), Image.BOX)


def scene_to_json(scene: Scene) -> dict:
    """The scene as plain JSON: background and objects with their centres and radius in image units."""
    return {
        "background": scene.background,
        "objects": [dict(dataclasses.asdict(o), radius=o.radius) for o in scene.objects],
    }


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _render_image(job: tuple[Scene, int]) -> dict[str, bytes]:
    scene, size = job
    meta = scene_to_json(scene)
    meta["caption"] = caption(scene)
    meta["tags"] = scene_tags(scene)
    return {"png": _png(draw_scene(scene, size)), "txt": meta["caption"].encode(), "json": _dumps(meta)}


def image_jobs(split: str, count: int, seed: int, heldout_count: int, size: int) -> list[tuple[Scene, int]]:
    """The scenes of one split. Train rejects multi-object captions that the held-out split uses."""
    rng_h = random.Random(f"images:heldout:{seed}")
    heldout = [random_scene(rng_h) for _ in range(heldout_count)]
    if split == "heldout":
        return [(s, size) for s in heldout[:count]]
    reserved = {caption(s) for s in heldout if len(s.objects) > 1}
    rng = random.Random(f"images:train:{seed}")
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = random_scene(rng)
        if caption(scene) not in reserved:
            scenes.append(scene)
    return [(s, size) for s in scenes]


# ------------------------------------------------------------------------------------------------------ video

# Unit vector (x right, y down) of each direction word.
MOTION = {"to the right": (1.0, 0.0), "to the left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
TRAVEL = 0.4  # distance covered over a clip, in image units


def random_clip(rng: random.Random) -> dict:
    """One clip: a shape, a background and a direction; the shape starts so that its whole path stays in frame."""
    background = rng.choice(BACKGROUNDS)
    direction = rng.choice(DIRECTIONS)
    dx, dy = MOTION[direction]
    # Along the motion axis start at 0.3 (or 0.7 when moving back); across it anywhere central.
    along = 0.5 - TRAVEL / 2 + rng.uniform(-0.03, 0.03)
    across = rng.uniform(0.3, 0.7)
    x = (along if dx > 0 else 1 - along) if dx else across
    y = (along if dy > 0 else 1 - along) if dy else across
    obj = SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), x, y)
    return {"object": obj, "background": background, "direction": direction}


def clip_frames(clip: dict, size: int = 64, frames: int = 16) -> list[Image.Image]:
    """The frames of a clip: the object moves TRAVEL image units at constant speed in its direction."""
    obj: SceneObject = clip["object"]
    dx, dy = MOTION[clip["direction"]]
    out = []
    for t in range(frames):
        step = TRAVEL * t / max(frames - 1, 1)
        moved = dataclasses.replace(obj, x=obj.x + dx * step, y=obj.y + dy * step)
        out.append(draw_scene(Scene(objects=(moved,), background=clip["background"]), size))
    return out


def encode_mp4(frames: list[Image.Image], fps: int = 8) -> bytes:
    """H.264 mp4 bytes of RGB frames (one encoder thread: the decoded frames are reproducible, the bytes nearly
    always; see the module docstring)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _render_clip(job: tuple[dict, int, int, int]) -> dict[str, bytes]:
    clip, size, frames, fps = job
    obj: SceneObject = clip["object"]
    meta = {
        "caption": motion_caption(obj, clip["direction"]),
        "direction": clip["direction"],
        "background": clip["background"],
        "object": dict(dataclasses.asdict(obj), radius=obj.radius),
        "frames": frames,
        "fps": fps,
        "travel": TRAVEL,
    }
    mp4 = encode_mp4(clip_frames(clip, size, frames), fps)
    return {"mp4": mp4, "txt": meta["caption"].encode(), "json": _dumps(meta)}


def video_jobs(split: str, count: int, seed: int, size: int, frames: int, fps: int) -> list[tuple[dict, int, int, int]]:
    """The clips of one split: separate draws per split (there are only 96 captions)."""
    rng = random.Random(f"video:{split}:{seed}")
    return [(random_clip(rng), size, frames, fps) for _ in range(count)]


# ----------------------------------------------------------------------------------------------------- speech


def speech_texts() -> dict[str, list[str]]:
    """The spoken vocabulary by category: single words, 'red circle' and 'small red circle' phrases."""
    return {
        "word": list(DIGITS) + list(COLOURS) + list(SHAPES) + list(COMMANDS),
        "colour_shape": [f"{c} {s}" for c in COLOURS for s in SHAPES],
        "size_colour_shape": [f"{z} {c} {s}" for z in SIZES for c in COLOURS for s in SHAPES],
    }


# Built once: random_utterance draws thousands of times and never changes the lists.
_SPEECH_TEXTS = speech_texts()


def random_utterance(rng: random.Random) -> dict:
    """A text with a voice, variant, speed and pitch; single words are drawn most often."""
    texts = _SPEECH_TEXTS
    category = rng.choices(list(texts), weights=(0.5, 0.3, 0.2))[0]
    return {
        "text": rng.choice(texts[category]),
        "category": category,
        "voice": rng.choice(VOICES),
        "variant": rng.choice(VARIANTS),
        "speed": rng.randint(*SPEEDS),
        "pitch": rng.randint(*PITCHES),
    }


def espeak_path() -> str:
    """The espeak-ng executable, or a RuntimeError saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(
            "espeak-ng was not found on PATH; the speech data is spoken by it: "
            "install the Debian package espeak-ng (make install does)"
        )
    return path


def speak(text: str, voice: str = "en", variant: str = "", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng's rendering of `text`: int16 mono samples at ESPEAK_RATE (22.05 kHz)."""
    import soundfile

    voice_arg = f"{voice}+{variant}" if variant else voice
    cmd = [espeak_path(), "-v", voice_arg, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    result = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed on {text!r} ({voice_arg}): {result.stderr.decode(errors='replace')}")
    samples, rate = soundfile.read(io.BytesIO(result.stdout), dtype="int16")
    if rate != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz audio; expected {ESPEAK_RATE}")
    return samples


def _speak_job(job: dict) -> np.ndarray:
    return speak(job["text"], job["voice"], job["variant"], job["speed"], job["pitch"])


class _Resampler:
    """22.05 kHz int16 -> 16 kHz 16-bit FLAC bytes; the sinc kernel is built once (torchaudio is slow otherwise)."""

    def __init__(self) -> None:
        import torch
        import torchaudio

        self.torch = torch
        self.resample = torchaudio.transforms.Resample(ESPEAK_RATE, SAMPLE_RATE)

    def __call__(self, samples: np.ndarray) -> tuple[bytes, float]:
        import soundfile

        # One thread: a 1-second convolution gains nothing from more, and loses much beside busy workers.
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            with self.torch.no_grad():
                wave = self.resample(self.torch.from_numpy(samples.astype(np.float32) / 32768.0)[None])[0].numpy()
        finally:
            self.torch.set_num_threads(threads)
        buf = io.BytesIO()
        # FLAC: lossless at about 60% of the WAV size.
        soundfile.write(buf, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return buf.getvalue(), len(wave) / SAMPLE_RATE


def speech_jobs(split: str, count: int, seed: int, heldout_count: int) -> list[dict]:
    """The utterances of one split; no (text, voice, variant, speed, pitch) occurs twice in the whole data set."""
    rng_h = random.Random(f"speech:heldout:{seed}")
    seen: set[tuple] = set()
    heldout = []
    while len(heldout) < heldout_count:
        u = random_utterance(rng_h)
        if (uid := _utterance_id(u)) not in seen:
            seen.add(uid)
            heldout.append(u)
    if split == "heldout":
        return heldout[:count]
    rng = random.Random(f"speech:train:{seed}")
    train = []
    while len(train) < count:
        u = random_utterance(rng)
        if (uid := _utterance_id(u)) not in seen:
            seen.add(uid)
            train.append(u)
    return train


def _utterance_id(u: dict) -> tuple:
    return (u["text"], u["voice"], u["variant"], u["speed"], u["pitch"])


# ---------------------------------------------------------------------------------------------------- writing


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


class ShardWriter:
    """Writes samples {ext: bytes} as webdataset tar shards `<prefix>-NNNNNN.tar`, SHARD_SIZE samples each.

    Tar headers carry no time or owner, so the bytes depend on the samples alone; each shard is written under a
    temporary name and renamed when complete, so a crash never leaves a shard that looks whole.
    """

    def __init__(self, directory: Path, prefix: str, shard_size: int = SHARD_SIZE) -> None:
        self.directory, self.prefix, self.shard_size = directory, prefix, shard_size
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def write(self, key: str, sample: dict[str, bytes]) -> None:
        """Add one sample; its files are `key.ext` in sorted extension order, as webdataset writes them."""
        if self._tar is None or self._count == self.shard_size:
            self._open_next()
        for ext in sorted(sample):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(sample[ext]), 0o444
            self._tar.addfile(info, io.BytesIO(sample[ext]))
        self._count += 1

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self._tar = tarfile.open(self.directory / (name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def close(self) -> None:
        """Finish the current shard and give it its final name."""
        if self._tar is not None:
            self._tar.close()
            name = self.shards[-1]
            commit_file(self.directory / (name + ".tmp"), self.directory / name)
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map(fn: Callable, jobs: list, workers: int) -> Iterator:
    """fn over jobs in order, by `workers` threads.

    Threads suit drawing (PIL releases the GIL) and espeak-ng (each job is a subprocess). H.264 encoding holds the
    GIL, so clips gain nothing from threads; processes did not pay either on 2 cores, since each worker must
    import the `data` package (seconds), so clips are made in this thread.
    """
    if workers <= 1 or len(jobs) < 64:
        yield from map(fn, jobs)
        return
    with ThreadPool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=max(1, min(32, len(jobs) // (8 * workers))))


def _progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="sample")


GENERATING_MARKER = ".generating"


def generate(
    kind: str,
    out: str | Path,
    *,
    train: int | None = None,
    heldout: int | None = None,
    seed: int = 0,
    size: int = 64,
    frames: int = 16,
    fps: int = 8,
    workers: int | None = None,
    shard_size: int = SHARD_SIZE,
    progress: bool = False,
) -> dict:
    """Write one kind (images, video or speech) under out/<kind>/ and return its manifest; skip if already made."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; have {KINDS}")
    if kind == "speech":
        espeak_path()  # fail before any work when espeak-ng is missing
    default_train, default_heldout = DEFAULT_COUNTS[kind]
    counts = {
        "train": default_train if train is None else train,
        "heldout": default_heldout if heldout is None else heldout,
    }
    args = {"version": VERSION, "seed": seed, "counts": counts, "shard_size": shard_size}
    if kind in ("images", "video"):
        args["size"] = size
    if kind == "video":
        args.update(frames=frames, fps=fps)
    directory = Path(out) / kind
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        shards = [s for split in old.get("splits", {}).values() for s in split["shards"]]
        if old.get("args") == args and all((directory / s).exists() for s in shards):
            old["skipped"] = True
            return old
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # written last: its presence marks a complete kind
    # Marks a kind whose generation has not finished, so an interrupted run is redone rather than trained on.
    in_progress = directory / GENERATING_MARKER
    in_progress.touch()
    for stale in list(directory.glob("*.tar")) + list(directory.glob("*.tar.tmp")):
        stale.unlink()
    workers = (os.cpu_count() or 1) if workers is None else workers

    splits = {}
    resampler = _Resampler() if kind == "speech" else None
    for split in SPLITS:
        if kind == "images":
            jobs, fn = image_jobs(split, counts[split], seed, counts["heldout"], size), _render_image
        elif kind == "video":
            jobs, fn = video_jobs(split, counts[split], seed, size, frames, fps), _render_clip
        else:
            jobs, fn = speech_jobs(split, counts[split], seed, counts["heldout"]), _speak_job
        with ShardWriter(directory, split, shard_size) as writer:
            results = _progress(
                _map(fn, jobs, 1 if kind == "video" else workers), len(jobs), f"{kind}/{split}", progress
            )
            for index, (job, result) in enumerate(zip(jobs, results, strict=True)):
                if resampler is not None:
                    flac, seconds = resampler(result)
                    meta = dict(job, sample_rate=SAMPLE_RATE, duration=round(seconds, 4))
                    result = {"flac": flac, "txt": job["text"].encode(), "json": _dumps(meta)}
                writer.write(f"{split}-{index:06d}", result)
        splits[split] = {"count": len(jobs), "shards": writer.shards}

    if kind == "images":
        atomic_write_text(directory / TAGS_FILE, "".join(f"{tag}\n" for tag in TAGS))
    manifest = {"kind": kind, "args": args, "splits": splits}
    if kind == "speech":
        manifest["sample_rate"] = SAMPLE_RATE
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    in_progress.unlink()
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m data.synthetic {images,video,speech,all} --out DIR ..."""
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=(*KINDS, "all"))
    parser.add_argument("--out", required=True, help="output directory; shards go to OUT/<kind>/")
    parser.add_argument("--train", type=int, default=None, help=f"train samples (default {DEFAULT_COUNTS})")
    parser.add_argument("--heldout", type=int, default=None, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image and frame side in pixels")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--fps", type=int, default=8, help="frame rate of clips")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker threads for images and speech (default: CPU count)"
    )
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per tar shard")
    a = parser.parse_args(argv)
    for kind in KINDS if a.kind == "all" else (a.kind,):
        manifest = generate(
            kind,
            a.out,
            train=a.train,
            heldout=a.heldout,
            seed=a.seed,
            size=a.size,
            frames=a.frames,
            fps=a.fps,
            workers=a.workers,
            shard_size=a.shard_size,
            progress=True,
        )
        counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
        state = "up to date" if manifest.get("skipped") else "written"
        print(f"{kind}: {counts} ({state}) in {Path(a.out) / kind}", flush=True)


if __name__ == "__main__":
    main()
