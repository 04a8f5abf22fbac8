"""The embedded demo world: a zoo of image classification tasks made only from what pip
packages ship, so the whole system can run on a fresh machine without a download.

Families of clearly different domains, each with several tasks:

* ``script_<group>``: glyphs of one writing system rendered from the Noto fonts in
  ``manimgx-fonts`` (one task per script, classes = letters), plus one task per group whose
  classes are the scripts themselves. Scripts are grouped by lineage (western alphabets,
  Semitic, north/south Brahmic, South-East Asian), so the zoo has structure inside the glyphs.
* ``digits``: subsets of scikit-learn's handwritten digits (8×8 scans, bundled with it).
* ``texture``: patches of grey-level textures and micrographs from ``skimage.data``.
* ``photo``: patches of colour photographs from ``skimage.data`` and scikit-learn.
* ``shapes``: geometric shapes drawn with Pillow on random colours.

Every image is augmented (rotation, scale, shift, contrast, noise) with a random generator
seeded by (world seed, task, split, class, index), so the same preset always writes the same
bytes. Tasks are written as ImageFolder trees ``<root>/demo-data/tasks/<task>/{train,test}/
<class>/<i>.png`` with a ``family.txt`` for registration. A task folder carries a hidden
fingerprint of what produced it; a folder with the right fingerprint is reused, anything
else is regenerated. Locally a task is built in a hidden folder and renamed into place, so a
killed run never leaves a half-written task that looks complete.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2v_core.storage import StorageRoot

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
TASKS_DIR = "demo-data/tasks"
FINGERPRINT = ".world.json"  # hidden: not part of the task's content hash
_CANVAS = 4  # shapes and glyphs are drawn at this multiple of the image size, then reduced


@dataclass(frozen=True)
class WorldConfig:
    """How much of the world to make and at what size."""

    preset: str = "default"
    image_size: int = 32
    n_train: int = 32  # images per class
    n_test: int = 16  # images per class, at least; see min_test_per_task
    # Small tasks get more test images per class: a 2-class task with 16 per class measures
    # error in steps of 3 %, so which of two near-equal experts "wins" would be a coin flip
    # and every selector's distance from the oracle would mostly measure that noise.
    min_test_per_task: int = 192
    max_tasks_per_family: int | None = None
    max_classes: int = 16
    seed: int = 0


PRESETS: dict[str, WorldConfig] = {
    "default": WorldConfig(),
    "small": WorldConfig(preset="small", n_train=12, n_test=8, min_test_per_task=24,
                         max_tasks_per_family=2, max_classes=6),
}
SMALL_FAMILIES = ("script_western", "script_brahmic_north", "digits", "texture", "photo",
                  "shapes")


@dataclass(frozen=True)
class DemoTask:
    """One task of the world. ``sources`` holds, per class, what its images are drawn from
    (``script:codepoint`` for a letter, a script, digits, a source image, a shape)."""

    task_id: str
    family: str
    kind: str  # glyph | script | digits | texture | photo | shape
    classes: tuple[str, ...]
    sources: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class BuildReport:
    tasks_uri: str
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    @property
    def task_ids(self) -> list[str]:
        return sorted(self.built + self.cached)


# --------------------------------------------------------------------------- sources

# script: (font file in manimgx_fonts, code point ranges of its letters)
SCRIPTS: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "latin": ("NotoSans[wght].ttf", ((0x41, 0x5A), (0x61, 0x7A))),
    "greek": ("NotoSans[wght].ttf", ((0x391, 0x3A9), (0x3B1, 0x3C9))),
    "cyrillic": ("NotoSans[wght].ttf", ((0x410, 0x44F),)),
    "armenian": ("NotoSansArmenian[wght].ttf", ((0x531, 0x556), (0x561, 0x586))),
    "georgian": ("NotoSansGeorgian[wght].ttf", ((0x10D0, 0x10FA),)),
    "hebrew": ("NotoSansHebrew[wght].ttf", ((0x5D0, 0x5EA),)),
    "arabic": ("NotoSansArabic[wght].ttf", ((0x621, 0x64A),)),
    "ethiopic": ("NotoSansEthiopic[wght].ttf", ((0x1200, 0x1357),)),
    "devanagari": ("NotoSansDevanagari[wght].ttf", ((0x905, 0x939),)),
    "bengali": ("NotoSansBengali[wght].ttf", ((0x985, 0x9B9),)),
    "gujarati": ("NotoSansGujarati[wght].ttf", ((0xA85, 0xAB9),)),
    "gurmukhi": ("NotoSansGurmukhi[wght].ttf", ((0xA05, 0xA39),)),
    "oriya": ("NotoSansOriya[wght].ttf", ((0xB05, 0xB39),)),
    "tamil": ("NotoSansTamil[wght].ttf", ((0xB85, 0xBB9),)),
    "telugu": ("NotoSansTelugu[wght].ttf", ((0xC05, 0xC39),)),
    "kannada": ("NotoSansKannada[wght].ttf", ((0xC85, 0xCB9),)),
    "malayalam": ("NotoSansMalayalam[wght].ttf", ((0xD05, 0xD39),)),
    "sinhala": ("NotoSansSinhala[wght].ttf", ((0xD85, 0xDC6),)),
    "thai": ("NotoSansThai[wght].ttf", ((0xE01, 0xE2E),)),
    "lao": ("NotoSansLao[wght].ttf", ((0xE81, 0xEAE),)),
    "khmer": ("NotoSansKhmer[wght].ttf", ((0x1780, 0x17A2),)),
    "myanmar": ("NotoSansMyanmar[wght].ttf", ((0x1000, 0x102A),)),
}
SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    "western": ("latin", "greek", "cyrillic", "armenian", "georgian"),
    "semitic": ("hebrew", "arabic", "ethiopic"),
    "brahmic_north": ("devanagari", "bengali", "gujarati", "gurmukhi", "oriya"),
    "brahmic_south": ("tamil", "telugu", "kannada", "malayalam", "sinhala"),
    "southeast_asian": ("thai", "lao", "khmer", "myanmar"),
}
# grey-level textures and micrographs; colour photographs (module:function)
TEXTURES = ("brick", "grass", "gravel", "moon", "cell", "coins", "binary_blobs",
            "microaneurysms")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "china", "flower")
SHAPES = ("circle", "ring", "triangle", "square", "pentagon", "hexagon", "star", "cross",
          "rhombus", "arrow", "crescent")
DIGIT_TASKS: dict[str, tuple[str, ...]] = {
    "all": tuple("0123456789"),
    "0to4": tuple("01234"),
    "5to9": tuple("56789"),
    "3v8": ("3", "8"),
    "4v9": ("4", "9"),
    "1v7": ("1", "7"),
    "5v6": ("5", "6"),
    "0v6v9": ("0", "6", "9"),
    "2v3v5v8": ("2", "3", "5", "8"),
    "parity": ("02468", "13579"),
}
_DIGIT_CLASS_NAMES = {"02468": "even", "13579": "odd"}
# subsets of the patch sources: (task name, source indices)
_TEXTURE_TASKS = (("brick-grass", (0, 1)), ("grass-gravel", (1, 2)), ("brick-gravel-moon", (0, 2, 3)),
                  ("cell-coins-blobs", (4, 5, 6)), ("micro-cell-moon", (7, 4, 3)),
                  ("natural4", (0, 1, 2, 3)), ("all8", tuple(range(8))))
_PHOTO_TASKS = (("astronaut-rocket", (0, 3)), ("cat-coffee", (1, 2)),
                ("china-flower", (7, 8)), ("space-medical", (4, 5, 6)),
                ("everyday4", (0, 1, 2, 7)), ("mixed6", (0, 2, 4, 5, 6, 8)),
                ("all9", tuple(range(9))))
_SHAPE_TASKS = (("circle-square", (0, 3)), ("polygons", (2, 3, 4, 5)), ("round", (0, 1, 10)),
                ("pointy", (6, 7, 9, 2)), ("tilted", (8, 3, 7)), ("all11", tuple(range(11))))


def _font_dir() -> Path:
    import manimgx_fonts

    return Path(manimgx_fonts.__file__).parent


@functools.lru_cache(maxsize=64)
def _font(font_file: str, weight: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.truetype(str(_font_dir() / font_file), 96)
    try:
        axes = font.get_variation_axes()
        font.set_variation_by_axes(
            [min(max(weight, a["minimum"]), a["maximum"]) for a in axes]
        )
    except (OSError, AttributeError):  # not a variable font: one weight only
        pass
    return font


@functools.lru_cache(maxsize=8192)
def _glyph_mask(font_file: str, weight: int, char: str) -> np.ndarray:
    """The glyph's coverage (0–255) cropped to its ink, at the font's fixed size."""
    font = _font(font_file, weight)
    left, top, right, bottom = font.getbbox(char)
    img = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(img).text((4 - left, 4 - top), char, font=font, fill=255)
    box = img.getbbox()
    return np.asarray(img.crop(box) if box else img)


@functools.lru_cache(maxsize=64)
def script_letters(script: str) -> tuple[str, ...]:
    """The letters of ``script`` its font really draws (no fallback box, visible ink)."""
    font_file, ranges = SCRIPTS[script]
    missing = _glyph_mask(font_file, 400, "\U0010fffd")
    out = []
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if unicodedata.category(ch) not in ("Lu", "Ll", "Lo"):
                continue
            mask = _glyph_mask(font_file, 400, ch)
            if mask.shape == missing.shape and np.array_equal(mask, missing):
                continue
            if mask.size < 64 or int((mask > 127).sum()) < 20:
                continue
            out.append(ch)
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _patch_source(name: str) -> np.ndarray:
    """A uint8 H×W or H×W×3 image bundled with scikit-image or scikit-learn."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    if name == "binary_blobs":
        arr = skimage.data.binary_blobs(length=512, blob_size_fraction=0.08, rng=7)
    else:
        arr = getattr(skimage.data, name)()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr * 255 if arr.max() <= 1 else arr, 0, 255).astype(np.uint8)
    return arr


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(int)


