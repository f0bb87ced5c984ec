"""Images for the vision GLMs (GLM-4.1V, GLM-4.5V, GLM-4.6V): where people give them (OpenAI `image_url` parts:
data: URLs, local paths, http(s) URLs when allowed), bounded and decoded with Pillow, preprocessed exactly as
transformers' Glm4vImageProcessor (PIL backend) does, and the prompt ids with each image's <|image|> placeholder
expanded to one token per merged patch (Glm4vProcessor). No model code: the vision tower lives in vision.py.

Preprocessing: RGB (transparency over white) -> smart resize to multiples of patch x merge within the
checkpoint's min / max pixels (bicubic) -> x / 255 -> (x - mean) / std -> patches of 3 x temporal x patch x patch
values (the still image repeated over the temporal pair), ordered merge window by merge window.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmkit.config import VisionConfig
from glmkit.errors import GlmkitError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Limits:
    """What one request may send: images, encoded bytes per image, decoded pixels per image; remote URLs only
    when allowed (glmkit serve --allow-image-urls), fetched within `timeout` seconds; local files only where the
    caller is the machine's user (Python, the CLI), never from a server's clients."""
    max_images: int = 8
    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    allow_remote: bool = False
    timeout: float = 10.0
    allow_files: bool = True


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's preprocessor_config.json (Glm4vImageProcessor's settings), with its defaults."""
    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def of(cls, settings: dict[str, Any] | None, vision: VisionConfig) -> "Preprocessing":
        s = settings or {}
        size = s.get("size") or {}
        return cls(min_pixels=int(size.get("shortest_edge", s.get("min_pixels", cls.min_pixels))),
                   max_pixels=int(size.get("longest_edge", s.get("max_pixels", cls.max_pixels))),
                   patch_size=int(s.get("patch_size", vision.patch_size)),
                   temporal_patch_size=int(s.get("temporal_patch_size", vision.temporal_patch_size)),
                   merge_size=int(s.get("merge_size", vision.spatial_merge_size)),
                   mean=tuple(s.get("image_mean", CLIP_MEAN)), std=tuple(s.get("image_std", CLIP_STD)),
                   rescale_factor=float(s.get("rescale_factor", 1 / 255)))


@dataclass(eq=False)
class Image:
    """One preprocessed image: pixels (N, P) float32, its patch grid (t, h, w), a digest of its pixels (prefix
    reuse tells images apart by it), its placeholder id and how many tokens stand for it."""
    pixels: torch.Tensor
    grid: tuple[int, int, int]
    digest: str
    token_id: int
    tokens: int
    features: torch.Tensor | None = field(default=None, repr=False)  # the vision tower's output, set once


class ImagePrompt(list):
    """Prompt ids (a list, so everything that takes ids takes it) carrying the images its placeholders stand for."""

    def __init__(self, ids: list[int], images: list[Image]):
        super().__init__(ids)
        self.images = images


