"""Geometry for projection texturing, in torch: rasterize meshes from cameras and in UV space, project
generated views back onto the mesh, bake them into UV textures, blend views, fill what no view saw.

Conventions (docs/protocol.md, `project`):
- Triangles: [m, 3, 3] world positions; UVs: [m, 3, 2] per corner, Blender's (0, 0) is the texture's
  bottom-left, v points up; `objects`: [m] the textured object of each triangle, -1 for occluders.
- Cameras: `view` [4, 4] world -> camera (Blender's: the camera looks down -Z, +Y up), `projection` [4, 4]
  camera -> clip (OpenGL). Pixel column x and row y (row 0 at the top) of a W x H image, centres at +0.5:
  x = (ndc_x + 1) / 2 * W, y = (1 - ndc_y) / 2 * H. Depth is the distance along the camera's view axis.
- Images and textures: float [H, W, C] in 0..1, rows top to bottom (as written to PNG). Texel (row r,
  column c) of a T x T texture sits at u = (c + 0.5) / T, v = 1 - (r + 0.5) / T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CANDIDATES_PER_CHUNK = 2**22  # (pixel, triangle) pairs tested at once: bounds memory to a few hundred MB
INSIDE_EPS = 1e-5  # barycentric slack: pixel centres on a shared edge belong to both triangles (no cracks)
MIN_FACING = 0.05  # texels seen more edge-on than this (cosine) take nothing from a view
DEPTH_SLACK = 2.0  # depth test tolerance in pixel footprints (grows as the surface turns away)
NEARBY = 2.0  # a pixel tap counts when its surface point lies within this many pixel footprints of the texel


@dataclass
class Mesh:
    triangles: torch.Tensor  # float [m, 3, 3] world positions
    uvs: torch.Tensor  # float [m, 3, 2]
    objects: torch.Tensor  # long [m]: textured object index, -1 = occluder only

    @property
    def normals(self) -> torch.Tensor:
        """Unit face normals [m, 3] (right-handed winding; zero for degenerate triangles)."""
        t = self.triangles
        return F.normalize(torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), dim=-1)


@dataclass
class Camera:
    view: torch.Tensor  # [4, 4] world -> camera
    projection: torch.Tensor  # [4, 4] camera -> clip
    width: int
    height: int

    @property
    def orthographic(self) -> bool:
        return bool(self.projection[3, 3] != 0)

    @property
    def position(self) -> torch.Tensor:
        return torch.linalg.inv(self.view)[:3, 3]

    def clip(self, points: torch.Tensor) -> torch.Tensor:
        """World points [..., 3] -> clip coordinates [..., 4]."""
        homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
        return homogeneous @ (self.projection @ self.view).T

    def depth(self, points: torch.Tensor) -> torch.Tensor:
        """Distance in front of the camera along its view axis."""
        return -(points @ self.view[2, :3] + self.view[2, 3])

    def to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Unit directions from points [..., 3] towards the camera."""
        if self.orthographic:
            return torch.linalg.inv(self.view)[:3, 2].expand_as(points)
        return F.normalize(self.position - points, dim=-1)

    def footprint(self, clip_w: torch.Tensor) -> torch.Tensor:
        """World size of one pixel at the given clip w (w = depth for perspective, 1 for orthographic)."""
        return clip_w * 2.0 / (self.projection[0, 0].abs() * self.width)


@dataclass
class Raster:
    triangle: torch.Tensor  # long [H, W]: the nearest triangle at each pixel centre, -1 where none
    bary: torch.Tensor  # float [H, W, 3]: its barycentric weights (perspective-correct)
    depth: torch.Tensor  # float [H, W]: its depth, +inf where none

    @property
    def covered(self) -> torch.Tensor:
        return self.triangle >= 0

    def interpolate(self, corners: torch.Tensor) -> torch.Tensor:
        """Per-pixel values [H, W, C] from per-corner values [m, 3, C] (zero where nothing was hit)."""
        index = self.triangle.clamp(min=0)
        values = (corners[index] * self.bary[..., None]).sum(dim=-2)
        return values * self.covered[..., None]


