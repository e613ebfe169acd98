"""The built-in synthetic benchmark: procedural street scenes in two domain pairs.

Every scene is ray-cast from a pinhole camera over a tiny world: a road with sidewalks, façades,
walls, fences, trees and terrain along both sides, a backdrop closing the street, and upright
objects (cars, a bus, persons, poles carrying signs and lights) standing on the ground. Labels
are Cityscapes trainIds (`stages.data.classes`), so the class tables and protocols apply unchanged;
both pairs draw the same 14 classes.

Each pair is a source and a target `Style` (`stages.data.synthetic_styles`), the way GTA5
differs from Cityscapes.

Generation is deterministic: each image has its own seed (`sample_seed`), so images can be drawn
in any order, in parallel, and any one can be regenerated alone. Drawing is vectorised numpy
over coordinate grids (no per-pixel Python loops).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from stages.data.classes import CITYSCAPES_PALETTE, IGNORE_INDEX
from stages.data.io import write_label
from stages.data.synthetic_styles import PAIR_CODES, PAIRS, Style

Domain = Literal["source", "target"]

DOMAIN_CODES = {"source": 0, "target": 1}
SPLIT_CODES = {"train": 0, "val": 1}

# Cityscapes trainIds (stages/data/classes.py).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS = 11, 12, 13, 14, 15

FAR = 1.0e6  # depth of the sky




def sample_seed(seed: int, domain: str, split: str, index: int,
                pair: str = "easy") -> np.random.SeedSequence:
    """The seed of one image: a function of (benchmark seed, domain, split, image index, pair).

    The easy pair keeps the four-number seeds it has always had.
    """
    entropy = [seed, DOMAIN_CODES[domain], SPLIT_CODES.get(split, 9), index]
    if pair != "easy":
        entropy.append(PAIR_CODES[pair])
    return np.random.SeedSequence(entropy)


class _Canvas:
    """Per-pixel rays, and a depth-tested label / colour buffer the scene is painted into."""

    def __init__(self, height: int, width: int, focal: float, cx: float, cy: float,
                 camera_height: float) -> None:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + np.float32(0.5)
        self.u = (xs - cx) / focal  # ray direction: x / z
        self.v = (ys - cy) / focal  # ray direction: (camera height - y) / z, positive downwards
        self.focal = focal
        self.cx, self.cy = cx, cy
        self.camera_height = camera_height
        self.label = np.full((height, width), SKY, np.uint8)
        self.depth = np.full((height, width), FAR, np.float32)
        self.colour = np.zeros((height, width, 3), np.float32)
        self.light = np.ones((height, width), np.float32)  # shading factor applied after painting

    def paint(self, mask: np.ndarray, depth: np.ndarray | float, cls: int,
              colour: tuple[int, int, int] | np.ndarray, light: np.ndarray | float = 1.0,
              details: tuple[tuple[np.ndarray, tuple[int, int, int]], ...] = (),
              where: tuple[slice, slice] = (slice(None), slice(None))) -> None:
        """Paint `mask` where it is nearer than what is there.

        mask, depth, light, the detail masks and a per-pixel colour (h, w, 3) cover the window
        `where` of the canvas; a detail (mask, colour) recolours part of the object (windows,
        wheels) without changing its class.
        """
        depth = np.broadcast_to(depth, mask.shape)
        visible = mask & (depth < self.depth[where])
        self.label[where][visible] = cls
        self.depth[where][visible] = depth[visible]
        colour_window = self.colour[where]
        colour_window[visible] = colour[visible] if np.ndim(colour) == 3 else colour
        for detail, detail_colour in details:
            colour_window[visible & detail] = detail_colour
        self.light[where][visible] = np.broadcast_to(light, mask.shape)[visible]

    def billboard(self, z: float, x_range: tuple[float, float],
                  y_range: tuple[float, float]) -> tuple[tuple[slice, slice], np.ndarray,
                                                         np.ndarray]:
        """The window of the upright plane at depth `z` (facing the camera) that can hold an
        object within world `x_range` x `y_range`, and the world (x, y) of its pixels."""
        height, width = self.label.shape
        c = self.camera_height
        cols = (self.cx + self.focal * x_range[0] / z, self.cx + self.focal * x_range[1] / z)
        rows = (self.cy + self.focal * (c - y_range[1]) / z,
                self.cy + self.focal * (c - y_range[0]) / z)
        where = (slice(int(np.clip(np.floor(rows[0]), 0, height)),
                       int(np.clip(np.ceil(rows[1]) + 1, 0, height))),
                 slice(int(np.clip(np.floor(cols[0]), 0, width)),
                       int(np.clip(np.ceil(cols[1]) + 1, 0, width))))
        return where, self.u[where] * z, c - self.v[where] * z

    def min_width(self, z: float, pixels: float = 1.2) -> float:
        """The world width that covers `pixels` pixels at depth `z` (thin objects stay visible)."""
        return pixels * z / self.focal


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid bilinearly upsampled to `shape`."""
    height, width = shape
    grid = rng.uniform(-1, 1, (cells + 1, 2 * cells + 1))
    gy = np.linspace(0, cells, height)
    gx = np.linspace(0, 2 * cells, width)
    y0 = np.minimum(gy.astype(int), cells - 1)
    x0 = np.minimum(gx.astype(int), 2 * cells - 1)
    fy = (gy - y0)[:, None]
    fx = (gx - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) float image, edges replicated."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float32) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(w * padded[i:i + image.shape[0]] for i, w in enumerate(taps))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[:, i:i + image.shape[1]] for i, w in enumerate(taps))


