"""The 3D reconstruction verdict of a series (appendix A, note 2, and Table 12's
"3D reconstruction" attributes).

A series is a reconstructable volume when it has at least two slices, every slice has
the same orientation, the slices are evenly spaced along the slice normal, and Slice
Thickness, Spacing Between Slices and the spacing measured from Image Position
(Patient) agree within a configured tolerance. The verdict is about the whole series,
never a reason to refuse one instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Slice:
    """The geometry of one stored image."""

    sop_instance_uid: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    frames: int = 1


@dataclass(frozen=True)
class Verdict:
    """``ok`` is True for a reconstructable volume; ``reason`` says why not, or what was measured."""

    ok: bool
    reason: str


def _cross(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def verdict(slices: Sequence[Slice], tolerance_mm: float) -> Verdict:
    """Judge whether ``slices`` (one series) form a 3D volume."""
    if len(slices) < 2:
        return Verdict(False, f"{len(slices)} slice; a volume needs at least 2")
    if any(s.frames > 1 for s in slices):
        return Verdict(False, "multi-frame images are not a slice stack")
    missing = [s for s in slices if s.position is None or len(s.position) != 3
               or s.orientation is None or len(s.orientation) != 6]
    if missing:
        return Verdict(False, f"{len(missing)} slice(s) lack Image Position/Orientation (Patient)")
    first = slices[0].orientation
    assert first is not None
    for s in slices[1:]:
        assert s.orientation is not None
        if any(abs(a - b) > 1e-4 for a, b in zip(first, s.orientation)):
            return Verdict(False, f"inconsistent orientation: slice {s.sop_instance_uid} differs")
    normal = _cross(first[:3], first[3:])
    norm = math.sqrt(sum(c * c for c in normal))
    if norm < 1e-6:
        return Verdict(False, "Image Orientation (Patient) is degenerate")
    normal = (normal[0] / norm, normal[1] / norm, normal[2] / norm)
    dist = sorted(sum(p * n for p, n in zip(s.position or (), normal)) for s in slices)
    gaps = [b - a for a, b in zip(dist, dist[1:])]
    if min(gaps) < 1e-6:
        return Verdict(False, "two slices share the same position")
    spacing = (dist[-1] - dist[0]) / (len(dist) - 1)
    worst = max(abs(g - spacing) for g in gaps)
    if worst > tolerance_mm:
        return Verdict(False, f"uneven slice spacing: gaps vary by {worst:.3f} mm around {spacing:.3f} mm "
                              f"(tolerance {tolerance_mm} mm)")
    thick = {s.slice_thickness for s in slices if s.slice_thickness is not None}
    sbs = {s.spacing_between_slices for s in slices if s.spacing_between_slices is not None}
    if len(thick) > 1 and max(thick) - min(thick) > tolerance_mm:
        return Verdict(False, f"Slice Thickness varies from {min(thick)} to {max(thick)} mm")
    if len(sbs) > 1 and max(sbs) - min(sbs) > tolerance_mm:
        return Verdict(False, f"Spacing Between Slices varies from {min(sbs)} to {max(sbs)} mm")
    t = next(iter(thick)) if thick else None
    g = next(iter(sbs)) if sbs else None
    if t is not None and g is not None and abs(t - g) > tolerance_mm:
        return Verdict(False, f"Slice Thickness {t} mm and Spacing Between Slices {g} mm differ "
                              f"by more than {tolerance_mm} mm")
    if g is not None and abs(g - spacing) > tolerance_mm:
        return Verdict(False, f"Spacing Between Slices {g} mm disagrees with the measured spacing "
                              f"{spacing:.3f} mm")
    if g is None and t is not None and abs(t - spacing) > tolerance_mm:
        return Verdict(False, f"Slice Thickness {t} mm disagrees with the measured spacing {spacing:.3f} mm")
    return Verdict(True, f"{len(slices)} slices, {spacing:.3f} mm apart")
