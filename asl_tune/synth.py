"""A procedural fingerspelling dataset in the Kaggle ASL Alphabet layout, so the tool runs with no download.

Each class is rendered as one continuous "video": pose, framing, lighting, skin and background drift
smoothly with the frame number, plus a little per-frame jitter, so neighbouring frames are near-copies
exactly as in the real dataset. A random split of frames is therefore flattered and a split into
contiguous frame blocks is honest. Handshapes follow the manual alphabet closely enough that the
letters the real alphabet makes look alike (R/U/V, the fist family, K/P, G/Q, I/J/Y ...) differ here
by the same small details: a crossing, a thumb's position, an orientation, one finger.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from asl_tune.alphabet import ASL_CLASSES
from asl_tune.data import Progress, cache_root
from asl_tune.errors import AslTuneError
from asl_tune.files import write_atomically
from asl_tune.workers import run_in_workers

# Bump when the renderer's output changes, so a cached default dataset is never silently stale.
SYNTH_VERSION = "v3"
DEFAULT_PER_CLASS = 100  # frames per class in the embedded default dataset (2,900 images): minutes on 2 CPU cores
DEFAULT_SEED = 0
DEFAULT_IMAGE_PX = 200  # the real dataset's side
RENDER_WORKERS = 2
RENDER_CHUNK = 8  # images per task handed to a render worker: a worker waits on its next task once per chunk

TRAIN_SUBDIR = Path("asl_alphabet_train") / "asl_alphabet_train"
TEST_SUBDIR = Path("asl_alphabet_test") / "asl_alphabet_test"
# The real test folder has one image per class except del.
TEST_CLASSES: tuple[str, ...] = tuple(c for c in ASL_CLASSES if c != "del")

# ---------------------------------------------------------------------------------------------
# The hand, in "hand units": palm 1 wide, wrist at y = 0, knuckles at y = 1.1, fingers along +y,
# z toward the camera (the palm faces the camera; fingers curl toward it). Thumb on the -x side.
# ---------------------------------------------------------------------------------------------

FINGER_BASES = ((-0.36, 1.08), (-0.12, 1.13), (0.12, 1.10), (0.35, 1.02))  # index, middle, ring, pinky
FINGER_LENGTHS = ((0.55, 0.33, 0.25), (0.60, 0.37, 0.27), (0.56, 0.35, 0.25), (0.44, 0.27, 0.21))
FINGER_WIDTHS = (0.22, 0.22, 0.21, 0.18)  # proximal segment; later segments taper
THUMB_WIDTH = 0.24
PALM_OUTLINE = (
    (-0.47, 0.02),
    (-0.50, 0.55),
    (-0.47, 1.05),
    (-0.30, 1.17),
    (0.0, 1.21),
    (0.30, 1.15),
    (0.46, 1.05),
    (0.50, 0.50),
    (0.44, 0.0),
)
PX_PER_UNIT = 0.28  # hand units -> fraction of the image side, at scale 1

STRAIGHT = (0.0, 0.0, 0.0)
FIST = (90.0, 100.0, 60.0)  # tip ends back on the palm
HOOK = (5.0, 85.0, 75.0)  # X: knuckle straight, the two outer joints bent
TOGETHER = (3.0, -3.0, 3.0, 6.0)  # lean of each finger toward the pinky side, degrees
NATURAL = (-4.0, 0.0, 5.0, 10.0)
SPREAD = (-14.0, -2.0, 10.0, 22.0)

# Thumb as four points (base, two joints, tip) in hand units, and a drawing depth relative to the
# fingers: 0.1 is tucked under curled fingers, 1.0 lies across their front.
THUMB_ACROSS_INDEX_MIDDLE = ((-0.45, 0.2), (-0.30, 0.58), (-0.08, 0.76), (0.12, 0.80))  # S
THUMB_ACROSS_RING_PINKY = ((-0.45, 0.2), (-0.18, 0.50), (0.10, 0.68), (0.32, 0.74))
THUMB_ACROSS_PALM = ((-0.45, 0.2), (-0.28, 0.42), (-0.02, 0.52), (0.22, 0.56))  # B
THUMB_OUT_SIDE = ((-0.45, 0.2), (-0.72, 0.42), (-1.00, 0.52), (-1.27, 0.56))  # L, Y


@dataclass(frozen=True)
class Handshape:
    """One class's pose: finger joint angles, finger lean, thumb path and the hand's orientation."""

    flex: tuple[tuple[float, float, float], ...]  # per finger (index..pinky), 3 joint bends in degrees
    lean: tuple[float, float, float, float]  # per finger, degrees toward the pinky side
    thumb: tuple[tuple[float, float], ...]  # base, joint, joint, tip in hand units
    thumb_depth: float  # drawing depth of the thumb against the fingers (see above)
    rotation: float = 0.0  # degrees, clockwise in the image; 90 points the fingers right
    squash: float = 1.0  # horizontal foreshortening (a hand turned away from the camera)
    middle_over_index: bool = False  # draw the middle finger over the index (R's crossing)


def _fingers(index, middle, ring, pinky):
    return (index, middle, ring, pinky)


HANDSHAPES: dict[str, Handshape] = {
    # The fist family: the fingers are identical; only where the thumb goes differs.
    "A": Handshape(_fingers(FIST, FIST, FIST, FIST), NATURAL, ((-0.45, 0.2), (-0.57, 0.62), (-0.55, 0.95), (-0.50, 1.22)), 1.0),
    "S": Handshape(_fingers(FIST, FIST, FIST, FIST), NATURAL, THUMB_ACROSS_INDEX_MIDDLE, 1.0),
    "T": Handshape(_fingers(FIST, FIST, FIST, FIST), NATURAL, ((-0.45, 0.2), (-0.40, 0.62), (-0.30, 0.95), (-0.24, 1.24)), 0.1),
    "M": Handshape(_fingers(FIST, FIST, FIST, FIST), NATURAL, ((-0.45, 0.2), (-0.22, 0.55), (0.06, 0.85), (0.24, 1.16)), 0.1),
    "N": Handshape(_fingers(FIST, FIST, FIST, FIST), NATURAL, ((-0.45, 0.2), (-0.30, 0.58), (-0.12, 0.90), (0.00, 1.22)), 0.1),
    "E": Handshape(
        _fingers((70, 95, 70), (70, 95, 70), (70, 95, 70), (70, 95, 70)),
        TOGETHER,
        ((-0.45, 0.2), (-0.32, 0.48), (-0.04, 0.58), (0.24, 0.62)),
        0.2,
    ),
    "O": Handshape(
        _fingers((40, 50, 45), (40, 50, 45), (40, 50, 45), (40, 50, 45)),
        (10.0, 3.0, -4.0, -10.0),
        ((-0.45, 0.2), (-0.50, 0.62), (-0.38, 1.00), (-0.16, 1.30)),
        0.6,
    ),
    "C": Handshape(
        _fingers((25, 35, 30), (25, 35, 30), (25, 35, 30), (25, 35, 30)),
        TOGETHER,
        ((-0.45, 0.2), (-0.68, 0.55), (-0.70, 0.90), (-0.55, 1.12)),
        0.6,
        rotation=10,
        squash=0.8,
    ),
    "B": Handshape(_fingers(STRAIGHT, STRAIGHT, STRAIGHT, STRAIGHT), TOGETHER, THUMB_ACROSS_PALM, 1.0),
    "D": Handshape(
        _fingers(STRAIGHT, (50, 70, 50), (50, 70, 50), (50, 70, 50)),
        (-2.0, -4.0, -8.0, -12.0),
        ((-0.45, 0.2), (-0.36, 0.55), (-0.18, 0.82), (0.02, 0.98)),
        0.5,
    ),
    "F": Handshape(
        _fingers((45, 60, 45), STRAIGHT, STRAIGHT, STRAIGHT),
        (4.0, -2.0, 9.0, 20.0),
        ((-0.45, 0.2), (-0.62, 0.60), (-0.58, 0.98), (-0.40, 1.18)),
        0.7,
    ),
    "G": Handshape(
        _fingers(STRAIGHT, FIST, FIST, FIST), NATURAL, ((-0.45, 0.2), (-0.58, 0.62), (-0.60, 0.98), (-0.58, 1.30)), 1.0, rotation=90
    ),
    "H": Handshape(_fingers(STRAIGHT, STRAIGHT, FIST, FIST), TOGETHER, THUMB_ACROSS_RING_PINKY, 1.0, rotation=90),
    "I": Handshape(_fingers(FIST, FIST, FIST, STRAIGHT), NATURAL, THUMB_ACROSS_INDEX_MIDDLE, 1.0),
    "J": Handshape(_fingers(FIST, FIST, FIST, STRAIGHT), NATURAL, THUMB_ACROSS_INDEX_MIDDLE, 1.0, rotation=-35, squash=0.85),
    "K": Handshape(
        _fingers(STRAIGHT, (40, 10, 0), FIST, FIST),
        (-6.0, 10.0, 5.0, 10.0),
        ((-0.45, 0.2), (-0.40, 0.62), (-0.30, 0.98), (-0.20, 1.28)),
        0.3,
    ),
    "L": Handshape(_fingers(STRAIGHT, FIST, FIST, FIST), NATURAL, THUMB_OUT_SIDE, 0.5),
    "P": Handshape(
        _fingers(STRAIGHT, (40, 10, 0), FIST, FIST),
        (-6.0, 10.0, 5.0, 10.0),
        ((-0.45, 0.2), (-0.40, 0.62), (-0.30, 0.98), (-0.20, 1.28)),
        0.3,
        rotation=165,
        squash=0.9,
    ),
    "Q": Handshape(
        _fingers(STRAIGHT, FIST, FIST, FIST),
        NATURAL,
        ((-0.45, 0.2), (-0.58, 0.62), (-0.60, 0.98), (-0.58, 1.30)),
        1.0,
        rotation=170,
        squash=0.9,
    ),
    # Two fingers up: crossed, together or spread.
    "R": Handshape(_fingers(STRAIGHT, STRAIGHT, FIST, FIST), (9.0, -9.0, 5.0, 10.0), THUMB_ACROSS_RING_PINKY, 1.0, middle_over_index=True),
    "U": Handshape(_fingers(STRAIGHT, STRAIGHT, FIST, FIST), TOGETHER, THUMB_ACROSS_RING_PINKY, 1.0),
    "V": Handshape(_fingers(STRAIGHT, STRAIGHT, FIST, FIST), (-12.0, 12.0, 5.0, 10.0), THUMB_ACROSS_RING_PINKY, 1.0),
    "W": Handshape(
        _fingers(STRAIGHT, STRAIGHT, STRAIGHT, FIST),
        (-13.0, 0.0, 13.0, 10.0),
        ((-0.45, 0.2), (-0.12, 0.50), (0.18, 0.70), (0.36, 0.80)),
        1.0,
    ),
    "X": Handshape(_fingers(HOOK, FIST, FIST, FIST), NATURAL, THUMB_ACROSS_INDEX_MIDDLE, 1.0),
    "Y": Handshape(_fingers(FIST, FIST, FIST, STRAIGHT), (-4.0, 0.0, 5.0, 24.0), THUMB_OUT_SIDE, 0.5),
    "Z": Handshape(_fingers(STRAIGHT, FIST, FIST, FIST), NATURAL, THUMB_ACROSS_INDEX_MIDDLE, 1.0, rotation=-30, squash=0.85),
    # The dataset's two non-letter gestures: a claw pointing down and an open hand pointing left.
    "del": Handshape(
        _fingers((30, 75, 55), (30, 75, 55), (30, 75, 55), (30, 75, 55)),
        SPREAD,
        ((-0.45, 0.2), (-0.70, 0.50), (-0.82, 0.80), (-0.78, 1.05)),
        0.6,
        rotation=180,
    ),
    "space": Handshape(
        _fingers(STRAIGHT, STRAIGHT, STRAIGHT, STRAIGHT),
        SPREAD,
        ((-0.45, 0.2), (-0.72, 0.52), (-0.95, 0.78), (-1.12, 1.0)),
        0.5,
        rotation=-90,
    ),
}
assert set(HANDSHAPES) == set(ASL_CLASSES) - {"nothing"}

# ---------------------------------------------------------------------------------------------
# Drift: every nuisance parameter is a smooth function of the frame's position in its video.
# ---------------------------------------------------------------------------------------------

# The signer's hand moves differently in every class's video ...
HAND_DRIFTS = (
    ("rotation", "scale", "shift_x", "shift_y", "squash", "depth_x", "arm_angle")
    + tuple(f"flex{f}{j}" for f in range(4) for j in range(3))
    + tuple(f"lean{f}" for f in range(4))
    + tuple(f"thumb{p}{axis}" for p in range(1, 4) for axis in "xy")
)
# ... but every video was shot in the same room: one looping scene, which each class's video enters at
# its own point. Were the background class-specific, a CNN would learn the rooms instead of the hands.
SCENE_DRIFTS = (
    "skin",
    "skin_hue",
    "brightness",
    "contrast",
    "cast_r",
    "cast_g",
    "cast_b",
    "light_angle",
    "light_strength",
    "bg_angle",
    "bg_top_r",
    "bg_top_g",
    "bg_top_b",
    "bg_bottom_r",
    "bg_bottom_g",
    "bg_bottom_b",
)
MIN_HAND_CYCLES, MAX_HAND_CYCLES = 1.5, 4.0  # how fast the hand's drift curves vary, in cycles per video
SCENE_LOOPS = 2  # passes of each video through the shared scene's loop
CLUTTER_ITEMS = 9  # background objects in the scene's loop; each is on screen for part of it


@dataclass(frozen=True)
class _Drift:
    """Named curves over video time, each a sum of three sines, roughly in [-1, 1]."""

    names: tuple[str, ...]
    freqs: np.ndarray  # (n, 3) cycles per video
    phases: np.ndarray  # (n, 3) radians
    weights: np.ndarray  # (n, 3)

    def at(self, t: float) -> dict[str, float]:
        """Every curve's value at video time t (0 at the first frame, 1 after the last)."""
        waves = (self.weights * np.sin(2 * np.pi * self.freqs * t + self.phases)).sum(1) / self.weights.sum(1)
        # A sum of three sines rarely reaches its bound; stretching uses the whole [-1, 1] range.
        return dict(zip(self.names, np.clip(1.6 * waves, -1.0, 1.0).tolist()))


