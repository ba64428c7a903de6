"""Dose-grid geometry and resampling: pure computation on numpy arrays, no I/O.

* :class:`Grid` is a regular grid of points in patient coordinates (mm), described the way
  a multi-frame RT Dose describes itself: Image Orientation and Position (Patient), Pixel
  Spacing and the frames' offsets along the normal (Grid Frame Offset Vector).
* :func:`roi_grid` places a grid on an image series' lattice (its pixel spacing and slice
  positions, or others given) so that it covers a set of contour points, edges included.
* :func:`resample` interpolates a dose volume (any orientation, optionally in another frame
  of reference through a 4x4 registration) at a grid's points with scipy's
  ``RegularGridInterpolator``; points outside the input are 0 and counted.
* :func:`quantize` chooses Dose Grid Scaling so that the largest dose fits 16 stored bits.
* :class:`Box` is the region a grid or a set of points spans; :func:`fraction_inside` says how
  much of one box (its volume, or its area or length when it is flat) lies inside another,
  whatever their orientations, exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from appliance.errors import ApplianceError

#: How far (mm) from orthonormal an orientation's direction cosines may be.
ORTHONORMAL_TOLERANCE = 1e-4
#: Points this close (mm) outside an input grid's edge count as on the edge (floating-point noise).
EDGE_TOLERANCE_MM = 1e-6
#: How far (mm) a point may lie beyond a box and still count as inside it, and how thin a box
#: may be and count as flat: the rounding of coordinates written as decimal strings, clinically nothing.
COVERAGE_TOLERANCE_MM = 0.01
#: Interpolation methods offered (scipy's names); "linear" is trilinear.
METHODS = ("linear", "nearest", "cubic")
#: Stored bits of the generated RT Dose pixels. dicom3tools (dciodvfy) cannot read 32-bit
#: pixel data, so 16 bits: the quantization step is at most 1/65535 of the largest dose.
BITS = 16


class GeometryError(ApplianceError):
    """A grid's geometry is unusable (degenerate orientation, spacing, offsets)."""


def axes_of(orientation: tuple[float, ...]) -> np.ndarray:
    """Return the 3x3 matrix whose columns are the row direction, the column direction and
    their normal, from six direction cosines; raise GeometryError unless orthonormal."""
    if len(orientation) != 6:
        raise GeometryError(f"Image Orientation (Patient) has {len(orientation)} values; it needs 6")
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    if (abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOLERANCE or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOLERANCE
            or abs(float(row @ col)) > ORTHONORMAL_TOLERANCE):
        raise GeometryError(f"Image Orientation (Patient) {list(orientation)} is not two orthonormal directions")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return np.column_stack([row, col, np.cross(row, col)])


@dataclass(frozen=True)
class Grid:
    """A regular grid: point (frame k, row j, column i) lies at
    ``origin + i * spacing[1] * row_dir + j * spacing[0] * col_dir + offsets[k] * normal``.

    ``spacing`` is in Pixel Spacing order (between rows, between columns); ``offsets`` are
    strictly monotonic, the first is 0 (Grid Frame Offset Vector, relative form)."""

    origin: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    spacing: tuple[float, float]
    rows: int
    columns: int
    offsets: tuple[float, ...]

    def __post_init__(self) -> None:
        axes_of(self.orientation)
        if min(self.spacing) <= 0:
            raise GeometryError(f"pixel spacing {list(self.spacing)} mm must be positive")
        if self.rows < 1 or self.columns < 1 or not self.offsets:
            raise GeometryError(f"a grid of {len(self.offsets)} x {self.rows} x {self.columns} points is empty")
        d = np.diff(self.offsets)
        if len(d) and not (np.all(d > 0) or np.all(d < 0)):
            raise GeometryError("the frames' offsets along the normal are not strictly monotonic")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, rows, columns), the order of the values array."""
        return (len(self.offsets), self.rows, self.columns)

    @property
    def axes(self) -> np.ndarray:
        return axes_of(self.orientation)

    def positions(self) -> np.ndarray:
        """Image Position (Patient) of each frame, shape (frames, 3)."""
        return np.asarray(self.origin) + np.outer(self.offsets, self.axes[:, 2])

    def points(self) -> np.ndarray:
        """Patient coordinates of every grid point, shape (frames, rows, columns, 3)."""
        ax = self.axes
        k, j, i = np.meshgrid(np.asarray(self.offsets, dtype=float), np.arange(self.rows) * self.spacing[0],
                              np.arange(self.columns) * self.spacing[1], indexing="ij")
        pts: np.ndarray = np.asarray(self.origin) + i[..., None] * ax[:, 0] + j[..., None] * ax[:, 1] \
            + k[..., None] * ax[:, 2]
        return pts

    def local(self, points: np.ndarray) -> np.ndarray:
        """Coordinates (along row dir, along column dir, along normal) of ``points`` (..., 3)
        relative to the origin, in mm."""
        local: np.ndarray = (np.asarray(points, dtype=float) - np.asarray(self.origin)) @ self.axes
        return local

    def box(self) -> Box:
        """The box the grid's points span, from its first to its last row, column and frame."""
        return Box(self.origin, self.orientation,
                   (0.0, 0.0, float(min(self.offsets))),
                   ((self.columns - 1) * self.spacing[1], (self.rows - 1) * self.spacing[0], float(max(self.offsets))))


