"""What ``diffquant generate`` writes and ``compare`` reads back: one image, or a video
pipeline's frames as an animated file (GIF, WebP, PNG) or a folder of numbered PNGs.

Example:
    >>> from PIL import Image
    >>> frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "clip.webp"
    >>> save_output(frames, out, fps=16)
    'webp, 2 frames'
    >>> len(load_frames(out))
    2
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Pillow writes every frame of these; WebP and PNG (APNG) losslessly
ANIMATED = (".gif", ".webp", ".png", ".apng")


def pipeline_output(output):
    """A pipeline call's first result: a PIL image, or a video's list of PIL frames."""
    from PIL import Image

    frames = getattr(output, "frames", None)
    if frames is None:
        return output.images[0]
    video = frames[0]
    if isinstance(video, np.ndarray) or hasattr(video, "numpy"):  # [F, H, W, C] in [0, 1]
        video = np.asarray(video, dtype=np.float32)
        return [Image.fromarray((f * 255).round().clip(0, 255).astype(np.uint8)) for f in video]
    return list(video)


def save_output(result, out: Path, fps: int) -> str:
    """Write ``result`` (image or frames) to ``out``; returns what was written, for messages.
    A path without a suffix is a folder of ``frame_NNNN.png``."""
    frames = result if isinstance(result, list) else [result]
    if not out.suffix:
        out.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            frame.save(out / f"frame_{i:04d}.png")
        return f"folder, {len(frames)} frame" + "s" * (len(frames) != 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(frames) == 1 and not isinstance(result, list):
        result.save(out)
        return out.suffix.lstrip(".")
    extra = {"lossless": True} if out.suffix.lower() == ".webp" else {}
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, **extra)
    return f"{out.suffix.lstrip('.')}, {len(frames)} frames"


def unwritable(out: Path) -> str | None:
    """Why Pillow cannot write ``out`` (its suffix), or None; checked before any work."""
    from PIL import Image

    Image.init()
    if out.suffix and out.suffix.lower() not in Image.EXTENSION:
        return (f"--out {out}: Pillow cannot write {out.suffix!r} files; use .png, .jpg or .webp "
                f"for an image, {', '.join(ANIMATED)} or a folder (no suffix) for a video")
    return None


def load_frames(path: Path) -> list:
    """Every frame (RGB) of an image, an animated file or a folder written by ``save_output``."""
    from PIL import Image, ImageSequence

    if path.is_dir():
        return [Image.open(p).convert("RGB") for p in sorted(path.glob("frame_*.png"))]
    with Image.open(path) as image:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