def smart_resize(height: int, width: int, p: Preprocessing) -> tuple[int, int]:
    """The size an image is resized to: multiples of patch x merge, its pixel count within [min, max] pixels,
    its aspect ratio kept as near as that allows (Glm4vImageProcessor's rule, for a still image)."""
    factor, frames = p.patch_size * p.merge_size, p.temporal_patch_size
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise GlmkitError(f"an image of {width}x{height} pixels is too elongated (aspect ratio over 200); crop it.")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if frames * h * w > p.max_pixels:
        beta = math.sqrt(frames * height * width / p.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h * w < p.min_pixels:
        beta = math.sqrt(p.min_pixels / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(picture, p: Preprocessing) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A PIL image -> pixels (h w, 3 T P P) float32 and its grid (1, h, w) in patches."""
    from PIL import Image as PILImage

    if "A" in picture.getbands() or picture.info.get("transparency") is not None:  # transparency over white
        rgba = picture.convert("RGBA")
        picture = PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    picture = picture.convert("RGB")
    height, width = smart_resize(picture.height, picture.width, p)
    picture = picture.resize((width, height), PILImage.BICUBIC)
    x = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
    x = (x.double() * p.rescale_factor).float()  # (3, H, W), rounded as numpy does it
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (p.mean, p.std))  # (3, 1, 1)
    x = (x - mean) / std
    P, M, T = p.patch_size, p.merge_size, p.temporal_patch_size
    gh, gw = height // P, width // P
    x = x.reshape(3, gh // M, M, P, gw // M, M, P).permute(1, 4, 2, 5, 0, 3, 6)  # windows, then patches in them
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], T, P, P)  # a still image fills both frames of a temporal patch
    return x.reshape(gh * gw, 3 * T * P * P).contiguous(), (1, gh, gw)


def read(url: str, limits: Limits) -> bytes:
    """The bytes an image_url names: a data: URL, a local path (or file: URL), or http(s) when allowed."""
    if not isinstance(url, str) or not url:
        raise GlmkitError("an image_url part needs a url: a data: URL, a local file path or an http(s) URL.")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise GlmkitError("an image data: URL must be base64 encoded (data:image/png;base64,...).")
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise GlmkitError(f"an image is larger than {limits.max_bytes >> 20} MB; send a smaller one.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise GlmkitError("an image data: URL holds invalid base64.") from None
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        return _fetch(url, limits)
    if not limits.allow_files:
        raise GlmkitError("this server takes images as data: URLs (or http(s) URLs when started with "
                          "--allow-image-urls), not as file paths.")
    path = Path(urllib.parse.urlparse(url).path if scheme == "file" else url).expanduser()
    if not path.is_file():
        raise GlmkitError(f"image {url!r} is not a data: URL, an http(s) URL or an existing file.")
    if path.stat().st_size > limits.max_bytes:
        raise GlmkitError(f"image {url!r} is larger than {limits.max_bytes >> 20} MB; send a smaller one.")
    return path.read_bytes()


def _fetch(url: str, limits: Limits) -> bytes:
    if not limits.allow_remote:
        raise GlmkitError("image URLs over http(s) are not fetched by this server (start it with "
                          "--allow-image-urls); send the image as a data: URL instead.")
    try:
        with urllib.request.urlopen(url, timeout=limits.timeout) as response:  # noqa: S310 - http(s) only here
            data = response.read(limits.max_bytes + 1)
    except OSError as e:
        raise GlmkitError(f"image {url!r} could not be fetched ({e}).") from None
    if len(data) > limits.max_bytes:
        raise GlmkitError(f"image {url!r} is larger than {limits.max_bytes >> 20} MB; send a smaller one.")
    return data


def decode(data: bytes, limits: Limits):
    """Encoded bytes -> a PIL image, fully read; a corrupt or non-image file, or one over the pixel limit (a
    decompression bomb), is a clear error."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        picture = PILImage.open(io.BytesIO(data))
        if picture.width * picture.height > limits.max_pixels:
            raise GlmkitError(f"an image of {picture.width}x{picture.height} pixels is over the limit of "
                              f"{limits.max_pixels:,} pixels; send a smaller one.")
        picture.load()
        return picture
    except GlmkitError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
        raise GlmkitError(f"an image could not be read ({type(e).__name__}); send a PNG, JPEG, GIF or WebP "
                          "file.") from None


def load(url: str, p: Preprocessing, vision: VisionConfig, limits: Limits) -> Image:
    """An image_url -> a preprocessed Image."""
    pixels, grid = preprocess(decode(read(url, limits), limits), p)
    tokens = grid[0] * grid[1] * grid[2] // p.merge_size ** 2
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:32]
    return Image(pixels, grid, digest, vision.image_token_id, tokens)


def image_url(part: dict) -> str:
    """The URL of an OpenAI image part ({'type': 'image_url', 'image_url': {'url': ...}}, or the plain forms
    {'type': 'image', 'image': / 'url': ...})."""
    value = part.get("image_url", part.get("image", part.get("url")))
    return value.get("url") if isinstance(value, dict) else value


def chat_prompt(messages: list[dict], render, vision: VisionConfig | None, preprocessor: dict | None,
                limits: Limits, templated: bool) -> list[int]:
    """render(messages) -> ids, for messages that may hold image parts: each image read, checked and
    preprocessed, its placeholder expanded; an ImagePrompt then, plain ids otherwise."""
    from glmkit.chat import split_images

    plain, parts = split_images(messages)
    if not parts or vision is None:  # a text-only model's format says why it cannot take an image part
        return render(messages)
    if not templated:
        raise GlmkitError("images need the checkpoint's own chat template (chat_template.jinja), which this "
                          "checkpoint lacks; add it next to config.json.")
    if len(parts) > limits.max_images:
        raise GlmkitError(f"a request may hold at most {limits.max_images} images; it holds {len(parts)}.")
    settings = Preprocessing.of(preprocessor, vision)
    return expand(render(plain), [load(image_url(part), settings, vision, limits) for part in parts])


def expand(ids: list[int], images: list[Image]) -> ImagePrompt:
    """Rendered prompt ids holding one placeholder per image -> each placeholder repeated once per image token."""
    token = images[0].token_id
    if ids.count(token) != len(images):
        raise GlmkitError(f"the chat template placed {ids.count(token)} image placeholder(s) for {len(images)} "
                          "image(s); images can go in user messages only.")
    out, it = [], iter(images)
    for i in ids:
        out += [token] * next(it).tokens if i == token else [i]
    return ImagePrompt(out, images)