@dataclass(frozen=True)
class Box:
    """The points ``origin + u[0] * row_dir + u[1] * col_dir + u[2] * normal`` with
    ``lo <= u <= hi``: a box in patient coordinates (mm) along an orientation's axes."""

    origin: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @property
    def axes(self) -> np.ndarray:
        return axes_of(self.orientation)

    @classmethod
    def around(cls, points: np.ndarray, origin: tuple[float, float, float],
               orientation: tuple[float, float, float, float, float, float]) -> Box:
        """The smallest box along ``orientation``'s axes (coordinates from ``origin``) holding ``points`` (N, 3)."""
        pts = np.asarray(points, dtype=float).reshape(-1, 3)
        if not len(pts):
            raise GeometryError("no contour points to bound")
        local = (pts - np.asarray(origin)) @ axes_of(orientation)
        lo, hi = local.min(axis=0), local.max(axis=0)
        return cls(origin, orientation, (float(lo[0]), float(lo[1]), float(lo[2])),
                   (float(hi[0]), float(hi[1]), float(hi[2])))


def fraction_inside(box: Box, region: Box, *, to_region: np.ndarray | None = None,
                    tolerance: float = COVERAGE_TOLERANCE_MM) -> float:
    """The fraction (0..1) of ``box`` that lies inside ``region`` grown by ``tolerance`` mm.

    The fraction is of the box's volume; of its area, length or its one point along the axes
    on which it is thinner than ``tolerance`` (a structure drawn on one slice is flat).
    ``to_region`` is a 4x4 matrix taking the box's coordinates into the region's frame of
    reference (None: the same frame); the region may lie in any orientation to the box.
    Exact up to rounding: the part inside is a convex polytope, measured from its vertices."""
    lo, hi = np.asarray(box.lo, dtype=float), np.asarray(box.hi, dtype=float)
    m = np.eye(4) if to_region is None else np.asarray(to_region, dtype=float)
    # Region coordinates of the box point u: c @ u + d.
    c = region.axes.T @ m[:3, :3] @ box.axes
    d = region.axes.T @ (m[:3, :3] @ np.asarray(box.origin) + m[:3, 3] - np.asarray(region.origin))
    flat = hi - lo < tolerance
    d = d + c[:, flat] @ ((lo + hi) / 2)[flat]
    c, lo, hi = c[:, ~flat], lo[~flat], hi[~flat]
    n = len(lo)
    rlo = np.asarray(region.lo, dtype=float) - tolerance
    rhi = np.asarray(region.hi, dtype=float) + tolerance
    # The part inside: g @ x <= h, over the box's coordinates along its n axes that are not flat.
    g = np.vstack([np.eye(n), -np.eye(n), c, -c])
    h = np.concatenate([hi, -lo, rhi - d, d - rlo])
    eps = 1e-9 * max(1.0, float(np.max(np.abs(h))))
    if n == 0:
        return 1.0 if bool(np.all(h >= -eps)) else 0.0
    vertices = []
    for rows in itertools.combinations(range(len(g)), n):
        a = g[list(rows)]
        if abs(np.linalg.det(a)) < 1e-12:
            continue
        x = np.linalg.solve(a, h[list(rows)])
        if np.all(g @ x <= h + eps):
            vertices.append(x)
    if len(vertices) < n + 1:
        return 0.0
    pts = np.asarray(vertices)
    if n == 1:
        measure = float(pts.max() - pts.min())
    else:
        from scipy.spatial import ConvexHull, QhullError  # noqa: PLC0415 - see resample

        try:
            measure = float(ConvexHull(pts).volume)  # the area when n == 2
        except QhullError:  # the vertices span less than n dimensions: nothing inside
            measure = 0.0
    return min(1.0, measure / float(np.prod(hi - lo)))