def _pick(rng: np.random.Generator, options: tuple) -> tuple:
    return options[int(rng.integers(len(options)))]


def _pick_if_several(rng: np.random.Generator, options: tuple) -> tuple:
    """One of `options`; a single option is taken without drawing a random number."""
    return options[0] if len(options) == 1 else _pick(rng, options)


@dataclass(frozen=True)
class _Street:
    """The street cross-section, relative to the camera (x to the right, metres)."""

    centre: float
    road_half: float
    sidewalk: tuple[float, float]  # widths, left and right
    terrain: tuple[float, float]  # widths of the grass strips behind the sidewalks (0: none)
    end: float  # depth of the backdrop closing the street

    @property
    def left_kerb(self) -> float:
        return self.centre - self.road_half

    @property
    def right_kerb(self) -> float:
        return self.centre + self.road_half

    @property
    def facade(self) -> tuple[float, float]:
        """x of the building fronts on the left and on the right."""
        return (self.left_kerb - self.sidewalk[0] - self.terrain[0],
                self.right_kerb + self.sidewalk[1] + self.terrain[1])


def _draw_street(rng: np.random.Generator, style: Style) -> _Street:
    centre = rng.uniform(-1.5, 1.5)
    road_half = rng.uniform(*style.road_half_width)
    sidewalk = (rng.uniform(*style.sidewalk_width), rng.uniform(*style.sidewalk_width))
    terrain = tuple(rng.uniform(1.0, 3.0) if rng.random() < 0.35 else 0.0 for _ in range(2))
    return _Street(centre, road_half, sidewalk, terrain, rng.uniform(90.0, 160.0))


