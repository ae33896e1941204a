"""Small builders shared by the tests: tiny images and pairs, a loopback HTTP
server, and an img2dataset run against it. Plain functions (no fixtures), so any
test module can import them without a conftest."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from sanitize.io.pairs import Pair


def make_image(seed: int = 0, size: int = 28, mode: str = "RGB") -> Image.Image:
    """A random-noise image; different seeds give different pixels."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def encode(image: Image.Image, ext: str = "png") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[ext])
    return buffer.getvalue()


def make_pairs(n: int, size: int = 28, seed: int = 0, ext: str = "png") -> list[Pair]:
    """`n` pairs with keys 000000, 000001, …, distinct noise images (PNG: lossless,
    so pixels survive a round trip exactly), captions and a little metadata."""
    pairs = []
    for i in range(n):
        image = make_image(seed * 100_003 + i, size)
        data = encode(image, ext)
        pairs.append(Pair(key=f"{i:06d}", caption=f"a photo of thing {i} (seed {seed})",
                          image=Image.open(io.BytesIO(data)), image_bytes=data, image_ext=ext,
                          meta={"label": i % 10, "url": f"http://example.invalid/{i}.{ext}"}))
    return pairs


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_dir(directory: str | os.PathLike) -> Iterator[str]:
    """Serve `directory` with `python -m http.server` on 127.0.0.1; yields the base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("http.server did not start")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_served_images(directory: Path, n: int, size: int = 24) -> list[str]:
    """Write `n` PNG images served as 0.png, 1.png, …; returns their file names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        make_image(1000 + i, size).save(directory / f"{i}.png")
        names.append(f"{i}.png")
    return names


def run_img2dataset(url_list: str | os.PathLike, out: str | os.PathLike, **options) -> None:
    """img2dataset with the fastest settings for a handful of loopback images."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    settings = dict(input_format="tsv", url_col="url", caption_col="caption", output_format="webdataset",
                    processes_count=1, thread_count=4, image_size=16, resize_mode="border",
                    number_sample_per_shard=4, enable_wandb=False, timeout=5, encode_format="png")
    settings.update(options)
    if settings["encode_format"] == "png":
        settings.setdefault("encode_quality", 6)  # for png it is the zlib level, 0-9
    download(url_list=str(url_list), output_folder=str(out), **settings)


def one_line_error(result, *fragments: str) -> str:
    """A CLI result that failed with exit code 1 and one `error:` line holding every fragment;
    returns that line."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
