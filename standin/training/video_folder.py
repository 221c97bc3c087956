"""Real training data: a folder of clips, each with a prompt and a face crop, encoded once.

Layout (one stem per clip)::

    data/
      clip0001.mp4     the video (any size; resized and centre-cropped to the training size)
      clip0001.txt     its prompt
      clip0001.png     the reference face (.png/.jpg/.jpeg), ideally already cropped with a
                       whitened background (`standin.face.FacePreprocessor` does that)

`encode_folder` runs the VAE and text encoder over the folder once and writes one `.pt` file per
clip under `<data>/.latents/<size>/` (each rank encodes its share, then every rank reads them all);
`FolderLatents` then samples batches from those files without touching the VAE again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from standin.errors import InvalidRequestError
from standin.pipeline import StandInPipeline
from standin.training.trainer import LatentBatch
from standin.video import decode_mp4

log = logging.getLogger(__name__)

FACE_SUFFIXES = (".png", ".jpg", ".jpeg")


def find_clips(folder: Path) -> list[tuple[Path, Path, Path]]:
    """(video, prompt, face) per clip; raises naming every clip that lacks its prompt or face."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidRequestError(f"training data folder does not exist: {folder}")
    clips, problems = [], []
    for video in sorted(folder.glob("*.mp4")):
        prompt = video.with_suffix(".txt")
        face = next((video.with_suffix(s) for s in FACE_SUFFIXES if video.with_suffix(s).is_file()), None)
        if not prompt.is_file():
            problems.append(f"{video.name}: missing {prompt.name}")
        if face is None:
            problems.append(f"{video.name}: missing a face image ({video.stem}.png or .jpg)")
        if prompt.is_file() and face is not None:
            clips.append((video, prompt, face))
    if problems:
        raise InvalidRequestError("incomplete training data:\n  " + "\n  ".join(problems))
    if not clips:
        raise InvalidRequestError(f"no .mp4 clips in {folder}")
    return clips


def fit_frames(frames: np.ndarray, width: int, height: int, num_frames: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] → [1, 3, num_frames, height, width] in [-1, 1]: the first `num_frames`
    frames (the clip must have that many), scaled to cover and centre-cropped."""
    if frames.shape[0] < num_frames:
        raise InvalidRequestError(f"clip has {frames.shape[0]} frames, training needs {num_frames}")
    x = torch.from_numpy(frames[:num_frames]).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)[None]


def encode_folder(
    folder: Path, pipe: StandInPipeline, width: int, height: int, num_frames: int
) -> list[Path]:
    """Encode every clip once (cached on disk); returns the latent files, in clip order."""
    clips = find_clips(folder)
    cache_dir = Path(folder) / ".latents" / f"{width}x{height}x{num_frames}_{pipe.preset.name}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    files = [cache_dir / f"{video.stem}.pt" for video, _, _ in clips]
    for i in range(rank, len(clips), world):
        if files[i].is_file():
            continue
        video, prompt, face = clips[i]
        frames = decode_mp4(video.read_bytes())
        with torch.no_grad():
            latents = pipe.vae.encode(fit_frames(frames, width, height, num_frames).to(pipe.device))
            image = np.asarray(Image.open(face).convert("RGB"))
            side = min(image.shape[:2]) // 16 * 16
            identity = pipe.encode_identity(np.ascontiguousarray(image[:side, :side]))
            context = pipe.text_encoder.encode_prompts([prompt.read_text().strip()])
        tmp = files[i].with_suffix(".tmp")
        torch.save({"latents": latents.cpu(), "identity": identity.cpu(), "context": context.cpu()}, tmp)
        tmp.rename(files[i])  # atomic: a crash never leaves a half-written cache entry
        log.info("encoded %s", video.name)
    if world > 1:
        dist.barrier()
    return files


class FolderLatents:
    """Batches from `encode_folder`'s files (read on demand, so the dataset may exceed memory)."""

    def __init__(self, files: list[Path], null_context: torch.Tensor, device: torch.device) -> None:
        self.files = files
        self.null_context = null_context
        self.device = device

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        idx = torch.randint(len(self.files), (batch_size,), generator=generator).tolist()
        items = [torch.load(self.files[i], map_location="cpu", weights_only=True) for i in idx]
        cat = {k: torch.cat([it[k] for it in items]).to(self.device).float() for k in items[0]}
        return LatentBatch(cat["latents"], cat["context"], cat["identity"], None)