def render_scene(rng: np.random.Generator, style: Style, height: int,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene: image (H, W, 3) uint8 RGB and label (H, W) uint8 trainIds.

    The painters run back to front in a fixed order, each drawing its own random numbers, so a
    scene is a function of the generator's state alone.
    """
    focal = width * rng.uniform(*style.focal)
    cx = width * rng.uniform(0.42, 0.58)
    cy = height * rng.uniform(*style.horizon)
    canvas = _Canvas(height, width, focal, cx, cy, rng.uniform(*style.camera_height))
    street = _draw_street(rng, style)
    _paint_sky(canvas, style)
    _paint_ground(rng, canvas, style, street)
    for side, plane_x in ((-1, street.facade[0]), (1, street.facade[1])):
        _paint_facades(rng, canvas, style, street, side, plane_x)
    _paint_backdrop(rng, canvas, style, street)
    _paint_poles(rng, canvas, style, street)
    _paint_persons(rng, canvas, style, street)
    _paint_vehicles(rng, canvas, style, street)
    image = _shade(rng, canvas, style)
    return image, canvas.label


def _paint_sky(canvas: _Canvas, style: Style) -> None:
    """A vertical gradient from the top of the picture to the horizon."""
    t = np.clip((canvas.v * canvas.focal + canvas.cy) / max(canvas.cy, 1.0), 0, 1)[..., None]
    canvas.colour[:] = np.asarray(style.sky_top) * (1 - t) + np.asarray(style.sky_bottom) * t


def _paint_ground(rng: np.random.Generator, canvas: _Canvas, style: Style,
                  street: _Street) -> None:
    """The ground plane: road, sidewalks and terrain strips (trainIds 0, 1, 9)."""
    u, v = canvas.u, canvas.v
    left_kerb, right_kerb, sidewalk = street.left_kerb, street.right_kerb, street.sidewalk
    below = v > 1e-6
    z_ground = np.where(below, canvas.camera_height / np.maximum(v, 1e-6), FAR)
    x_ground = u * z_ground
    ground = below & (z_ground < street.end)
    road = ground & (x_ground > left_kerb) & (x_ground < right_kerb)
    dash = (np.abs(x_ground - street.centre) < 0.12) & (np.mod(z_ground, 6.0) < 3.0)
    canvas.paint(road, z_ground, ROAD, style.road, details=((dash, style.marking),))
    walk = ground & (((x_ground <= left_kerb) & (x_ground > left_kerb - sidewalk[0]))
                     | ((x_ground >= right_kerb) & (x_ground < right_kerb + sidewalk[1])))
    kerb = (np.abs(x_ground - left_kerb) < 0.15) | (np.abs(x_ground - right_kerb) < 0.15)
    light = np.where(kerb, 0.8, 1.0)
    if style.paving > 0:
        light = light * (1.0 - style.paving * _slab_joints(canvas, x_ground, z_ground))
    canvas.paint(walk, z_ground, SIDEWALK, _pick_if_several(rng, style.sidewalk), light)
    grass = ground & ((x_ground <= left_kerb - sidewalk[0])
                      | (x_ground >= right_kerb + sidewalk[1]))
    canvas.paint(grass, z_ground, TERRAIN, style.terrain)


def _slab_joints(canvas: _Canvas, x_ground: np.ndarray, z_ground: np.ndarray,
                 slab: float = 1.2) -> np.ndarray:
    """Where the joints between square paving slabs lie on the ground (H, W) bool.

    A joint is at least one pixel wide, and drawn only where a slab still spans three pixels
    (further away the pattern would alias into noise).
    """
    across = z_ground / canvas.focal  # metres per pixel, across the street
    along = z_ground * across / canvas.camera_height  # metres per pixel, along the street
    joints_x = (np.mod(x_ground, slab) < np.maximum(0.1, across)) & (across < slab / 3)
    joints_z = (np.mod(z_ground, slab) < np.maximum(0.1, along)) & (along < slab / 3)
    return joints_x | joints_z


def _paint_facades(rng: np.random.Generator, canvas: _Canvas, style: Style, street: _Street,
                   side: int, plane_x: float) -> None:
    """One side of the street: buildings, walls and trees in segments along the street.

    The segments are drawn first; every pixel of that half of the picture then looks up its
    segment (one vectorised pass per side).
    """
    starts = [rng.uniform(-2.0, 4.0)]
    while starts[-1] < street.end:
        starts.append(starts[-1] + rng.uniform(8.0, 25.0))
    count = len(starts) - 1
    z_start = np.asarray(starts[:-1], np.float32)
    length = np.diff(np.asarray(starts, np.float32))
    kind = rng.choice(3, size=count, p=(0.7, 0.1, 0.2))  # building, wall, tree
    top = np.where(kind == 0, rng.uniform(6.0, 22.0, count), rng.uniform(1.5, 3.0, count))
    colours = np.asarray(style.buildings, np.float32)[rng.integers(len(style.buildings),
                                                                   size=count)]
    crown_y, crown_r = rng.uniform(3.5, 6.0, count), rng.uniform(2.0, 3.5, count)
    fenced = rng.random(count) < 0.5
    tree_colours = (np.asarray(style.vegetation, np.float32)[rng.integers(len(style.vegetation),
                                                                          size=count)]
                    if len(style.vegetation) > 1 else None)
    crown_phases = rng.uniform(0, 2 * np.pi, (count, 2)) if style.ragged > 0 else None

    split_column = int(np.clip(round(canvas.cx), 0, canvas.label.shape[1]))
    where = (slice(None), slice(0, split_column) if side < 0 else slice(split_column, None))
    su, sv = canvas.u[where], canvas.v[where]
    facing = (su * side) > 1e-6
    z_plane = np.where(facing, plane_x / np.where(facing, su, 1.0), FAR)
    y_plane = canvas.camera_height - sv * z_plane
    segment = np.clip(np.searchsorted(np.asarray(starts), z_plane, side="right") - 1, 0,
                      count - 1)
    inside = facing & (z_plane >= starts[0]) & (z_plane < starts[-1]) & (y_plane >= 0)
    seg_kind, seg_top, seg_start = kind[segment], top[segment], z_start[segment]
    light = 1.0 if side < 0 else style.shade

    building = inside & (seg_kind == 0) & (y_plane < seg_top)
    along, across = style.window_period
    windows = ((np.mod(z_plane - seg_start, along) > 0.35 * along)
               & (np.mod(y_plane, across) > 0.4 * across) & (y_plane > 2.5)
               & (y_plane < seg_top - 1.0))
    canvas.paint(building, z_plane, BUILDING, colours[segment], light,
                 details=((windows, style.window),), where=where)
    canvas.paint(inside & (seg_kind == 1) & (y_plane < seg_top), z_plane, WALL, style.wall,
                 light, where=where)
    # A tree: a trunk and an elliptic crown, both labelled vegetation (as in Cityscapes).
    tree = inside & (seg_kind == 2)
    half = length[segment] / 2
    centre_z = seg_start + half
    dz, dy = (z_plane - centre_z) / half, (y_plane - crown_y[segment]) / crown_r[segment]
    crown = _crown(dz, dy, None if crown_phases is None else crown_phases[segment], style.ragged)
    trunk = (np.abs(z_plane - centre_z) < 0.4) & (y_plane < crown_y[segment])
    foliage = style.vegetation[0] if tree_colours is None else tree_colours[segment]
    canvas.paint(tree & (crown | trunk), z_plane, VEGETATION, foliage, light, where=where)
    fence = tree & fenced[segment] & (y_plane < 1.2)
    if style.railing > 0:
        fence &= _railing(canvas, z_plane, y_plane, plane_x, style.railing)
    canvas.paint(fence, z_plane - 0.5, FENCE, style.fence, light, where=where)


def _crown(dz: np.ndarray, dy: np.ndarray, phases: np.ndarray | None,
           amplitude: float) -> np.ndarray:
    """Inside a tree crown (H, W) bool: the ellipse, or a lobed outline around it.

    dz, dy: (H, W) offsets from the crown centre in units of its half-axes; phases: (H, W, 2)
    of the pixel's tree, or None for the plain ellipse; amplitude: lobe depth per unit radius.
    """
    if phases is None:
        return dz ** 2 + dy ** 2 < 1.0
    angle = np.arctan2(dy, dz)
    lobes = np.sin(7 * angle + phases[..., 0]) + np.sin(11 * angle + phases[..., 1])
    return dz ** 2 + dy ** 2 < (1.0 + 0.5 * amplitude * lobes) ** 2


def _railing(canvas: _Canvas, z_plane: np.ndarray, y_plane: np.ndarray, plane_x: float,
             spacing: float) -> np.ndarray:
    """The bars and rails of a railing on a façade plane (H, W) bool; the gaps show through.

    Bars and rails are at least one pixel wide, so a distant railing closes into a solid band.
    """
    along = z_plane ** 2 / (abs(plane_x) * canvas.focal)  # metres per pixel along the plane
    up = z_plane / canvas.focal  # metres per pixel vertically
    bars = np.mod(z_plane, spacing) < np.maximum(0.08, along)
    rails = (np.abs(y_plane - 1.1) < np.maximum(0.05, up / 2)) | (
        np.abs(y_plane - 0.15) < np.maximum(0.05, up / 2))
    return bars | rails


def _paint_backdrop(rng: np.random.Generator, canvas: _Canvas, style: Style,
                    street: _Street) -> None:
    """The backdrop closing the street: buildings and trees of random widths and heights."""
    facade = street.facade
    x0 = facade[0] - 40.0
    while x0 < facade[1] + 40.0:
        span = rng.uniform(6.0, 20.0)
        top = rng.uniform(5.0, 25.0)
        where, bx, by = canvas.billboard(street.end, (x0, x0 + span), (0.0, top))
        mask = (bx >= x0) & (bx < x0 + span) & (by >= 0) & (by < top)
        if rng.random() < 0.75:
            canvas.paint(mask, street.end, BUILDING, _pick(rng, style.buildings), 0.9,
                         where=where)
        else:
            crown = ((bx - x0 - span / 2) / (span / 2)) ** 2 + ((by - top / 2) / (top / 2)) ** 2
            canvas.paint((crown < 1) & (by >= 0), street.end, VEGETATION,
                         _pick_if_several(rng, style.vegetation), where=where)
        x0 += span


def _paint_poles(rng: np.random.Generator, canvas: _Canvas, style: Style,
                 street: _Street) -> None:
    """Poles at the kerbs, some carrying a sign or a traffic light, on camera-facing planes."""
    for _ in range(int(rng.integers(style.poles_per_scene[0], style.poles_per_scene[1] + 1))):
        side = -1 if rng.random() < 0.5 else 1
        px = (street.left_kerb - 0.4) if side < 0 else (street.right_kerb + 0.4)
        pz = rng.uniform(6.0, 60.0)
        pole_top = rng.uniform(4.0, 7.0)
        where, x, y = canvas.billboard(pz, (px - 1.0, px + 1.0), (0.0, pole_top + 0.5))
        half = max(style.pole_radius, canvas.min_width(pz, style.pole_pixels) / 2)
        canvas.paint((np.abs(x - px) < half) & (y >= 0) & (y < pole_top), pz, POLE, style.pole,
                     where=where)
        attachment = rng.random()
        if attachment < 0.4:
            sy, sr = pole_top - 0.6, max(0.35, canvas.min_width(pz, 2.0))
            disc = ((x - px) ** 2 + (y - sy) ** 2) < sr ** 2
            canvas.paint(disc, pz - 0.05, SIGN, _pick(rng, style.sign), where=where)
        elif attachment < 0.75:
            lx = px - side * 0.3
            box = (np.abs(x - lx) < max(0.2, canvas.min_width(pz) / 2)) & (
                np.abs(y - (pole_top - 0.5)) < 0.5)
            lamp = ((x - lx) ** 2 + (y - (pole_top - 0.2)) ** 2) < 0.12 ** 2
            canvas.paint(box, pz - 0.05, LIGHT, style.light, details=((lamp, (230, 60, 40)),),
                         where=where)


def _paint_persons(rng: np.random.Generator, canvas: _Canvas, style: Style,
                   street: _Street) -> None:
    """Pedestrians on the sidewalks (or crossing the road): head, torso and legs."""
    sidewalk = street.sidewalk
    for _ in range(int(rng.integers(style.persons_per_scene[0], style.persons_per_scene[1] + 1))):
        if style.persons_crossing > 0 and rng.random() < style.persons_crossing:
            px = rng.uniform(street.left_kerb + 0.5, street.right_kerb - 0.5)
        else:
            side = -1 if rng.random() < 0.5 else 1
            px = (street.left_kerb - rng.uniform(0.5, sidewalk[0] - 0.3) if side < 0
                  else street.right_kerb + rng.uniform(0.5, sidewalk[1] - 0.3))
        pz = rng.uniform(4.0, 35.0)
        ph = rng.uniform(*style.person_height)
        where, x, y = canvas.billboard(pz, (px - 0.3 * ph, px + 0.3 * ph), (0.0, ph))
        dx = x - px
        head = (dx ** 2 + (y - 0.93 * ph) ** 2) < (0.07 * ph) ** 2
        torso = (np.abs(dx) < 0.12 * ph) & (y >= 0.5 * ph) & (y < 0.86 * ph)
        legs = (np.abs(np.abs(dx) - 0.05 * ph) < 0.035 * ph) & (y >= 0) & (y < 0.5 * ph)
        canvas.paint(head | torso | legs, pz, PERSON, _pick(rng, style.clothes),
                     details=((head, style.skin), (legs, (40, 40, 60))), where=where)


def _paint_vehicles(rng: np.random.Generator, canvas: _Canvas, style: Style,
                    street: _Street) -> None:
    """Cars in random lanes, then (sometimes) a bus."""
    left_kerb, right_kerb = street.left_kerb, street.right_kerb
    for _ in range(int(rng.integers(style.cars_per_scene[0], style.cars_per_scene[1] + 1))):
        lane = rng.uniform(left_kerb + 1.0, right_kerb - 1.0)
        vz = rng.uniform(5.0, 70.0)
        w = rng.uniform(*style.car_width)
        where, x, y = canvas.billboard(vz, (lane - w, lane + w), (0.0, 1.6))
        dx = x - lane
        body = (np.abs(dx) < w / 2) & (y >= 0.25) & (y < 1.0)
        cabin = (y >= 1.0) & (y < 1.5) & (np.abs(dx) < w / 2 * (0.85 - 0.3 * (y - 1.0) / 0.5))
        wheels = (np.abs(np.abs(dx) - 0.33 * w) < 0.16 * w) & (y >= 0) & (y < 0.3)
        glass = (y >= 1.05) & (y < 1.42) & (np.abs(dx) < w / 2 * (0.75 - 0.3 * (y - 1.0) / 0.5))
        lamps = (np.abs(np.abs(dx) - 0.4 * w) < 0.07 * w) & (np.abs(y - 0.8) < 0.07)
        canvas.paint(body | cabin | wheels, vz, CAR, _pick(rng, style.cars),
                     np.clip(1.25 - 0.35 * y, 0.6, 1.2),
                     details=((glass, (50, 60, 70)), (wheels, (20, 20, 20)), (lamps, (200, 0, 0))),
                     where=where)

    if rng.random() < style.bus_probability:
        lane = rng.uniform(left_kerb + 1.4, right_kerb - 1.4)
        bz = rng.uniform(12.0, 60.0)
        where, x, y = canvas.billboard(bz, (lane - 1.3, lane + 1.3), (0.0, 3.3))
        box = (np.abs(x - lane) < 1.25) & (y >= 0.1) & (y < 3.2)
        glass = (y > 1.6) & (y < 2.8) & (np.abs(x - lane) < 1.1)
        canvas.paint(box, bz, BUS, style.bus, details=((glass, (50, 60, 70)),), where=where)


def _shade(rng: np.random.Generator, canvas: _Canvas, style: Style) -> np.ndarray:
    """Lighting, texture, haze, blur and sensor noise: the appearance of a domain."""
    image = canvas.colour * canvas.light[..., None]
    shape = canvas.label.shape
    if style.texture > 0:
        # Surface texture: coarse and fine value noise, stronger on vegetation and terrain.
        noise = (_value_noise(rng, shape, 6) + 0.5 * _value_noise(rng, shape, 24))
        rough = np.isin(canvas.label, (VEGETATION, TERRAIN))
        amplitude = np.where(rough, 2.0 * style.texture, style.texture)
        solid = canvas.label != SKY
        factor = 1.0 + np.where(solid, amplitude * noise, 0.0)
        image = image * factor.astype(np.float32)[..., None]
    if style.foliage > 0:
        # Leaves: fine clumps and per-pixel speckle on vegetation, in any season's colours.
        leaves = 0.6 * _value_noise(rng, shape, 40) + 0.4 * rng.uniform(-1, 1, shape)
        factor = 1.0 + np.where(canvas.label == VEGETATION, style.foliage * leaves, 0.0)
        image = image * factor.astype(np.float32)[..., None]
    haze = 1.0 - np.exp(-np.minimum(canvas.depth, 1e4) / np.float32(style.fog_distance))
    haze = np.where(canvas.label == SKY, np.float32(0.0), haze)[..., None]
    image = image * (1 - haze) + np.asarray(style.fog, np.float32) * haze
    if style.blur > 0:
        image = _gaussian_blur(image, style.blur)
    if style.noise > 0:
        image = image + np.float32(style.noise) * rng.standard_normal(image.shape, np.float32)
    image = 255.0 * (np.clip(image, 0, 255) / np.float32(255.0)) ** np.float32(style.gamma)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def generate_sample(seed: int, domain: str, split: str, index: int, height: int, width: int,
                    pair: str = "easy") -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and label (H, W) uint8 trainIds of one benchmark image."""
    rng = np.random.default_rng(sample_seed(seed, domain, split, index, pair))
    return render_scene(rng, PAIRS[pair][domain], height, width)


def colourise(label: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 in the Cityscapes palette; ignore is black."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    palette[IGNORE_INDEX] = 0
    return palette[label]


def sample_sheet(seed: int = 0, count: int = 3, height: int = 128, width: int = 256,
                 pair: str = "easy") -> np.ndarray:
    """A picture of the benchmark: per row one domain, `count` (image | label) pairs."""
    gap = 4
    rows = []
    for domain in ("source", "target"):
        tiles = []
        for index in range(count):
            image, label = generate_sample(seed, domain, "train", index, height, width, pair)
            tiles += [image, colourise(label), np.full((height, gap, 3), 255, np.uint8)]
        rows += [np.concatenate(tiles[:-1], axis=1),
                 np.full((gap, tiles[0].shape[1] * 2 * count + gap * (count - 1), 3), 255,
                         np.uint8)]
    return np.concatenate(rows[:-1], axis=0)


def write_sample(seed: int, domain: str, split: str, index: int, height: int, width: int,
                 image_path: Path, label_path: Path, pair: str = "easy") -> list[int]:
    """Generate one benchmark image, write image and label PNGs; returns per-class pixel counts."""
    image, label = generate_sample(seed, domain, split, index, height, width, pair)
    Image.fromarray(image, mode="RGB").save(image_path, compress_level=3)
    write_label(label_path, label)
    counts = np.bincount(label.ravel(), minlength=256)[:len(CITYSCAPES_PALETTE)]
    return [int(c) for c in counts]