def _random_drift(rng: np.random.Generator, names: tuple[str, ...], freqs: np.ndarray) -> _Drift:
    shape = (len(names), 3)
    return _Drift(names, freqs, rng.uniform(0, 2 * np.pi, shape), rng.uniform(0.3, 1.0, shape))


@functools.lru_cache(maxsize=64)
def _hand_drift(seed: int, class_index: int) -> _Drift:
    rng = np.random.default_rng([seed, class_index, 0x4A2D])
    # At least 1.5 cycles per video: every nuisance sweeps its whole range inside the first 70% (the
    # training block of a blocked split), so held-out frames are new combinations of seen poses, not
    # poses no training frame came near. With slower drift (v2: 0.5 cycles), a CPU-sized DexNet could
    # not generalise past memorising its training block and its errors scattered across the alphabet.
    return _random_drift(rng, HAND_DRIFTS, rng.uniform(MIN_HAND_CYCLES, MAX_HAND_CYCLES, (len(HAND_DRIFTS), 3)))


@functools.lru_cache(maxsize=64)
def _scene_offset(seed: int, class_index: int) -> float:
    return float(np.random.default_rng([seed, class_index, 0x0FF5]).uniform())


@functools.lru_cache(maxsize=4)
def _scene(seed: int) -> tuple[_Drift, np.ndarray]:
    """The shared scene's drift curves (whole cycles, so it loops smoothly) and its clutter table."""
    rng = np.random.default_rng([seed, 0x5CE7E])
    drift = _random_drift(rng, SCENE_DRIFTS, rng.integers(1, 3, (len(SCENE_DRIFTS), 3)).astype(float))
    n = CLUTTER_ITEMS
    clutter = np.column_stack(
        [
            rng.uniform(0, 1, n),  # 0 birth, in loop time
            rng.uniform(0.25, 0.6, n),  # 1 lifetime
            rng.integers(0, 4, n),  # 2 kind: ellipse, rectangle, bar, triangle
            rng.uniform(-0.1, 1.1, n),  # 3 x at birth, fraction of the side
            rng.uniform(-0.1, 1.1, n),  # 4 y at birth
            rng.normal(0, 0.25, n),  # 5 x velocity, sides per loop
            rng.normal(0, 0.25, n),  # 6 y velocity
            rng.uniform(0.06, 0.3, n),  # 7 width
            rng.uniform(0.06, 0.3, n),  # 8 height
            rng.uniform(0, 180, n),  # 9 angle (bars, triangles), degrees
            rng.integers(50, 206, n),  # 10-12 colour
            rng.integers(50, 206, n),
            rng.integers(50, 206, n),
            rng.uniform(-40, 40, n),  # 13 angular velocity, degrees per loop
        ]
    )
    return drift, clutter


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _skin_colour(tone: float, hue: float) -> np.ndarray:
    # tone in [-1, 1]: darker to lighter; hue shifts between olive and pink.
    light, dark = np.array([232.0, 192.0, 160.0]), np.array([105.0, 70.0, 50.0])
    colour = dark + (light - dark) * (0.6 + 0.25 * tone)  # one signer: tone drifts with the light only
    return colour * np.array([1.0 + 0.05 * hue, 1.0, 1.0 - 0.06 * hue])