def _digit_pool(digit: int, split: str) -> np.ndarray:
    """Indices of ``digit`` in the split: every third scan is held out for testing."""
    _, target = _digits()
    idx = np.flatnonzero(target == digit)
    return idx[np.arange(len(idx)) % 3 == 2] if split == "test" else idx[np.arange(len(idx)) % 3 != 2]


# --------------------------------------------------------------------------- the plan


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _slug(name: str) -> str:
    return name.replace("_", "-")


def plan_world(config: WorldConfig | str = "default") -> list[DemoTask]:
    """Every task of the world for ``config`` (a preset name or a config), sorted by id."""
    cfg = PRESETS[config] if isinstance(config, str) else config
    rng = np.random.default_rng([cfg.seed, _crc("plan")])
    tasks: list[DemoTask] = []
    for group, scripts in SCRIPT_GROUPS.items():
        family = f"script_{group}"
        tasks.append(DemoTask(f"{family}__which-script", family, "script", scripts, scripts))
        for script in scripts:
            letters = script_letters(script)
            k = int(rng.integers(6, 17))
            chosen = sorted(rng.choice(len(letters), size=min(k, len(letters)), replace=False))
            chars = [letters[i] for i in chosen]
            tasks.append(DemoTask(
                f"{family}__{script}", family, "glyph",
                tuple(f"u{ord(c):04x}" for c in chars),
                tuple(f"{script}:{ord(c):x}" for c in chars),
            ))
    for name, digits in DIGIT_TASKS.items():
        classes = tuple(_DIGIT_CLASS_NAMES.get(d, d) for d in digits)
        tasks.append(DemoTask(f"digits__{name}", "digits", "digits", classes, digits))
    for family, kind, pool, subsets in (("texture", "texture", TEXTURES, _TEXTURE_TASKS),
                                        ("photo", "photo", PHOTOS, _PHOTO_TASKS),
                                        ("shapes", "shape", SHAPES, _SHAPE_TASKS)):
        for name, idx in subsets:
            names = tuple(pool[i] for i in idx)
            tasks.append(DemoTask(f"{family}__{name}", family, kind,
                                  tuple(_slug(n) for n in names), names))
    if cfg.preset == "small":
        tasks = [t for t in tasks if t.family in SMALL_FAMILIES]
    tasks = [_cap_classes(t, cfg.max_classes) for t in tasks]
    if cfg.max_tasks_per_family is not None:
        kept: dict[str, int] = {}
        capped = []
        for t in tasks:  # plan order: the family's first tasks
            if kept.get(t.family, 0) < cfg.max_tasks_per_family:
                kept[t.family] = kept.get(t.family, 0) + 1
                capped.append(t)
        tasks = capped
    return sorted(tasks, key=lambda t: t.task_id)


