"""The looks of the synthetic benchmark's domains: one `Style` per domain, two per pair.

A style sets the colours, lighting, camera, geometry and object statistics of a domain; the
renderer (`stages.data.synthetic`) draws scenes from it. The source is clean, flat-shaded and
saturated (game-like).

- `easy`: the target shares the source's geometry and layout rules and is overcast and hazy,
  textured, blurred and noisy, with more cars and smaller persons. Most of this gap is a global
  change of appearance, which recomputing batch-norm statistics on the target closes.
- `hard`: the target changes what a class looks like class by class (autumn trees in the
  colours of the source's façades, sidewalks paved like the source's road), the camera (higher,
  pitched down, a wider view), the class frequencies (more persons than cars) and the thin
  classes (railings, thinner poles). Classes keep their shapes and surface structure (crown
  outlines and leaves, paving joints) across domains, and part of each changed class keeps a
  source-like look, so a source model's predictions still carry signal to self-train from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Style:
    """Appearance, geometry and object statistics of one domain.

    A choice with one option (one vegetation colour) and a feature at 0 (paving, foliage, ragged
    crowns, railings, persons crossing) draws no random numbers, so adding a feature to a style
    leaves the images of the styles without it unchanged.
    """

    sky_top: Colour
    sky_bottom: Colour
    road: Colour
    marking: Colour
    sidewalk: tuple[Colour, ...]  # one per scene
    buildings: tuple[Colour, ...]
    window: Colour
    wall: Colour
    fence: Colour
    vegetation: tuple[Colour, ...]  # one per tree
    terrain: Colour
    pole: Colour
    sign: tuple[Colour, ...]
    light: Colour
    cars: tuple[Colour, ...]
    clothes: tuple[Colour, ...]
    skin: Colour
    bus: Colour
    fog: Colour
    fog_distance: float  # metres at which 63 % of the colour is haze
    shade: float  # brightness of the façades facing away from the light
    texture: float  # amplitude of surface texture (0: flat shading)
    blur: float  # Gaussian blur sigma in pixels
    noise: float  # sensor noise sigma in grey levels
    gamma: float
    cars_per_scene: tuple[int, int]
    persons_per_scene: tuple[int, int]
    person_height: tuple[float, float]
    bus_probability: float
    camera_height: tuple[float, float]
    window_period: tuple[float, float] = (3.0, 3.2)  # (along the street, vertical)
    # Camera and street geometry.
    focal: tuple[float, float] = (0.5, 0.6)  # focal length / image width: smaller sees wider
    horizon: tuple[float, float] = (0.36, 0.46)  # horizon row / image height: the pitch
    road_half_width: tuple[float, float] = (3.5, 6.0)
    sidewalk_width: tuple[float, float] = (2.0, 4.0)
    car_width: tuple[float, float] = (1.7, 2.0)
    persons_crossing: float = 0.0  # probability that a person walks on the road
    # Thin structures.
    poles_per_scene: tuple[int, int] = (2, 5)
    pole_radius: float = 0.08  # metres, and never under `pole_pixels` pixels wide
    pole_pixels: float = 1.2
    railing: float = 0.0  # spacing of a fence's bars in metres (0: solid panels)
    # Surface structure that marks a class whatever its colour.
    paving: float = 0.0  # darkening of the joints between sidewalk slabs
    foliage: float = 0.0  # amplitude of leaf texture on vegetation
    ragged: float = 0.0  # irregularity of tree crown outlines, relative to the radius


SOURCE_STYLE = Style(
    sky_top=(40, 120, 235), sky_bottom=(150, 205, 255),
    road=(95, 85, 110), marking=(250, 250, 250), sidewalk=((205, 180, 150),),
    buildings=((225, 180, 120), (190, 90, 70), (235, 215, 170), (160, 120, 90)),
    window=(60, 90, 140), wall=(200, 200, 120), fence=(170, 110, 60),
    vegetation=((40, 170, 40),), terrain=(150, 210, 70), pole=(110, 110, 120),
    sign=((30, 80, 220), (230, 30, 30)), light=(30, 30, 30),
    cars=((220, 30, 30), (30, 60, 220), (240, 240, 240), (250, 200, 20), (30, 30, 30)),
    clothes=((240, 100, 20), (20, 160, 200), (200, 30, 150), (250, 230, 60)),
    skin=(230, 180, 140), bus=(250, 150, 0),
    fog=(190, 215, 255), fog_distance=400.0, shade=0.7, texture=0.0, blur=0.0, noise=0.0,
    gamma=1.0, cars_per_scene=(1, 4), persons_per_scene=(0, 3), person_height=(1.7, 1.95),
    bus_probability=0.15, camera_height=(1.5, 1.8),
)


def _overcast(colour: Colour, desaturate: float = 0.4, brightness: float = 0.82,
              tint: Colour = (6, 2, -6)) -> Colour:
    """A source colour as seen under an overcast sky by a real camera: paler, darker, warmer."""
    grey = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return tuple(int(np.clip((c * (1 - desaturate) + grey * desaturate) * brightness + t, 0, 255))
                 for c, t in zip(colour, tint))  # type: ignore[return-value]


def _overcast_all(colours: tuple[Colour, ...]) -> tuple[Colour, ...]:
    return tuple(_overcast(colour) for colour in colours)


# The easy target keeps the source's hue relations (a road is still darker and bluer than a
# façade) but not its colours: paler, darker, warmer light, haze, texture, blur, noise and gamma,
# with more and smaller objects. Recomputing batch-norm statistics on the target closes most of
# this gap.
_S = SOURCE_STYLE
TARGET_STYLE = Style(
    sky_top=(150, 170, 195), sky_bottom=(200, 208, 215),
    road=_overcast(_S.road), marking=_overcast(_S.marking), sidewalk=_overcast_all(_S.sidewalk),
    buildings=_overcast_all(_S.buildings + ((170, 150, 140),)), window=_overcast(_S.window),
    wall=_overcast(_S.wall), fence=_overcast(_S.fence), vegetation=_overcast_all(_S.vegetation),
    terrain=_overcast(_S.terrain), pole=_overcast(_S.pole), sign=_overcast_all(_S.sign),
    light=_overcast(_S.light),
    cars=_overcast_all(_S.cars + ((120, 120, 130), (40, 60, 110))),
    clothes=_overcast_all(_S.clothes + ((60, 60, 70), (110, 100, 90))),
    skin=_overcast(_S.skin), bus=_overcast(_S.bus),
    fog=(200, 203, 205), fog_distance=150.0, shade=0.85, texture=0.15, blur=0.7, noise=5.0,
    gamma=1.15, cars_per_scene=(2, 7), persons_per_scene=(1, 5), person_height=(1.35, 1.65),
    bus_probability=0.1, camera_height=(1.3, 1.6), window_period=(2.2, 2.6),
)

# The hard source is the easy source with surface structure that marks a class whatever its
# colour (paved sidewalks, leafy and ragged tree crowns): cues a model can carry to a target
# where the colours mislead.
HARD_SOURCE_STYLE = replace(SOURCE_STYLE, paving=0.3, foliage=0.35, ragged=0.12)

# The hard target changes what a class looks like, class by class, so that no global
# correction of the colours undoes it: three trees in five are autumn trees in the browns and
# oranges of the source's façades, two sidewalks in three are paved in the source's asphalt
# (the others in light concrete), façades are grey and white, terrain is dry, vehicles come in
# new finishes, and the road is a lighter, greyer asphalt. The camera sits higher, looks further
# down and sees wider; persons outnumber cars and sometimes cross the road; fences are railings
# of thin bars and poles are thinner. The green trees and concrete sidewalks are what a source
# model still recognises: the signal self-training starts from.
HARD_TARGET_STYLE = Style(
    sky_top=(120, 160, 210), sky_bottom=(200, 215, 230),
    road=(85, 82, 88), marking=(235, 235, 225),
    sidewalk=(_S.road, _S.road, (170, 165, 160)),
    buildings=((200, 200, 195), (150, 155, 160), (230, 230, 222), (120, 125, 135),
               (235, 215, 170)),
    window=(45, 55, 65), wall=(175, 170, 150), fence=(50, 70, 60),
    vegetation=((95, 145, 55), (120, 150, 60), (190, 90, 70), (215, 140, 60), (160, 120, 90)),
    terrain=(190, 175, 110), pole=(90, 95, 100),
    sign=((30, 80, 220), (230, 30, 30)), light=(30, 30, 30),
    cars=((40, 110, 90), (150, 150, 155), (100, 30, 40), (200, 190, 160), (30, 40, 60)),
    clothes=((60, 60, 70), (110, 100, 90), (150, 40, 40), (40, 70, 120), (200, 200, 190)),
    skin=(200, 160, 130), bus=(200, 40, 40),
    fog=(205, 210, 215), fog_distance=250.0, shade=0.8, texture=0.08, blur=0.5, noise=3.0,
    gamma=1.05, cars_per_scene=(0, 2), persons_per_scene=(3, 8), person_height=(1.6, 1.9),
    bus_probability=0.2, camera_height=(2.2, 2.8), window_period=(2.4, 2.8),
    focal=(0.38, 0.46), horizon=(0.22, 0.32), road_half_width=(3.0, 4.5),
    sidewalk_width=(3.0, 5.0), car_width=(1.8, 2.1), persons_crossing=0.3,
    poles_per_scene=(4, 8), pole_radius=0.05, pole_pixels=1.0, railing=0.9,
    paving=0.3, foliage=0.35, ragged=0.12,
)

PAIRS: dict[str, dict[str, Style]] = {
    "easy": {"source": SOURCE_STYLE, "target": TARGET_STYLE},
    "hard": {"source": HARD_SOURCE_STYLE, "target": HARD_TARGET_STYLE},
}
Pair = Literal["easy", "hard"]
PAIR_CODES = {"easy": 0, "hard": 1}