class _Canvas:
    """Draws each shape on the image and, when asked, the same shape on a hand mask."""

    def __init__(self, img: Image.Image, mask: Image.Image | None, outline_px: float):
        self.draw = ImageDraw.Draw(img)
        self.mask = ImageDraw.Draw(mask) if mask is not None else None
        self.outline_px = outline_px

    def capsule(self, p0, p1, width: float, fill: np.ndarray, outline: np.ndarray) -> None:
        """A thick segment with round ends; its outline drawn first, so overlaps read as creases."""
        for colour, w in ((outline, width + 2 * self.outline_px), (fill, width)):
            self._round_line(self.draw, p0, p1, w, _rgb(colour))
        if self.mask is not None:
            self._round_line(self.mask, p0, p1, width + 2 * self.outline_px, 255)

    def polygon(self, points, fill: np.ndarray, outline: np.ndarray) -> None:
        """A filled polygon with a one-pixel outline."""
        self.draw.polygon(points, fill=_rgb(fill), outline=_rgb(outline))
        if self.mask is not None:
            self.mask.polygon(points, fill=255, outline=255)

    @staticmethod
    def _round_line(draw: ImageDraw.ImageDraw, p0, p1, w: float, colour) -> None:
        r = w / 2
        draw.line([p0, p1], fill=colour, width=max(1, round(w)))
        for x, y in (p0, p1):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(colour, 0, 255))