def _cap_classes(task: DemoTask, max_classes: int) -> DemoTask:
    if task.n_classes <= max_classes:
        return task
    return DemoTask(task.task_id, task.family, task.kind, task.classes[:max_classes],
                    task.sources[:max_classes])


# --------------------------------------------------------------------------- rendering


def _noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma * 255.0, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), img.mode)


def _place(mask: Image.Image, size: int, rng: np.random.Generator, fill_frac: tuple[float, float],
           angle: float) -> Image.Image:
    """``mask`` scaled so its longer side covers a random fraction of a canvas of ``size``,
    rotated by ``angle`` and pasted at a random offset; returns the canvas mask."""
    side = rng.uniform(*fill_frac) * size
    scale = side / max(mask.size)
    w, h = max(1, round(mask.width * scale)), max(1, round(mask.height * scale))
    glyph = mask.resize((w, h), Image.Resampling.BICUBIC).rotate(
        angle, resample=Image.Resampling.BICUBIC, expand=True)
    canvas = Image.new("L", (size, size), 0)
    jitter = 0.08 * size
    x = (size - glyph.width) / 2 + rng.uniform(-jitter, jitter)
    y = (size - glyph.height) / 2 + rng.uniform(-jitter, jitter)
    canvas.paste(glyph, (round(x), round(y)))
    return canvas