@dataclass(frozen=True)
class Lattice:
    """Where a series' voxels are: its first slice's position, orientation, pixel spacing and
    every slice's offset along the normal (ascending, the first 0)."""

    origin: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    spacing: tuple[float, float]
    offsets: tuple[float, ...]

    def with_spacing(self, pixel_spacing: tuple[float, float] | None = None,
                     slice_spacing: float | None = None) -> Lattice:
        """The same lattice with another in-plane spacing and/or evenly spaced slices
        (anchored at the first slice, covering the series' extent)."""
        spacing = pixel_spacing or self.spacing
        offsets = self.offsets
        if slice_spacing is not None:
            if slice_spacing <= 0:
                raise GeometryError(f"slice spacing {slice_spacing} mm must be positive")
            n = int(math.floor(self.offsets[-1] / slice_spacing + 1e-9)) + 1
            offsets = tuple(float(m * slice_spacing) for m in range(n))
        if min(spacing) <= 0:
            raise GeometryError(f"pixel spacing {list(spacing)} mm must be positive")
        return Lattice(self.origin, self.orientation, (float(spacing[0]), float(spacing[1])), offsets)


def _covering(lo: float, hi: float, step: float) -> tuple[int, int]:
    """Lattice indices (n0, n1), n*step, with n0*step <= lo and n1*step >= hi, edges included."""
    eps = 1e-6
    return int(math.floor(lo / step + eps)), int(math.ceil(hi / step - eps))


def _extended(offsets: tuple[float, ...], lo: float, hi: float) -> list[float]:
    """The slice offsets, extended beyond either end by the end gaps until they reach lo and hi."""
    out = list(offsets)
    lo_gap = out[1] - out[0] if len(out) > 1 else 1.0
    hi_gap = out[-1] - out[-2] if len(out) > 1 else 1.0
    while out[0] > lo + EDGE_TOLERANCE_MM:
        out.insert(0, out[0] - lo_gap)
    while out[-1] < hi - EDGE_TOLERANCE_MM:
        out.append(out[-1] + hi_gap)
    return out


def roi_grid(lattice: Lattice, points: np.ndarray) -> Grid:
    """The smallest grid on ``lattice`` that contains ``points`` (N, 3): its first and last
    rows, columns and frames lie on or beyond the points' extremes, less than one step away."""
    pts = np.asarray(points, dtype=float).reshape(-1, 3)
    if not len(pts):
        raise GeometryError("no contour points to bound")
    ax = axes_of(lattice.orientation)
    local = (pts - np.asarray(lattice.origin)) @ ax
    dy, dx = lattice.spacing
    i0, i1 = _covering(float(local[:, 0].min()), float(local[:, 0].max()), dx)
    j0, j1 = _covering(float(local[:, 1].min()), float(local[:, 1].max()), dy)
    lo, hi = float(local[:, 2].min()), float(local[:, 2].max())
    offsets = _extended(lattice.offsets, lo, hi)
    k0 = max(k for k, w in enumerate(offsets) if w <= lo + EDGE_TOLERANCE_MM)
    k1 = min(k for k, w in enumerate(offsets) if w >= hi - EDGE_TOLERANCE_MM)
    first = offsets[k0]
    origin = np.asarray(lattice.origin) + ax @ np.array([i0 * dx, j0 * dy, first])
    return Grid(
        (float(origin[0]), float(origin[1]), float(origin[2])),
        lattice.orientation,
        lattice.spacing,
        j1 - j0 + 1,
        i1 - i0 + 1,
        tuple(float(w - first) for w in offsets[k0:k1 + 1]),
    )