def _hand_primitives(shape: Handshape, drift: dict[str, float], rng: np.random.Generator):
    """Capsules and the palm polygon in hand units (x, y, z) with a drawing depth each."""
    capsules = []  # (depth, p0, p1, width, shade)
    for f in range(4):
        bx, by = FINGER_BASES[f]
        lean = shape.lean[f] + 3.0 * drift[f"lean{f}"] + rng.normal(0, 1.0)
        d = np.array([math.sin(math.radians(lean)), math.cos(math.radians(lean)), 0.0])
        n = np.array([0.0, 0.0, 1.0])
        p = np.array([bx, by, 0.0])
        phi = 0.0
        bias = 0.03 * f
        if shape.middle_over_index and f == 1:
            bias += 0.5
        for j in range(3):
            bend = shape.flex[f][j]
            # Straight fingers stay nearly straight; bent joints wobble more, as real ones do.
            wobble = 3.0 + 0.06 * bend
            phi += bend + wobble * drift[f"flex{f}{j}"] + rng.normal(0, 1.5)
            a = math.radians(phi)
            q = p + FINGER_LENGTHS[f][j] * (math.cos(a) * d + math.sin(a) * n)
            depth = (p[2] + q[2]) / 2 + bias
            shade = 1.0 - 0.22 * min(1.0, max(0.0, math.sin(a))) - (0.12 if math.cos(a) < 0 else 0.0)
            capsules.append((depth, p, q, FINGER_WIDTHS[f] * (1.0 - 0.1 * j), shade))
            p = q
    thumb = [np.array([x, y, 0.0]) for x, y in shape.thumb]
    for i in range(1, 4):
        thumb[i][0] += 0.04 * drift[f"thumb{i}x"] + rng.normal(0, 0.012)
        thumb[i][1] += 0.04 * drift[f"thumb{i}y"] + rng.normal(0, 0.012)
        thumb[i][2] = 0.35 * shape.thumb_depth * i / 3
    for i in range(3):
        capsules.append((shape.thumb_depth + 0.01 * i, thumb[i], thumb[i + 1], THUMB_WIDTH * (1.0 - 0.08 * i), 0.97))
    return capsules