def _compose(coverage: Image.Image, fg, bg, out_size: int) -> Image.Image:
    """Colour ``fg`` where coverage is 255, ``bg`` where 0; reduced to ``out_size``."""
    mode = "RGB" if isinstance(fg, tuple) else "L"
    base = Image.new(mode, coverage.size, bg)
    base.paste(Image.new(mode, coverage.size, fg), (0, 0), coverage)
    return base.resize((out_size, out_size), Image.Resampling.LANCZOS)


def _render_char(script: str, char: str, size: int, rng: np.random.Generator) -> Image.Image:
    font_file, _ = SCRIPTS[script]
    weight = int(rng.choice([400, 550, 700]))
    mask = Image.fromarray(_glyph_mask(font_file, weight, char))
    canvas = _place(mask, _CANVAS * size, rng, (0.55, 0.85), rng.uniform(-15, 15))
    ink, paper = int(rng.integers(0, 70)), int(rng.integers(190, 256))
    img = _compose(canvas, ink, paper, size)
    return _noise(img, rng, 0.03).convert("RGB")


def _render_glyph(source: str, size: int, rng: np.random.Generator) -> Image.Image:
    script, cp = source.split(":")
    return _render_char(script, chr(int(cp, 16)), size, rng)


def _render_script(source: str, size: int, rng: np.random.Generator) -> Image.Image:
    letters = script_letters(source)
    return _render_char(source, letters[int(rng.integers(len(letters)))], size, rng)


def _render_digit(source: str, size: int, rng: np.random.Generator, split: str) -> Image.Image:
    images, _ = _digits()
    digit = int(source[int(rng.integers(len(source)))])
    pool = _digit_pool(digit, split)
    scan = Image.fromarray(np.rint(images[pool[int(rng.integers(len(pool)))]] * 255).astype(np.uint8))
    big = _CANVAS * size
    scan = scan.resize((big, big), Image.Resampling.BICUBIC)
    img = _place(scan, big, rng, (0.8, 1.0), rng.uniform(-12, 12))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return _noise(img, rng, 0.04).convert("RGB")