def rasterize(
    xy: torch.Tensor,
    width: int,
    height: int,
    depth: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> Raster:
    """Scan-convert triangles given in pixel coordinates xy [m, 3, 2] with a z-buffer.

    depth [m, 3]: per-corner depth (nearest wins; None: flat, the lowest triangle index wins). w [m, 3]:
    clip w per corner for perspective-correct barycentrics (None: affine, as in UV space). keep [m] bool:
    triangles to draw. The winner per pixel is one scatter_reduce over (depth bits, triangle index) keys, so
    ties are deterministic.
    """
    empty = torch.iinfo(torch.int64).max
    best = torch.full((height * width,), empty, dtype=torch.int64, device=xy.device)
    for t, pixel, bary in _inside_pairs(xy, width, height, keep, INSIDE_EPS):
        if depth is not None:
            z = ((_perspective(bary, w[t]) if w is not None else bary) * depth[t]).sum(-1)
            front = z > 0
            t, pixel, z = t[front], pixel[front], z[front]
            key = (z.float().view(torch.int32).long() << 32) | t  # positive floats order like their bits
        else:
            key = t
        best.scatter_reduce_(0, pixel, key, reduce="amin")

    hit = best != empty
    triangle = torch.where(hit, best & 0xFFFFFFFF, torch.full_like(best, -1))
    # Barycentrics and depth again for the winners only (cheaper than carrying them through the reduce).
    ys, xs = torch.meshgrid(
        torch.arange(height, device=xy.device, dtype=xy.dtype) + 0.5,
        torch.arange(width, device=xy.device, dtype=xy.dtype) + 0.5,
        indexing="ij",
    )
    safe = triangle.clamp(min=0)
    bary = _barycentric(xy[safe], xs.reshape(-1), ys.reshape(-1))
    if w is not None:
        bary = _perspective(bary, w[safe])
    z = torch.full((height * width,), float("inf"), device=xy.device, dtype=xy.dtype)
    if depth is not None:
        z = torch.where(hit, (bary * depth[safe]).sum(-1), z)
    bary = bary * hit[:, None]
    return Raster(triangle.view(height, width), bary.view(height, width, 3), z.view(height, width))


def _inside_pairs(xy: torch.Tensor, width: int, height: int, keep: torch.Tensor | None, eps: float):
    """(triangle, pixel, screen barycentrics) of every pixel centre inside a triangle of xy [m, 3, 2],
    yielded in chunks: each triangle tests the pixel centres of its bounding box."""
    device = xy.device
    x0 = torch.ceil(xy[..., 0].amin(1) - 0.5).clamp(min=0)
    x1 = torch.floor(xy[..., 0].amax(1) - 0.5).clamp(max=width - 1)
    y0 = torch.ceil(xy[..., 1].amin(1) - 0.5).clamp(min=0)
    y1 = torch.floor(xy[..., 1].amax(1) - 0.5).clamp(max=height - 1)
    drawn = (_area(xy).abs() > 1e-12) & (x1 >= x0) & (y1 >= y0) & torch.isfinite(xy).all(-1).all(-1)
    if keep is not None:
        drawn &= keep
    chosen = torch.nonzero(drawn).squeeze(1)
    span_x = (x1 - x0 + 1).long()[chosen]
    counts = span_x * (y1 - y0 + 1).long()[chosen]
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < len(chosen):
        # As many triangles as fit the chunk budget (always at least one).
        base = int(ends[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(ends, base + CANDIDATES_PER_CHUNK, right=True)), start + 1)
        n = counts[start:stop]
        owner = torch.repeat_interleave(torch.arange(stop - start, device=device), n)
        offset = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        t = chosen[start:stop][owner]
        sx = span_x[start:stop][owner]
        px = x0[t] + (offset % sx) + 0.5
        py = y0[t] + torch.div(offset, sx, rounding_mode="floor") + 0.5
        bary = _barycentric(xy[t], px, py)
        inside = (bary >= -eps).all(-1)
        yield t[inside], (py.long() * width + px.long())[inside], bary[inside]
        start = stop


def _area(xy: torch.Tensor) -> torch.Tensor:
    a, b, c = xy[:, 0], xy[:, 1], xy[:, 2]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def _barycentric(corners: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentric weights [n, 3] of points in triangles [n, 3, 2] (either winding)."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    wa = (b[:, 0] - px) * (c[:, 1] - py) - (b[:, 1] - py) * (c[:, 0] - px)
    wb = (c[:, 0] - px) * (a[:, 1] - py) - (c[:, 1] - py) * (a[:, 0] - px)
    wc = (a[:, 0] - px) * (b[:, 1] - py) - (a[:, 1] - py) * (b[:, 0] - px)
    return torch.stack([wa, wb, wc], -1) / _area(corners)[:, None]


def _perspective(bary: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics -> barycentrics on the triangle in space (divide by clip w, renormalise)."""
    scaled = bary / w
    return scaled / scaled.sum(-1, keepdim=True)


def render(mesh: Mesh, camera: Camera) -> Raster:
    """The mesh seen from the camera: nearest triangle, perspective-correct barycentrics and depth per pixel.
    Triangles reaching behind the camera (clip w <= 0 at a corner) are left out."""
    clip = camera.clip(mesh.triangles)
    w = clip[..., 3]
    in_front = (w > 1e-9).all(-1)
    ndc = clip[..., :2] / w.clamp(min=1e-9)[..., None]
    xy = torch.stack([(ndc[..., 0] + 1) * 0.5 * camera.width, (1 - ndc[..., 1]) * 0.5 * camera.height], -1)
    return rasterize(xy, camera.width, camera.height, depth=camera.depth(mesh.triangles), w=w, keep=in_front)


def depth_image(raster: Raster, far_value: float = 0.2) -> torch.Tensor:
    """Depth as depth ControlNets expect it, [H, W] in 0..1: near is bright. Normalised over what is in view:
    the nearest point 1, the farthest `far_value`, the background 0."""
    covered = raster.covered
    if not covered.any():
        return torch.zeros_like(raster.depth)
    near, far = raster.depth[covered].min(), raster.depth[covered].max()
    scaled = 1 - (raster.depth - near) / (far - near).clamp(min=1e-12) * (1 - far_value)
    return torch.where(covered, scaled, torch.zeros_like(scaled))


def normal_image(raster: Raster, mesh: Mesh, camera: Camera) -> torch.Tensor:
    """Camera-space face normals [H, W, 3] as colours (x right = red, y up = green, towards the camera =
    blue, each mapped from -1..1 to 0..1), turned to face the camera; background 0.5, 0.5, 1 (flat)."""
    normals = mesh.normals[raster.triangle.clamp(min=0)] @ camera.view[:3, :3].T
    normals = torch.where(normals[..., 2:] < 0, -normals, normals)
    flat = torch.tensor([0.0, 0.0, 1.0], device=normals.device, dtype=normals.dtype)
    normals = torch.where(raster.covered[..., None], normals, flat)
    return normals * 0.5 + 0.5


def sample(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values [n, C] of an image [H, W, C] at normalised positions x, y [n] in -1..1 (pixel edges, x right, y
    down), clamped at the border."""
    grid = torch.stack([x, y], -1).view(1, 1, -1, 2).to(image.dtype)
    values = F.grid_sample(
        image.permute(2, 0, 1)[None], grid, mode=mode, padding_mode="border", align_corners=False
    )  # fmt: skip
    return values[0, :, 0].T


def sample_uv(texture: torch.Tensor, uv: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """A texture [T, T, C] at UVs [n, 2] (v up)."""
    return sample(texture, uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2, mode)


def render_textures(raster: Raster, mesh: Mesh, textures: list[torch.Tensor], background: float = 0.0) -> torch.Tensor:
    """What the camera sees of the textured objects [H, W, C]: each pixel samples its object's texture
    through the interpolated UVs (occluders and the background show `background`)."""
    channels = textures[0].shape[-1]
    out = torch.full((*raster.triangle.shape, channels), background, dtype=textures[0].dtype)
    uv = raster.interpolate(mesh.uvs)
    none = torch.full_like(raster.triangle, -1)
    owner = torch.where(raster.covered, mesh.objects[raster.triangle.clamp(min=0)], none)
    for index, texture in enumerate(textures):
        here = owner == index
        if here.any():
            out[here] = sample_uv(texture, uv[here])
    return out


@dataclass
class Texels:
    """One object's texels that lie on its surface (inside a UV triangle), with where they are in space."""

    size: int  # T: the texture is T x T
    index: torch.Tensor  # long [k]: flat texel indices (row * T + column)
    positions: torch.Tensor  # float [k, 3] world positions
    normals: torch.Tensor  # float [k, 3] unit face normals
    overlap: float  # fraction of these texels inside more than one UV triangle (overlapping islands)
    obj: int = 0  # the object they belong to (Mesh.objects)

    @property
    def island(self) -> torch.Tensor:
        """bool [T, T]: the texels on the surface."""
        mask = torch.zeros(self.size * self.size, dtype=torch.bool, device=self.index.device)
        mask[self.index] = True
        return mask.view(self.size, self.size)


def texels(mesh: Mesh, obj: int, size: int) -> Texels:
    """Rasterize object `obj` in UV space at size x size: each texel centre inside a UV triangle gets that
    triangle's point in space (triangles of no area in space, like the slivers at a UV sphere's poles, hold
    no surface and are left out). Overlap counts texel centres strictly inside two or more UV triangles."""
    t = mesh.triangles
    edges = torch.stack([t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]], 1)
    twice_area = torch.linalg.cross(edges[:, 0], edges[:, 1]).norm(dim=-1)
    solid = twice_area > 1e-6 * edges.norm(dim=-1).amax(1) ** 2  # a sliver holds no surface
    keep = (mesh.objects == obj) & solid
    uv = mesh.uvs
    xy = torch.stack([uv[..., 0] * size, (1 - uv[..., 1]) * size], -1)
    raster = rasterize(xy, size, size, keep=keep)
    flat = raster.triangle.view(-1)
    index = torch.nonzero(flat >= 0).squeeze(1)
    bary = raster.bary.view(-1, 3)[index]
    tri = flat[index]
    positions = (mesh.triangles[tri] * bary[..., None]).sum(1)
    overlap = _overlap_fraction(xy[keep], size, len(index))
    return Texels(size, index, positions, mesh.normals[tri], overlap, obj)


def _overlap_fraction(xy: torch.Tensor, size: int, covered: int) -> float:
    """Fraction of `covered` texels whose centre lies well inside two or more of the triangles xy [m, 3, 2]."""
    if covered == 0:
        return 0.0
    # Shrink each triangle towards its centroid by a tenth of a texel: shared edges then never count twice.
    centre = xy.mean(1, keepdim=True)
    direction = xy - centre
    length = direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    shrunk = centre + direction * (1 - 0.1 / length).clamp(min=0)
    count = torch.zeros(size * size, dtype=torch.int32, device=xy.device)
    for _, pixel, _ in _inside_pairs(shrunk, size, size, None, 0.0):
        count.scatter_add_(0, pixel, torch.ones_like(pixel, dtype=torch.int32))
    return float((count > 1).sum()) / covered


def project(
    texels: Texels, camera: Camera, raster: Raster
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The texels a camera sees: their indices into `texels` [k], their normalised image positions x, y [k]
    (-1..1, y down, for `sample`) and facing weights [k] > 0: the cosine between the surface normal and the
    direction to the camera, for texels in view that face the camera (normals point out of the surface, as
    Blender's do after Recalculate Outside) and pass the depth test against the camera's z-buffer (`raster`).

    The depth test allows DEPTH_SLACK pixel footprints, more where the surface turns away (the z-buffer is
    read at the nearest pixel centre, up to half a pixel off along the slope). A texel whose nearest pixel
    shows no surface at all (a silhouette) is left out: its colour would be the background's.
    """
    facing = (texels.normals * camera.to_camera(texels.positions)).sum(-1)  # back faces: negative
    index = torch.nonzero(facing >= MIN_FACING).squeeze(1)  # back faces culled first: the rest costs more
    positions, facing = texels.positions[index], facing[index]
    clip = camera.clip(positions)
    w = clip[:, 3]
    ndc = clip[:, :2] / w.clamp(min=1e-9)[:, None]
    x, y = ndc[:, 0], -ndc[:, 1]
    in_view = (w > 1e-9) & (x.abs() <= 1) & (y.abs() <= 1)
    column = ((x + 1) * 0.5 * camera.width).long().clamp(0, camera.width - 1)
    row = ((y + 1) * 0.5 * camera.height).long().clamp(0, camera.height - 1)
    nearest = raster.depth[row, column]
    depth = camera.depth(positions)
    slack = DEPTH_SLACK * camera.footprint(w.clamp(min=1e-9) if not camera.orthographic else torch.ones_like(w))
    tolerance = slack / facing.clamp(min=0.1) + 1e-5 * depth.abs()
    visible = torch.nonzero(in_view & torch.isfinite(nearest) & (depth <= nearest + tolerance)).squeeze(1)
    return index[visible], x[visible], y[visible], facing[visible]


def surface_taps(mesh: Mesh, camera: Camera, raster: Raster, texels: Texels):
    """(seen texels [k], flat pixels [k, 4] round each (row * W + column), bilinear weights [k, 4], facing [k])
    of one object's texels in one view. A pixel counts only where it shows this object's surface within NEARBY
    footprints of the texel: at silhouettes and grazing angles the pixels round a texel can show the
    background, another object or a surface behind (the depth test's slack allows it), and their colour is
    not this texel's. Weights are renormalised over the pixels that count; texels left with none are dropped."""
    seen, x, y, facing = project(texels, camera, raster)
    h, w = raster.depth.shape
    px, py = (x + 1) * 0.5 * w - 0.5, (y + 1) * 0.5 * h - 0.5  # in pixel-centre units
    left, top = px.floor(), py.floor()
    fx, fy = px - left, py - top
    columns = torch.stack([left, left + 1, left, left + 1], 1).long()
    rows = torch.stack([top, top, top + 1, top + 1], 1).long()
    tap = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    inside = (columns >= 0) & (columns < w) & (rows >= 0) & (rows < h)
    columns, rows = columns.clamp(0, w - 1), rows.clamp(0, h - 1)
    owner = torch.where(raster.covered, mesh.objects[raster.triangle.clamp(min=0)], -1)[rows, columns]
    points = raster.interpolate(mesh.triangles)[rows, columns]
    position = texels.positions[seen]
    clip_w = camera.clip(position)[:, 3] if not camera.orthographic else torch.ones(len(seen))
    near = (points - position[:, None]).norm(dim=-1) <= NEARBY * camera.footprint(clip_w)[:, None]
    tap = tap * (inside & (owner == texels.obj) & near)
    total = tap.sum(1)
    keep = total > 1e-6
    return seen[keep], (rows * w + columns)[keep], (tap / total.clamp(min=1e-6)[:, None])[keep], facing[keep]


def read_taps(image: torch.Tensor, pixels: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Values [k, C] of an image [H, W, C] read through surface_taps' pixels and weights."""
    return (image.reshape(-1, image.shape[-1])[pixels] * taps[..., None].to(image)).sum(1)


@dataclass
class Bake:
    """One object's texture as the running facing-weighted blend of the views projected so far."""

    texels: Texels
    color: torch.Tensor  # float [k, C]: sum of weight * colour
    weight: torch.Tensor  # float [k]: sum of weights
    facing: torch.Tensor  # float [k]: the best facing weight any view had so far

    @classmethod
    def empty(cls, texels: Texels, channels: int = 3) -> Bake:
        k = len(texels.index)
        zeros = torch.zeros(k, dtype=texels.positions.dtype)
        return cls(texels, torch.zeros(k, channels, dtype=zeros.dtype), zeros, zeros.clone())

    def add(
        self, image: torch.Tensor, camera: Camera, raster: Raster, mesh: Mesh, mask: torch.Tensor | None = None,
        exponent: float = 1.0,
    ) -> None:  # fmt: skip
        """Blend in a view's image [H, W, C] by facing weight (the cosine to the power `exponent`), times `mask`
        [H, W] (0..1: how much of each pixel is new; None: all of it). Each texel reads only pixels that show
        its own surface (surface_taps): no other object's paint and no background."""
        seen, pixels, taps, facing = surface_taps(mesh, camera, raster, self.texels)
        if mask is not None:
            facing = facing * read_taps(mask[..., None], pixels, taps)[:, 0]
        weight = facing if exponent == 1 else facing**exponent
        self.color.index_add_(0, seen, weight[:, None] * read_taps(image, pixels, taps))
        self.weight.index_add_(0, seen, weight)
        self.facing[seen] = torch.maximum(self.facing[seen], facing)

    @property
    def seen(self) -> torch.Tensor:
        return self.weight > 0

    @property
    def coverage(self) -> float:
        """Fraction of the object's texels some view saw."""
        return float(self.seen.float().mean()) if len(self.weight) else 0.0

    def texture(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base [T, T, C] with the blended colour on every texel a view saw, bool [T, T] of those texels)."""
        size = self.texels.size
        texture = base.clone().view(size * size, -1)
        seen = self.seen
        texture[self.texels.index[seen]] = self.color[seen] / self.weight[seen, None]
        known = torch.zeros(size * size, dtype=torch.bool)
        known[self.texels.index[seen]] = True
        return texture.view(base.shape), known.view(size, size)

    def painted(self) -> torch.Tensor:
        """[T, T, C + 2] for rendering what is painted so far: the blended colour premultiplied by the next
        channel, 1 where some view painted (0 elsewhere: sampling across an island's edge then mixes in no
        unpainted colour once divided by it), and the best facing weight so far."""
        size = self.texels.size
        out = torch.zeros(size * size, self.color.shape[1] + 2, dtype=self.color.dtype)
        seen = self.seen
        out[self.texels.index[seen], :-2] = self.color[seen] / self.weight[seen, None]
        out[self.texels.index[seen], -2] = 1.0
        out[self.texels.index, -1] = self.facing
        return out.view(size, size, -1)


def dilate(texture: torch.Tensor, known: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow the known texels outwards `steps` texels: each new texel takes the mean of its known 3 x 3
    neighbours. The margin around UV islands that keeps mip-mapping and filtering from showing seams."""
    channels = texture.shape[-1]
    have = known[None, None].to(texture.dtype)
    stack = torch.cat([texture.permute(2, 0, 1)[None] * have, have], 1)  # premultiplied colour, and coverage
    kernel = torch.ones(channels + 1, 1, 3, 3, dtype=texture.dtype)
    for _ in range(steps):
        total = F.conv2d(stack, kernel, padding=1, groups=channels + 1)  # one pass: sums and counts together
        new = (total[:, -1:] > 0) & (stack[:, -1:] == 0)
        if not new.any():
            break
        stack = torch.where(new, torch.cat([total[:, :-1] / total[:, -1:].clamp(min=1), torch.ones_like(new,
                            dtype=stack.dtype)], 1), stack)  # fmt: skip
    have = stack[0, -1] > 0
    color = torch.where(have[None], stack[0, :-1], texture.permute(2, 0, 1))
    return color.permute(1, 2, 0), have


def push_pull(texture: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Every unknown texel filled from the known ones by a pull-push pyramid: averages over ever larger
    blocks, so a hole takes the colours around it, smoothly, however large it is."""
    if known.all() or not known.any():
        return texture if known.any() else texture.clone()
    color = texture.permute(2, 0, 1)[None]
    have = known[None, None].to(color.dtype)
    levels = []
    while min(color.shape[-2:]) > 1 and not bool((have > 0).all()):
        levels.append((color, have))
        total = F.avg_pool2d(color * have, 2, ceil_mode=True)
        count = F.avg_pool2d(have, 2, ceil_mode=True)
        color = torch.where(count > 0, total / count.clamp(min=1e-12), torch.zeros_like(total))
        have = (count > 0).to(color.dtype)
    for finer, finer_have in reversed(levels):
        upsampled = F.interpolate(color, size=finer.shape[-2:], mode="nearest")
        color = torch.where(finer_have > 0, finer, upsampled)
    return color[0].permute(1, 2, 0)


def fill(texture: torch.Tensor, known: torch.Tensor, margin: int) -> torch.Tensor:
    """The finished texture: a dilated margin of `margin` texels around what the views painted, then every
    texel still unknown (surface no view saw, and the space between islands) filled by push_pull."""
    texture, known = dilate(texture, known, margin)
    return push_pull(texture, known)