def _draw_hand(
    img: Image.Image, mask: Image.Image | None, shape: Handshape, drift: dict[str, float], rng: np.random.Generator, image_px: int
) -> None:
    squash = shape.squash * (0.9 + 0.1 * drift["squash"])
    depth_x, depth_y = 0.25 + 0.12 * drift["depth_x"], 0.12
    angle = math.radians(shape.rotation + 10.0 * drift["rotation"] + rng.normal(0, 1.5))
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    scale = image_px * PX_PER_UNIT * (1.0 + 0.10 * drift["scale"]) * (1 + rng.normal(0, 0.01))
    # The knuckles land near the image centre, so the hand fits whichever way it points.
    cx = image_px * (0.5 + 0.08 * drift["shift_x"] + rng.normal(0, 0.004))
    cy = image_px * (0.52 + 0.06 * drift["shift_y"] + rng.normal(0, 0.004))

    def to_px(p) -> tuple[float, float]:
        # Oblique projection: depth shows as a sideways shift, so curled fingers stay visible.
        x = (p[0] + depth_x * p[2]) * squash
        y = p[1] + depth_y * p[2] - 1.0
        # Clockwise rotation in image space (image y points down).
        return cx + scale * (x * cos_a + y * sin_a), cy - scale * (-x * sin_a + y * cos_a)

    skin = _skin_colour(drift["skin"], drift["skin_hue"])
    canvas = _Canvas(img, mask, outline_px=max(1.0, image_px / 160))
    # The forearm leaves the wrist toward the image's bottom edge, bending less than the hand turns.
    arm_turn = math.radians(0.5 * (shape.rotation + 10.0 * drift["rotation"]) + 10.0 * drift["arm_angle"])
    wrist = np.array(to_px((0.0, 0.1, 0.0)))
    elbow = wrist + 2.5 * scale * np.array([-math.sin(arm_turn), math.cos(arm_turn)])
    canvas.capsule(tuple(wrist), tuple(elbow), 0.8 * scale * squash, skin * 0.9, skin * 0.6)
    canvas.polygon([to_px((x, y, 0.0)) for x, y in PALM_OUTLINE], skin, skin * 0.6)
    for _, p, q, width, shade in sorted(_hand_primitives(shape, drift, rng), key=lambda c: c[0]):
        canvas.capsule(to_px(p), to_px(q), width * scale * squash, skin * shade, skin * 0.55)