def _render_patch(source: str, size: int, rng: np.random.Generator, split: str,
                  texture: bool) -> Image.Image:
    """A random crop of a source image; train crops come from its left 70 %, test crops from
    the rest, so no test pixel was seen in training."""
    arr = _patch_source(source)
    h, w = arr.shape[:2]
    side = int(rng.uniform(0.12, 0.28) * min(h, w))
    x0, x1 = (0, int(0.7 * w) - side) if split == "train" else (int(0.7 * w), w - side)
    x = int(rng.integers(x0, max(x0, x1) + 1))
    y = int(rng.integers(0, h - side + 1))
    img = Image.fromarray(arr[y : y + side, x : x + side])
    img = img.convert("L" if texture else "RGB")
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if texture:
        img = img.rotate(90 * int(rng.integers(4)))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-15, 15)
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) * gain + offset, 0, 255)
                          .astype(np.uint8), img.mode)
    return _noise(img, rng, 0.02).convert("RGB")


def _shape_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices on the unit square (centre 0.5) before rotation; None for round shapes."""
    def regular(n: int, r: float = 0.5, start: float = -np.pi / 2):
        t = start + 2 * np.pi * np.arange(n) / n
        return list(zip(0.5 + r * np.cos(t), 0.5 + r * np.sin(t), strict=True))

    if shape == "triangle":
        return regular(3)
    if shape == "square":
        return [(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9)]
    if shape == "pentagon":
        return regular(5)
    if shape == "hexagon":
        return regular(6)
    if shape == "star":
        outer, inner = regular(5), regular(5, 0.2, -np.pi / 2 + np.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = 0.35, 0.65
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b),
                (0, a), (a, a)]
    if shape == "rhombus":
        return [(0.5, 0.0), (0.8, 0.5), (0.5, 1.0), (0.2, 0.5)]
    if shape == "arrow":
        return [(0, 0.35), (0.55, 0.35), (0.55, 0.1), (1, 0.5), (0.55, 0.9), (0.55, 0.65),
                (0, 0.65)]
    return None


def _render_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    s = 128
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    poly = _shape_polygon(shape)
    if poly is not None:
        draw.polygon([(x * (s - 1), y * (s - 1)) for x, y in poly], fill=255)
    elif shape == "circle":
        draw.ellipse((0, 0, s - 1, s - 1), fill=255)
    elif shape == "ring":
        draw.ellipse((0, 0, s - 1, s - 1), fill=255)
        draw.ellipse((0.28 * s, 0.28 * s, 0.72 * s, 0.72 * s), fill=0)
    elif shape == "crescent":
        draw.ellipse((0, 0, s - 1, s - 1), fill=255)
        draw.ellipse((0.3 * s, -0.05 * s, 1.25 * s, 0.95 * s), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    canvas = _place(mask, _CANVAS * size, rng, (0.45, 0.8), rng.uniform(0, 360))
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int((b + rng.integers(80, 177)) % 256) for b in bg)  # keeps a contrast
    return _noise(_compose(canvas, fg, bg, size), rng, 0.03)


def render_image(task: DemoTask, class_index: int, split: str, index: int,
                 config: WorldConfig) -> Image.Image:
    """Image ``index`` of one class and split: a pure function of its arguments."""
    rng = np.random.default_rng(
        [config.seed, _crc(task.task_id), _crc(split), class_index, index])
    source, size = task.sources[class_index], config.image_size
    if task.kind == "glyph":
        return _render_glyph(source, size, rng)
    if task.kind == "script":
        return _render_script(source, size, rng)
    if task.kind == "digits":
        return _render_digit(source, size, rng, split)
    if task.kind in ("texture", "photo"):
        return _render_patch(source, size, rng, split, texture=task.kind == "texture")
    if task.kind == "shape":
        return _render_shape(source, size, rng)
    raise ValueError(f"task {task.task_id}: unknown kind {task.kind!r}")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def test_per_class(task: DemoTask, config: WorldConfig) -> int:
    """Test images per class: ``n_test``, raised so the task has ``min_test_per_task``."""
    return max(config.n_test, -(-config.min_test_per_task // task.n_classes))


def task_files(task: DemoTask, config: WorldConfig) -> Iterable[tuple[str, bytes]]:
    """(path relative to the task folder, bytes) of every file of the task."""
    yield "family.txt", f"{task.family}\n".encode()
    for split, count in (("train", config.n_train), ("test", test_per_class(task, config))):
        for c, cls in enumerate(task.classes):
            for i in range(count):
                yield f"{split}/{cls}/{i:04d}.png", _png(render_image(task, c, split, i, config))


# --------------------------------------------------------------------------- building


def fingerprint(task: DemoTask, config: WorldConfig) -> str:
    """What a task folder was made from; any change means the folder is made again."""
    import PIL

    from_fonts = task.kind in ("glyph", "script")
    payload = {
        "generator": GENERATOR_VERSION,
        "task": asdict(task),
        "image_size": config.image_size,
        "n_train": config.n_train,
        "n_test": test_per_class(task, config),
        "seed": config.seed,
        "pillow": PIL.__version__,
        "fonts": _fonts_version() if from_fonts else None,
    }
    return json.dumps(payload, sort_keys=True)


def _fonts_version() -> str:
    from importlib.metadata import version

    return version("manimgx-fonts")


def _is_current(root: StorageRoot, rel: str, expected: str) -> bool:
    marker = f"{rel}/{FINGERPRINT}"
    return root.exists(marker) and root.read_bytes(marker).decode() == expected


def _write_local(target: Path, files: Iterable[tuple[str, bytes]], marker: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        for rel, data in files:
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (tmp / FINGERPRINT).write_text(marker)
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_remote(root: StorageRoot, rel: str, files: Iterable[tuple[str, bytes]],
                  marker: str) -> None:
    # Object stores have no rename: drop a stale marker first and write the new one last,
    # so the task only counts as complete once every file is there.
    marker_rel = f"{rel}/{FINGERPRINT}"
    if root.exists(rel):
        root.fs.rm(root._abs(rel), recursive=True)
    for file_rel, data in files:
        root.write_bytes_atomic(f"{rel}/{file_rel}", data)
    root.write_bytes_atomic(marker_rel, marker.encode())


def build_task(root: StorageRoot | str, task: DemoTask, config: WorldConfig) -> bool:
    """Write one task folder unless it is already there from the same inputs; True if written."""
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    rel = f"{TASKS_DIR}/{task.task_id}"
    marker = fingerprint(task, config)
    if _is_current(root, rel, marker):
        return False
    if root.local:
        _write_local(Path(root.path) / rel, task_files(task, config), marker)
    else:
        _write_remote(root, rel, task_files(task, config), marker)
    return True


def tasks_uri(root: StorageRoot | str) -> str:
    """Where the world's task folders live (the ``--folders`` of ``register_zoo``)."""
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    return root.join(TASKS_DIR)


