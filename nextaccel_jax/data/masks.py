"""Nested, exact-count undersampling masks for the R = 32 → 2 hierarchy (fastmri_spec.md §3.2–3.4).

Four families; the position in `FAMILIES` is the family id used by seeds and model labels:

- `cartesian_y` (alias `cartesian_pe`): full lines along axis −1 (fastMRI's phase-encode axis W):
  a DC-centred block of `max(1, round(W·0.32/R))` lines plus lines in base-2 van der Corput order
  (§3.3a).
- `cartesian_x` (alias `cartesian_ro`): the same construction along axis −2, i.e. the transpose.
- `gaussian_2d`: Gumbel-top-k weighted sampling without replacement from a centred Gaussian
  density, with a small calibration disc that always comes first (§3.3b).
- `radial`: golden-angle spokes through DC, topped up with uniformly random points so that every
  level meets its budget exactly (§3.3c).

Every family is built coarse → fine from one ordering, so `M_32 ⊂ M_16 ⊂ … ⊂ M_2` holds by
construction (§3.4) and each mask holds exactly `H·W/R` points (Cartesian: `W/R` columns or `H/R`
rows). DC sits at `(H//2, W//2)`, the `fft2c` convention of `transforms.py`, and is sampled at every
level. Generation is plain numpy on the host (§3.2: never inside jit). `masks_from_level_map` also
accepts JAX arrays, so a loader can ship one uint8 level map per example and expand it on device.

Shape legend: H×W k-space grid, L mask levels (one per acceleration), N lines of a Cartesian family.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nextaccel_jax.data import transforms

FAMILIES = ("cartesian_y", "cartesian_x", "gaussian_2d", "radial")
ALIASES = {"cartesian_pe": "cartesian_y", "cartesian_ro": "cartesian_x"}

# Level-map value of points that no level samples; any value >= the number of levels works the same
# in `masks_from_level_map`, and 255 keeps the map in uint8.
NEVER = 255

_MIN_SIZE = 64
_DEFAULT_OPTIONS = {
  "center_fraction_times_r": 0.32,
  "sigma_frac": 0.125,
  "calib_radius": 4,
  "theta0": None,
}
# 180°/φ: with half-turn spokes, every prefix of the golden-angle sequence is nearly uniform
# in angle.
_GOLDEN_STEP = math.pi * 2.0 / (1.0 + math.sqrt(5.0))
# Keeps −log(E) finite when float32 exponential draws underflow to 0, so that only the calibration
# disc carries an infinite key.
_TINY32 = np.finfo(np.float32).tiny


def canonical_family(name: str) -> str:
  """Resolves a mask family name or alias to its canonical name.

  Args:
    name: one of `FAMILIES` or a key of `ALIASES`.

  Returns:
    The canonical family name.

  Raises:
    ValueError: when `name` is not a known family or alias.
  """
  if isinstance(name, str):
    name = ALIASES.get(name, name)
    if name in FAMILIES:
      return name
  valid = ", ".join(FAMILIES + tuple(ALIASES))
  raise ValueError(f"family must be one of {valid}; got {name!r}")


def family_id(name: str) -> int:
  """Returns the integer id (0..3, the position in `FAMILIES`) of a family name or alias."""
  return FAMILIES.index(canonical_family(name))


def _check_shape(shape) -> tuple[int, int]:
  try:
    height, width = (operator.index(s) for s in shape)
  except (TypeError, ValueError):
    raise ValueError(f"shape must be a pair of integers (H, W); got {shape!r}") from None
  if height < _MIN_SIZE or width < _MIN_SIZE or height % 2 or width % 2:
    raise ValueError(f"shape must have even sizes >= {_MIN_SIZE} on both axes; got {shape!r}")
  return height, width


def _check_accelerations(accelerations, family: str, shape: tuple[int, int]) -> tuple[int, ...]:
  """Validates the acceleration sequence and returns it as a tuple of ints."""
  try:
    accels = tuple(operator.index(r) for r in accelerations)
  except TypeError:
    raise ValueError(
      f"accelerations must be a sequence of integers > 1; got {accelerations!r}"
    ) from None
  if not accels:
    raise ValueError("accelerations must hold at least one integer > 1; got an empty sequence")
  if any(r <= 1 for r in accels):
    raise ValueError(f"accelerations must be integers > 1; got {accels}")
  if any(a <= b for a, b in zip(accels, accels[1:], strict=False)):
    raise ValueError(f"accelerations must be strictly decreasing (coarse first); got {accels}")
  if len(accels) >= NEVER:
    raise ValueError(f"accelerations may hold at most {NEVER - 1} levels; got {len(accels)}")
  height, width = shape
  if family == "cartesian_y":
    total, what = width, "W"
  elif family == "cartesian_x":
    total, what = height, "H"
  else:
    total, what = height * width, "H*W"
  bad = [r for r in accels if total % r]
  if bad:
    raise ValueError(
      f"accelerations {bad} do not divide {what}={total} for family {family!r}; every count "
      f"{what}/R must be an integer"
    )
  return accels


def _make_rng(seed) -> np.random.Generator:
  try:
    return np.random.default_rng(seed)
  except (TypeError, ValueError):
    raise ValueError(
      "seed must be None, a non-negative int, a np.random.SeedSequence or a np.random.Generator; "
      f"got {seed!r}"
    ) from None


def _real_option(options: Mapping, name: str, low: float, high: float = math.inf) -> float:
  value = options[name]
  ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
  if not ok or not low <= float(value) <= high or not math.isfinite(float(value)):
    if math.isinf(low):
      valid = "a finite real number"
    elif math.isinf(high):
      valid = f"a finite real number >= {low}"
    else:
      valid = f"a real number in [{low}, {high}]"
    raise ValueError(f"{name} must be {valid}; got {value!r}")
  return float(value)


def _check_options(options: Mapping) -> dict:
  """Fills defaults and validates every option, including those the family does not use.

  Options that a family ignores are still accepted, so one options dict can drive all four families.
  """
  unknown = sorted(set(options) - set(_DEFAULT_OPTIONS))
  if unknown:
    raise ValueError(
      f"unknown mask options {unknown}; valid options are {sorted(_DEFAULT_OPTIONS)}"
    )
  opts = {**_DEFAULT_OPTIONS, **options}
  opts["center_fraction_times_r"] = _real_option(opts, "center_fraction_times_r", 0.0, 1.0)
  opts["sigma_frac"] = _real_option(opts, "sigma_frac", 0.0)
  if opts["sigma_frac"] == 0.0:
    raise ValueError("sigma_frac must be a finite real number > 0; got 0")
  opts["calib_radius"] = _real_option(opts, "calib_radius", 0.0)
  if opts["theta0"] is not None:
    opts["theta0"] = _real_option(opts, "theta0", -math.inf)  # radians; None draws it per call
  return opts


# --------------------------------------------------------------------------------------------------
# Cartesian (§3.3a)


@functools.lru_cache(maxsize=16)
def _vdc_order(n: int) -> np.ndarray:
  """Line indices 0..n−1 in base-2 van der Corput order, duplicates dropped (read-only, cached).

  `floor(n·vdc(i))` over a full power-of-two period `K >= n` hits every line, because consecutive
  radical inverses are `1/K <= 1/n` apart.
  """
  bits = max(1, (n - 1).bit_length())
  i = np.arange(1 << bits, dtype=np.int64)
  rev = np.zeros_like(i)
  for b in range(bits):
    rev |= ((i >> b) & 1) << (bits - 1 - b)
  lines = (n * rev) >> bits
  _, first = np.unique(lines, return_index=True)
  order = lines[np.sort(first)]
  order.flags.writeable = False
  return order


def _cartesian_line_levels(
  n: int, accels: tuple[int, ...], cf_times_r: float, offset: int, mirror: bool
) -> np.ndarray:
  """Level (uint8 [N]) of each of `n` lines: centre blocks, then a shifted van der Corput order."""
  base = _vdc_order(n)
  # Mirroring runs the lattice in the opposite direction; the centre block keeps fastMRI's
  # placement.
  order = (offset - base if mirror else offset + base) % n
  level_N = np.full(n, NEVER, np.uint8)
  taken_N = np.zeros(n, bool)
  start = 0
  for k, r in enumerate(accels):
    budget = n // r
    width = max(1, round(n * (cf_times_r / r)))
    pad = (n - width + 1) // 2
    centre = np.arange(pad, pad + width)
    centre = centre[~taken_N[centre]]
    level_N[centre] = k
    taken_N[centre] = True
    # need >= 0 because center_fraction_times_r <= 1: a centre block never exceeds its budget and
    # grows between levels by at most as many lines as the budget does.
    need = budget - int(np.count_nonzero(taken_N))
    if need:
      # Every line before `start` in the order is sampled already, so the scan resumes there.
      free = np.flatnonzero(~taken_N[order[start:]])[:need]
      lines = order[start:][free]
      level_N[lines] = k
      taken_N[lines] = True
      start += int(free[-1]) + 1
  return level_N


# --------------------------------------------------------------------------------------------------
# 2-D Gaussian variable density (§3.3b)


@functools.lru_cache(maxsize=16)
def _gaussian_log_weight(
  height: int, width: int, sigma_frac: float, calib_radius: float
) -> tuple[np.ndarray, int]:
  """Flat float32 log-density `−dy²/2σ_y² − dx²/2σ_x²` (+inf on the calibration disc) and disc size.

  σ scales with each axis (σ_y = σ_frac·H, σ_x = σ_frac·W), which reduces to the spec's isotropic
  σ = σ_frac·N on square grids.
  """
  dy_H = np.arange(height, dtype=np.float64) - height // 2
  dx_W = np.arange(width, dtype=np.float64) - width // 2
  logw_HW = (
    -((dy_H[:, None] / (sigma_frac * height)) ** 2 + (dx_W[None, :] / (sigma_frac * width)) ** 2)
    / 2.0
  )
  disc_HW = dy_H[:, None] ** 2 + dx_W[None, :] ** 2 <= calib_radius**2
  logw_HW[disc_HW] = np.inf
  logw = logw_HW.astype(np.float32).ravel()
  logw.flags.writeable = False
  return logw, int(np.count_nonzero(disc_HW))


def _gaussian_levels(
  shape: tuple[int, int], counts: Sequence[int], rng: np.random.Generator, opts: dict
) -> np.ndarray:
  height, width = shape
  logw, disc = _gaussian_log_weight(height, width, opts["sigma_frac"], opts["calib_radius"])
  if disc > counts[0]:
    raise ValueError(
      f"calib_radius={opts['calib_radius']} gives a {disc}-point calibration disc, more than the "
      f"{counts[0]}-point budget of the coarsest level; choose a smaller calib_radius"
    )
  # −log of a standard exponential is a standard Gumbel draw, with one log instead of two.
  log_exp = rng.standard_exponential(height * width, dtype=np.float32)
  np.maximum(log_exp, _TINY32, out=log_exp)
  np.log(log_exp, out=log_exp)
  keys = np.subtract(logw, log_exp, out=log_exp)
  # M_R is the top n_R keys in the order (key descending, flat index ascending). Prefixes of one
  # total order nest. Every threshold lies among the finest level's keys, so after one partition
  # of the grid a second, multi-kth partition of that top slice yields all thresholds.
  size = height * width
  top = np.partition(keys, size - counts[-1])[size - counts[-1] :]
  kths = [top.size - n for n in counts]
  thresholds = np.partition(top, kths[::-1])[kths]
  hits = np.zeros(size, np.uint8)  # number of levels that sample each point
  for n, thresh in zip(counts, thresholds, strict=True):
    top = keys >= thresh
    if np.count_nonzero(top) != n:
      # Ties at the threshold (rare with continuous keys): keep the smallest flat indices.
      top = keys > thresh
      ties = np.flatnonzero(keys == thresh)
      top[ties[: n - np.count_nonzero(top)]] = True
    hits += top
  level = np.where(hits == 0, np.uint8(NEVER), np.uint8(len(counts)) - hits)
  return level.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Radial spokes with random top-up (§3.3c)


def _first_spoke(shape: tuple[int, int], theta0: float, start: int, stop: int) -> np.ndarray:
  """Index of the first golden-angle spoke in [start, stop) through each pixel (int32 [H·W]).

  Pixels that none of these spokes reaches get `stop`. Samples run over `t ∈ {−T, −T+½, …, T}` with
  `T = ⌈hypot(H, W)/2⌉` (`⌈N/√2⌉` on square grids) and round with `rint` (ties to even).
  """
  height, width = shape
  reach = math.ceil(math.hypot(height, width) / 2)
  t_K = np.arange(-2 * reach, 2 * reach + 1) * 0.5
  angles_S = theta0 + np.arange(start, stop) * _GOLDEN_STEP
  # Rasterising into a grid padded by the spoke reach needs no bounds test; the crop below drops
  # every sample that falls outside the H×W grid.
  pad_y, pad_x = reach - height // 2 + 1, reach - width // 2 + 1
  padded_w = width + 2 * pad_x
  flat_SK = np.multiply.outer(np.sin(angles_S), t_K)
  flat_SK += height / 2 + pad_y
  np.rint(flat_SK, out=flat_SK)
  flat_SK *= padded_w
  x_SK = np.multiply.outer(np.cos(angles_S), t_K)
  x_SK += width / 2 + pad_x
  np.rint(x_SK, out=x_SK)
  flat_SK += x_SK
  flat_SK = flat_SK.astype(np.intp)
  first = np.full((height + 2 * pad_y) * padded_w, stop, np.int32)
  # Later spokes are written first so that the earliest spoke through a pixel wins.
  for j in range(stop - start - 1, -1, -1):
    first[flat_SK[j]] = start + j
  first = first.reshape(height + 2 * pad_y, padded_w)
  return first[pad_y : pad_y + height, pad_x : pad_x + width].ravel()


def _initial_spoke_count(shape: tuple[int, int], finest_count: int) -> int:
  # A spoke adds about sqrt(H·W) new points on average (its chord minus the overlap near DC), so
  # this is a few spokes above what the finest level uses; `_radial_levels` adds more if needed.
  return finest_count // math.isqrt(shape[0] * shape[1]) + 4


def _union_sizes(first: np.ndarray, num_spokes: int) -> np.ndarray:
  """Size of the union of spokes [0, m) for m = 0..num_spokes (int64 [num_spokes + 1])."""
  union = np.zeros(num_spokes + 1, np.int64)
  np.cumsum(np.bincount(first, minlength=num_spokes + 1)[:num_spokes], out=union[1:])
  return union


def _radial_levels(
  shape: tuple[int, int],
  counts: Sequence[int],
  rng: np.random.Generator,
  theta0: float | None,
) -> tuple[np.ndarray, dict[str, list[int]]]:
  """Radial level map and per-level statistics.

  Returns:
    The uint8 [H, W] level map and a dict of per-level lists: `spokes` (spokes in M_R, cumulative),
    `new_topups` (random points added at that level) and `random_points` (points of M_R on no
    spoke of M_R, the spec's "random top-up points").
  """
  height, width = shape
  num_points = height * width
  if theta0 is None:
    theta0 = float(rng.uniform(0.0, math.pi))
  dc = (height // 2) * width + width // 2

  num_spokes = _initial_spoke_count(shape, counts[-1])
  first = _first_spoke(shape, theta0, 0, num_spokes)
  union = _union_sizes(first, num_spokes)
  topped = np.zeros(num_points, bool)
  topups: list[np.ndarray] = []
  spoke_ends: list[int] = []
  spokes = 0  # spokes [0, spokes) are in the mask
  for n in counts:
    # |M ∪ spokes[0, m)| = |union of spokes < m| + |top-ups that no spoke < m covers|; it is
    # non-decreasing in m, so the greedy "add spokes while they fit" is one searchsorted.
    while True:
      topup_first = np.sort(first[np.concatenate(topups)]) if topups else np.zeros(0, np.int32)
      m = np.arange(spokes, num_spokes + 1)
      size = union[m] + topup_first.size - np.searchsorted(topup_first, m)
      fit = int(np.searchsorted(size, n, side="right"))
      if spokes + fit <= num_spokes:
        break
      # Every rasterised spoke fits, so more must be rasterised before deciding.
      more = num_spokes + max(16, num_spokes // 8)
      first = np.where(first < num_spokes, first, _first_spoke(shape, theta0, num_spokes, more))
      num_spokes = more
      union = _union_sizes(first, num_spokes)
    spokes += fit - 1
    spoke_ends.append(spokes)
    need = n - int(size[fit - 1])
    new: list[np.ndarray] = []
    if need and first[dc] >= spokes and not topped[dc]:
      # Only when not even one spoke fits the coarsest budget: DC must still be sampled.
      new.append(np.array([dc]))
      topped[dc] = True
      need -= 1
    # By symmetry the first `need` free points of a random ordering of distinct grid points are a
    # uniformly random subset of the free points, the same distribution as walking one fixed
    # permutation of the grid (spec §3.3c). Drawing a short ordering per round costs the points
    # drawn instead of a permutation of all H·W points.
    while need:
      free_share = (num_points - n + need) / num_points
      draw = min(num_points, int(1.25 * need / free_share) + 32)
      cand = rng.choice(num_points, draw, replace=False)
      free = cand[(first[cand] >= spokes) & ~topped[cand]][:need]
      new.append(free)
      topped[free] = True
      need -= free.size
    topups.append(np.concatenate(new) if new else np.zeros(0, np.intp))

  spoke_level = np.full(num_spokes + 1, NEVER, np.uint8)
  start = 0
  for k, end in enumerate(spoke_ends):
    spoke_level[start:end] = k
    start = end
  level = spoke_level[first]
  for k, points in enumerate(topups):
    level[points] = k
  stats = {
    "spokes": spoke_ends,
    "new_topups": [p.size for p in topups],
    "random_points": [n - int(union[end]) for n, end in zip(counts, spoke_ends, strict=True)],
  }
  return level.reshape(shape), stats


# --------------------------------------------------------------------------------------------------
# Public API


def _nested_level_map(
  family: str,
  shape: tuple[int, int],
  rng: np.random.Generator,
  accels: tuple[int, ...],
  train: bool,
  opts: dict,
) -> np.ndarray:
  """uint8 [H, W] level map of one nested family; arguments already validated."""
  height, width = shape
  if family in ("cartesian_y", "cartesian_x"):
    n = width if family == "cartesian_y" else height
    offset, mirror = 0, False
    if train:
      offset = int(rng.integers(n))
      mirror = bool(rng.integers(2))
    level_N = _cartesian_line_levels(n, accels, opts["center_fraction_times_r"], offset, mirror)
    if family == "cartesian_y":
      return np.broadcast_to(level_N[None, :], shape)
    return np.broadcast_to(level_N[:, None], shape)
  counts = [height * width // r for r in accels]
  if family == "gaussian_2d":
    return _gaussian_levels(shape, counts, rng, opts)
  return _radial_levels(shape, counts, rng, opts["theta0"])[0]


def nested_masks(
  family: str,
  shape: tuple[int, int] = (256, 256),
  seed=None,
  accelerations: Sequence[int] = transforms.ACCELERATIONS,
  *,
  train: bool = False,
  **options,
) -> dict[int, np.ndarray]:
  """Draws one nested family of exact-count masks in centred k-space (fastmri_spec.md §3.3).

  Args:
    family: one of `FAMILIES` or an alias in `ALIASES`.
    shape: `(H, W)`, both even and >= 64; DC is at `(H//2, W//2)`.
    seed: None (fresh entropy), a non-negative int, a `np.random.SeedSequence` (see `eval_seed`)
      or a `np.random.Generator`, whose state advances.
    accelerations: strictly decreasing integers > 1, coarse first. Each count must be an integer:
      `W/R` lines for cartesian_y, `H/R` for cartesian_x, `H·W/R` points otherwise.
    train: training variant. Cartesian families draw a lattice offset `o ∈ [0, N)` and a mirror
      (the van der Corput order runs backwards) from the rng; with `train=False` they use `o = 0`, a
      DC-aligned lattice, and do not depend on `seed`. Gaussian and radial masks are random in both
      modes.
    **options: family hyper-parameters. Every option is validated and options that the family
      does not use are ignored, so one dict can serve all families.
      center_fraction_times_r (float in [0, 1], default 0.32): Cartesian centre block of
        `max(1, round(N·value/R))` lines, fastMRI's rule with `cf·R = value`.
      sigma_frac (float > 0, default 0.125): gaussian_2d density width `σ = sigma_frac·N` per axis.
      calib_radius (float >= 0, default 4): gaussian_2d disc `|k| <= calib_radius` (pixels) that is
        always sampled first; 4 gives 49 points, 0 gives DC alone.
      theta0 (float or None, default None): radial angle of the first spoke in radians; None draws
        it uniformly from `[0, π)`.

  Returns:
    `{R: bool [H, W]}` for every R in `accelerations`; the masks nest (coarse ⊂ fine) and hold
    exactly `H·W/R` sampled points each.

  Raises:
    ValueError: for an unknown family or option, a bad shape, acceleration sequence, seed or option
      value, or options that do not fit the budget (centre block, calibration disc).
  """
  family = canonical_family(family)
  shape = _check_shape(shape)
  accels = _check_accelerations(accelerations, family, shape)
  opts = _check_options(options)
  rng = _make_rng(seed)
  level_HW = _nested_level_map(family, shape, rng, accels, bool(train), opts)
  return {r: level_HW <= k for k, r in enumerate(accels)}


def eval_seed(file_name: str | os.PathLike, family: str) -> np.random.SeedSequence:
  """Seed of the evaluation masks of one (volume, family) pair (fastmri_spec.md §3.2).

  `SeedSequence([crc32(name), family_id])`: crc32 is stable across processes, unlike the salted
  `hash()`. Only the base name counts, so the seed does not depend on where the data is stored.

  Args:
    file_name: the volume's file name, e.g. `file_brain_AXT2_200_2000019.h5`, or a path to it.
    family: one of `FAMILIES` or an alias.

  Returns:
    A fresh `np.random.SeedSequence` to pass as `seed` to `nested_masks`.
  """
  if not isinstance(file_name, (str, os.PathLike)):
    raise ValueError(f"file_name must be a str or path; got {file_name!r}")
  name = os.path.basename(os.fspath(file_name))
  if not name:
    raise ValueError(f"file_name must name a file; got {file_name!r}")
  return np.random.SeedSequence([zlib.crc32(name.encode("utf-8")), family_id(family)])


def level_map(
  masks: Mapping[int, np.ndarray], accelerations: Sequence[int] = transforms.ACCELERATIONS
) -> np.ndarray:
  """Packs nested masks into one uint8 [H, W] map: the index of the coarsest level sampling a point.

  Args:
    masks: `{R: bool [H, W]}` as returned by `nested_masks`.
    accelerations: the keys to pack, coarse first; level k is `accelerations[k]`.

  Returns:
    uint8 [H, W]: k for points first sampled at `accelerations[k]`; `NEVER` (255) where no level
    samples.

  Raises:
    ValueError: when a level is missing, shapes differ or are not 2-D, or the masks do not nest.
  """
  accels = tuple(accelerations)
  if not 0 < len(accels) < NEVER:
    raise ValueError(f"accelerations must hold 1 to {NEVER - 1} levels; got {accels}")
  missing = [r for r in accels if r not in masks]
  if missing:
    raise ValueError(f"masks lacks the levels R={missing}; it has {sorted(masks)}")
  stack_LHW = [np.asarray(masks[r]).astype(bool, copy=False) for r in accels]
  shapes = {m.shape for m in stack_LHW}
  if len(shapes) != 1 or stack_LHW[0].ndim != 2:
    raise ValueError(f"masks must all be 2-D with one shape; got shapes {sorted(shapes)}")
  for k in range(1, len(accels)):
    if np.any(stack_LHW[k - 1] & ~stack_LHW[k]):
      raise ValueError(
        f"masks must nest (R={accels[k - 1]} ⊂ R={accels[k]}); points of R={accels[k - 1]} are "
        f"missing from R={accels[k]}"
      )
  level_HW = np.full(stack_LHW[0].shape, NEVER, np.uint8)
  # Coarse levels are written last so that each point keeps the coarsest level that samples it.
  for k in range(len(accels) - 1, -1, -1):
    level_HW[stack_LHW[k]] = k
  return level_HW


def masks_from_level_map(level_HW, num_levels: int = len(transforms.ACCELERATIONS)):
  """Expands a level map into nested boolean masks: `out[..., k, :, :] = level <= k`.

  Works on numpy arrays and on JAX arrays (also inside jit), returning the same kind.

  Args:
    level_HW: integer level map `[..., H, W]` as produced by `level_map`.
    num_levels: number of levels L to expand, 1..255.

  Returns:
    bool `[..., L, H, W]`.
  """
  if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)):
    raise ValueError(f"num_levels must be an integer in [1, {NEVER}]; got {num_levels!r}")
  if not 1 <= num_levels <= NEVER:
    raise ValueError(f"num_levels must be an integer in [1, {NEVER}]; got {num_levels!r}")
  xp = jnp if isinstance(level_HW, jax.Array) else np
  level_HW = xp.asarray(level_HW)
  if level_HW.ndim < 2:
    raise ValueError(f"level_HW must have at least 2 dims [..., H, W]; got shape {level_HW.shape}")
  ks_L11 = xp.arange(int(num_levels), dtype=xp.int32)[:, None, None]
  return level_HW[..., None, :, :] <= ks_L11