def _draw_clutter(img: Image.Image, clutter: np.ndarray, u: float, image_px: int) -> None:
    draw = ImageDraw.Draw(img)
    for birth, life, kind, x0, y0, vx, vy, w, h, ang, r, g, b, spin in clutter:
        age = (u - birth) % 1.0  # loop time wraps, so objects come round again
        if age >= life:
            continue
        x, y = (x0 + vx * age) * image_px, (y0 + vy * age) * image_px
        hw, hh = w * image_px / 2, h * image_px / 2
        colour = (int(r), int(g), int(b))
        theta = math.radians(ang + spin * age)
        if kind == 0:
            draw.ellipse([x - hw, y - hh, x + hw, y + hh], fill=colour)
        elif kind == 1:
            draw.rectangle([x - hw, y - hh, x + hw, y + hh], fill=colour)
        elif kind == 2:
            dx, dy = hw * 2 * math.cos(theta), hw * 2 * math.sin(theta)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=colour, width=max(1, int(hh / 3)))
        else:
            pts = [(x + hw * math.cos(theta + k * 2.094), y + hh * math.sin(theta + k * 2.094)) for k in range(3)]
            draw.polygon(pts, fill=colour)


def _render(
    class_name: str, frame: int, per_class: int, seed: int, image_px: int, with_mask: bool = False
) -> tuple[Image.Image, Image.Image | None, int]:
    """The frame's image, its hand mask (when asked) and the JPEG quality to save it with."""
    class_index = ASL_CLASSES.index(class_name)
    t = (frame - 1) / per_class  # 0 at the first frame; the test image sits just past the last
    scene_drift, clutter = _scene(seed)
    # Where this video is in the scene's loop. Each video goes round it SCENE_LOOPS times, so every class's
    # training block sees the whole scene: the background and light say nothing about the class, even to
    # a model that memorises them (with one pass, a val frame's background would match other classes' train frames).
    u = (SCENE_LOOPS * t + _scene_offset(seed, class_index)) % 1.0
    drift = {**_hand_drift(seed, class_index).at(t), **scene_drift.at(u)}
    rng = np.random.default_rng([seed, class_index, frame])

    # Background: a two-colour gradient at a drifting angle.
    side = np.linspace(-1.0, 1.0, image_px, dtype=np.float32)
    bg_angle = math.pi * drift["bg_angle"]
    ramp = 0.5 + 0.35 * (np.cos(bg_angle) * side[:, None] + np.sin(bg_angle) * side[None, :])
    top = 128 + 60 * np.array([drift["bg_top_r"], drift["bg_top_g"], drift["bg_top_b"]], dtype=np.float32)
    bottom = 128 + 60 * np.array([drift["bg_bottom_r"], drift["bg_bottom_g"], drift["bg_bottom_b"]], dtype=np.float32)
    bg = top + (bottom - top) * ramp[..., None]  # (H, W, 3)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    _draw_clutter(img, clutter, u, image_px)

    mask = Image.new("L", (image_px, image_px), 0) if with_mask else None
    if class_name != "nothing":
        _draw_hand(img, mask, HANDSHAPES[class_name], drift, rng, image_px)

    img = img.filter(ImageFilter.GaussianBlur(radius=image_px / 200 * rng.uniform(0.5, 1.1)))
    pixels = np.asarray(img, dtype=np.float32)
    # Lighting: a directional falloff, then brightness, contrast and a colour cast over everything.
    light_angle = math.pi * drift["light_angle"]
    falloff = 1.0 + 0.22 * drift["light_strength"] * (np.cos(light_angle) * side[:, None] + np.sin(light_angle) * side[None, :])
    pixels = pixels * falloff[..., None]
    contrast = 1.0 + 0.15 * drift["contrast"]
    pixels = (pixels - 128.0) * contrast + 128.0 + 20.0 * drift["brightness"]
    pixels *= 1.0 + 0.08 * np.array([drift["cast_r"], drift["cast_g"], drift["cast_b"]], dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(3.0, 8.0), pixels.shape).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return img, mask, int(rng.integers(82, 96))