def build_world(
    root: StorageRoot | str,
    config: WorldConfig | str = "default",
    *,
    progress: Callable[[Sequence[DemoTask]], Iterable[DemoTask]] | None = None,
) -> BuildReport:
    """Make every task folder of the world under ``root`` (reusing current ones).

    Folders of tasks that are not in the plan are left alone: the world only adds.
    """
    cfg = PRESETS[config] if isinstance(config, str) else config
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    plan = plan_world(cfg)
    report = BuildReport(tasks_uri(root))
    for task in progress(plan) if progress else plan:
        (report.built if build_task(root, task, cfg) else report.cached).append(task.task_id)
    log.info("demo world %s: %d tasks built, %d reused", cfg.preset, len(report.built),
             len(report.cached))
    return report


def representative_tasks(tasks: Iterable, per_family: int = 1) -> list[str]:
    """Per family, the task(s) with the most classes (ties by id): the sources of experts
    that cover every family. Accepts any objects with task_id, family, n_classes."""
    by_family: dict[str, list] = {}
    for t in tasks:
        by_family.setdefault(t.family, []).append(t)
    out = []
    for family in sorted(by_family):
        ranked = sorted(by_family[family], key=lambda t: (-t.n_classes, t.task_id))
        out.extend(t.task_id for t in ranked[:per_family])
    return sorted(out)