@dataclass(frozen=True)
class Resampled:
    """Dose values (Gy) on a grid, shape (frames, rows, columns), and how many grid points
    fell outside the input grid (set to 0)."""

    values: np.ndarray
    outside: int


def resample(values: np.ndarray, source: Grid, target: Grid, *, to_source: np.ndarray | None = None,
             method: str = "linear") -> Resampled:
    """Interpolate ``values`` (on ``source``, shape ``source.shape``) at every point of ``target``.

    ``to_source`` is a 4x4 matrix taking target (image series) coordinates into the source's
    frame of reference (None: the same frame). ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise GeometryError(f"interpolation '{method}' is unknown; use one of {', '.join(METHODS)}")
    values = np.asarray(values, dtype=float)
    if values.shape != source.shape:
        raise GeometryError(f"the dose array has shape {values.shape}, its grid {source.shape}")
    need = 4 if method == "cubic" else 2
    if min(source.shape) < need:
        raise GeometryError(f"the input dose grid is {source.shape[0]} x {source.shape[1]} x {source.shape[2]} "
                            f"points; {method} interpolation needs at least {need} along each axis")
    offsets = np.asarray(source.offsets, dtype=float)
    if offsets[-1] < offsets[0]:
        offsets, values = offsets[::-1], values[::-1]
    axes = (offsets, np.arange(source.rows) * source.spacing[0], np.arange(source.columns) * source.spacing[1])
    pts = target.points().reshape(-1, 3)
    if to_source is not None:
        pts = pts @ to_source[:3, :3].T + to_source[:3, 3]
    u = source.local(pts)[:, ::-1]  # (along normal, along columns, along rows) = the array's axes
    for d, a in enumerate(axes):  # points on an edge up to rounding are on it
        lo, hi = a[0], a[-1]
        near = (u[:, d] < lo) & (u[:, d] >= lo - EDGE_TOLERANCE_MM)
        u[near, d] = lo
        near = (u[:, d] > hi) & (u[:, d] <= hi + EDGE_TOLERANCE_MM)
        u[near, d] = hi
    # scipy takes half a second to import: only the dose export pays for it, not every
    # 'appliance' command (the CLI imports every command module to build its parser).
    from scipy.interpolate import RegularGridInterpolator  # noqa: PLC0415

    interp = RegularGridInterpolator(axes, values, method=method, bounds_error=False, fill_value=np.nan)
    out = interp(u)
    outside = np.isnan(out)
    out[outside] = 0.0
    return Resampled(out.reshape(target.shape), int(outside.sum()))


@dataclass(frozen=True)
class Quantized:
    """Stored pixel values and the Dose Grid Scaling (as written, a DS of at most 16 characters)."""

    pixels: np.ndarray  # uint16
    scaling: str

    @property
    def dose(self) -> np.ndarray:
        """The doses (Gy) a reader gets back: pixels times the scaling."""
        return self.pixels.astype(float) * float(self.scaling)


def quantize(values: np.ndarray) -> Quantized:
    """Scale non-negative doses (Gy) to :data:`BITS` unsigned bits: the largest dose maps to at
    most 2**BITS - 1 (never clipped); the error of each value is at most half the scaling."""
    values = np.asarray(values, dtype=float)
    if values.size and float(values.min()) < 0:
        raise GeometryError(f"dose values must not be negative (lowest {float(values.min()):g} Gy)")
    top = float(values.max()) if values.size else 0.0
    levels = 2**BITS - 1
    if top <= 0:
        return Quantized(np.zeros(values.shape, dtype=np.uint16), "1")
    exact = top / levels
    # 9 significant digits round by at most 5e-9 relative: 1e-8 up makes the written value >= exact,
    # so the largest dose never exceeds the stored bits. 14 characters, within DS's 16.
    text = f"{exact * (1 + 1e-8):.8e}"
    assert float(text) >= exact
    pixels = np.rint(values / float(text))
    return Quantized(np.clip(pixels, 0, levels).astype(np.uint16), text)