def render_image(
    class_name: str, frame: int, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED, image_px: int = DEFAULT_IMAGE_PX
) -> Image.Image:
    """Frame `frame` (1-based) of class `class_name`'s video of `per_class` frames, as an RGB image."""
    return _render(class_name, frame, per_class, seed, image_px)[0]


def render_hand_mask(
    class_name: str, frame: int, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED, image_px: int = DEFAULT_IMAGE_PX
) -> np.ndarray:
    """Boolean (H, W) mask of the pixels the hand covers in that frame (all False for `nothing`)."""
    return np.asarray(_render(class_name, frame, per_class, seed, image_px, with_mask=True)[1]) > 0


# ---------------------------------------------------------------------------------------------
# The dataset on disk
# ---------------------------------------------------------------------------------------------


def _render_to_file(task: tuple[str, int, int, int, int, str]) -> None:
    class_name, frame, per_class, seed, image_px, path = task
    img, _, quality = _render(class_name, frame, per_class, seed, image_px)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    Path(path).write_bytes(buffer.getvalue())


def _render_files(tasks: list[tuple[str, int, int, int, int, str]]) -> int:
    """Worker: render a chunk of tasks to their files; return how many."""
    for task in tasks:
        _render_to_file(task)
    return len(tasks)


def _validate(per_class: int, seed: int, image_px: int) -> None:
    if per_class < 1:
        raise AslTuneError(f"--per-class: must be >= 1, got {per_class}")
    if image_px < 32:
        raise AslTuneError(f"--image-px: must be >= 32, got {image_px}")
    if seed < 0:
        raise AslTuneError(f"--seed: must be >= 0, got {seed}")


def _run_tasks(tasks: list[tuple], progress: bool) -> None:
    """Render every task to its file in RENDER_WORKERS worker processes, with a progress line on stderr (data.Progress:
    rewritten in place on a terminal, plain lines every few seconds in a log or a pipe)."""
    bar = Progress("rendering synthetic ASL dataset", len(tasks), progress)
    # Worker processes that never re-run the caller's __main__ (asl_tune.workers says why).
    chunks = [tasks[s : s + RENDER_CHUNK] for s in range(0, len(tasks), RENDER_CHUNK)]
    for _, done in run_in_workers(_render_files, chunks, RENDER_WORKERS):
        bar.update(done)


def _render_into(tmp: Path, per_class: int, seed: int, image_px: int, progress: bool, classes: tuple[str, ...]) -> None:
    """Render the dataset, in the Kaggle layout, into the new folder tmp."""
    tasks = []
    for class_name in classes:
        class_dir = tmp / TRAIN_SUBDIR / class_name
        class_dir.mkdir(parents=True)
        tasks += [(class_name, n, per_class, seed, image_px, str(class_dir / f"{class_name}{n}.jpg")) for n in range(1, per_class + 1)]
    (tmp / TEST_SUBDIR).mkdir(parents=True)
    # The real test images are extra frames of the same videos; here, the frame just after the last.
    tasks += [(c, per_class + 1, per_class, seed, image_px, str(tmp / TEST_SUBDIR / f"{c}_test.jpg")) for c in TEST_CLASSES if c in classes]
    _run_tasks(tasks, progress)


def _render_atomically(
    out_dir: Path, per_class: int, seed: int, image_px: int, progress: bool, reuse_existing: bool, classes: tuple[str, ...] = ASL_CLASSES
) -> Path:
    out_dir = Path(out_dir)
    try:
        # Renamed onto a missing or empty folder; a non-empty one is in the way.
        write_atomically(out_dir, lambda tmp: _render_into(tmp, per_class, seed, image_px, progress, classes))
    except FileExistsError:
        if reuse_existing and out_dir.is_dir():
            return out_dir  # another process finished the same dataset first
        raise AslTuneError(f"{out_dir}: already exists and is not empty; choose a new folder") from None
    return out_dir


def render_dataset(
    out_dir: Path,
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = DEFAULT_SEED,
    image_px: int = DEFAULT_IMAGE_PX,
    progress: bool = True,
    classes: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Render the dataset into out_dir in the Kaggle layout and return out_dir.

    `classes` renders only those classes (in the alphabet's order; a class's images do not depend on
    which others are rendered); None renders all 29.
    """
    _validate(per_class, seed, image_px)
    if classes is None:
        chosen = ASL_CLASSES
    else:
        unknown = sorted(set(classes) - set(ASL_CLASSES))
        if unknown or not classes:
            raise AslTuneError(f"classes: must be a non-empty subset of the 29 ASL classes, got {list(classes)!r}")
        chosen = tuple(c for c in ASL_CLASSES if c in set(classes))
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AslTuneError(f"{out_dir}: already exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return _render_atomically(out_dir, per_class, seed, image_px, progress, reuse_existing=False, classes=chosen)


def default_dataset_dir(per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED) -> Path:
    """Where the embedded default dataset lives: in the tool's cache folder (see `asl_tune.data.cache_root`)."""
    return cache_root() / f"synth-{SYNTH_VERSION}-pc{per_class}-s{seed}"


def ensure_default_dataset(progress: bool = True, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED) -> Path:
    """Return the default dataset's folder, rendering it on first use; reused afterwards."""
    _validate(per_class, seed, DEFAULT_IMAGE_PX)
    out_dir = default_dataset_dir(per_class, seed)
    # Renders are published by one atomic rename, so an existing folder is a complete one.
    if out_dir.is_dir():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return _render_atomically(out_dir, per_class, seed, DEFAULT_IMAGE_PX, progress, reuse_existing=True)
