"""Accumulators that every stage's validation and the evaluation stage share.

Shape legend: S slices, H×W image grid, B batch, L sequence positions.

- `score_slices`: PSNR, SSIM, NMSE, LPIPS and DISTS of one group of slices under one protocol.
- `ImageScores`: per-slice image scores by row (what is compared: a model, `zero_filled`, ...)
  and mask family. Slices are scored in groups: given the split's `slices` table, a volume is
  scored once its last slice has arrived (the unit of the `fastmri` protocol), so only the open
  volumes stay in memory; without it, each `add` call's batch is one group. `scores()` is the
  input of the `report` functions, `means()` the flat metrics a validation line holds.
- `ScaleMeans`: token-level values (cross-entropy, accuracy, KL) averaged per predicted scale.

Within a group every metric is computed on the whole group at once, in the order the slices
were added, so a split scored batch by batch gives the same numbers however it is consumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nextaccel_jax.data import masks
from nextaccel_jax.evaluation import dists_metric, lpips_metric, metrics

VOLUME_PROTOCOLS = metrics.VOLUME_PROTOCOLS


def lpips_nets(nets) -> tuple[str, ...]:
  """Validated LPIPS net names: a name, a sequence, True (alex) or None / False / () for none."""
  if nets is True:
    return ("alex",)
  nets = () if not nets else ((nets,) if isinstance(nets, str) else tuple(nets))
  bad = [n for n in nets if n not in lpips_metric.NETS]
  if bad:
    raise ValueError(f"lpips nets must be among {lpips_metric.NETS}, got {bad}")
  return nets


def score_slices(gt_SHW, pred_SHW, protocol: str = "paper", lpips=(), dists: bool = False) -> dict:
  """`metrics.evaluate_slices` plus `lpips_<net>` for each of `lpips` (validated once) and
  `dists` when asked.

  Returns:
    float64 arrays `[S]` under `paper`; floats under `fastmri` (LPIPS and DISTS: the mean over
    slices, as fastMRI averages SSIM).

  Raises:
    FileNotFoundError: With `dists` when dists-pytorch is not installed.
  """
  nets = lpips_nets(lpips)
  gt, pred, _ = metrics.prepare(gt_SHW, pred_SHW, protocol, with_ssim=True)
  scores = metrics.prepared_scores(gt, pred, protocol)
  perceptual = {}
  for net in nets:
    batch = lpips_metric.DEFAULT_BATCH_SIZE
    perceptual[f"lpips_{net}"] = lpips_metric.lpips_prepared(gt, pred, protocol, net, batch)
  if dists:
    batch = dists_metric.DEFAULT_BATCH_SIZE
    perceptual["dists"] = dists_metric.dists_prepared(gt, pred, protocol, batch)
  for name, values in perceptual.items():
    scores[name] = float(values.mean()) if protocol in VOLUME_PROTOCOLS else values
  return scores


def _family_name(family) -> str:
  return family if isinstance(family, str) else masks.FAMILIES[int(family)]


class ImageScores:
  """Per-slice image scores of magnitude reconstructions by row and mask family.

  Attributes:
    protocols: Metric protocols each group is scored under.
    nets: LPIPS nets (`lpips_<net>` keys).
    dists: Whether DISTS is scored (`dists` key).
  """

  def __init__(
    self,
    protocols: Sequence[str] = ("paper",),
    lpips: Sequence[str] = ("alex",),
    slices: Mapping[int, dict] | None = None,
    *,
    dists: bool = False,
  ):
    """Args:
    protocols: Protocols of `metrics.PROTOCOLS`.
    lpips: LPIPS net names (empty for none).
    slices: `{record: {"file_name", "slice_index", ...}}` of the split: slices are then grouped
      by volume (ordered by `slice_index`) and `add` needs their records.
    dists: Also score DISTS; needs dists-pytorch (`dists_metric.available()`).

    Raises:
      FileNotFoundError: With `dists` when dists-pytorch is not installed, before any scoring.
    """
    self.protocols = tuple(protocols)
    bad = [p for p in self.protocols if p not in metrics.PROTOCOLS]
    if bad or not self.protocols:
      raise ValueError(f"protocols must be a non-empty subset of {metrics.PROTOCOLS}, got {bad}")
    self.nets = lpips_nets(lpips)
    self.dists = bool(dists)
    if self.dists and not dists_metric.available():
      raise FileNotFoundError(f"DISTS is {dists_metric.status()}")
    self.slices = slices
    self._volume_size: dict[str, int] = {}
    for info in (slices or {}).values():
      self._volume_size[info["file_name"]] = self._volume_size.get(info["file_name"], 0) + 1
    self._open: dict[tuple, list] = {}
    # row -> family -> column -> list of per-slice values, in the order they were scored.
    self._scores: dict[str, dict[str, dict[str, list]]] = {}
    # row -> column -> values of every family, in the same order (the overall means).
    self._all: dict[str, dict[str, list]] = {}

  def add(self, row: str, pred_SHW, target_SHW, families, records=None) -> None:
    """Adds slices of one row.

    Args:
      row: What the predictions are (e.g. a model name, "zero_filled").
      pred_SHW: Predicted magnitudes.
      target_SHW: Target magnitudes, same shape.
      families: Mask family (name or id) of each slice.
      records: Record index of each slice; required with `slices` (volume grouping).
    """
    pred, target = np.asarray(pred_SHW), np.asarray(target_SHW)
    families = [_family_name(f) for f in families]
    if self.slices is None:
      if len(families):
        self._score(row, families, None, pred, target)
      return
    if records is None:
      raise ValueError("ImageScores with a slices table needs the records of the slices")
    for i, record in enumerate(records):
      record = int(record)
      volume = self.slices[record]["file_name"]
      key = (row, families[i], volume)
      buf = self._open.setdefault(key, [])
      buf.append((record, pred[i], target[i]))
      if len(buf) == self._volume_size[volume]:
        del self._open[key]
        buf.sort(key=lambda item: self.slices[item[0]]["slice_index"])
        self._score(
          row,
          [families[i]] * len(buf),
          [r for r, _, _ in buf],
          np.stack([p for _, p, _ in buf]),
          np.stack([t for _, _, t in buf]),
        )

  def _score(self, row: str, families: list[str], records, pred_SHW, target_SHW) -> None:
    n = len(families)
    values = {}
    for protocol in self.protocols:
      try:
        scores = score_slices(target_SHW, pred_SHW, protocol, self.nets, self.dists)
      except ValueError as e:
        where = f"records {records}" if records is not None else f"a batch of {n} slices"
        if records is not None:
          where = f"{self.slices[records[0]]['file_name']} ({where})"
        e.add_note(f"while scoring {row} on {where}, {protocol} protocol")
        raise
      for name, v in scores.items():
        # A per-volume protocol gives one number per group; every slice of it carries it.
        values[f"{protocol}/{name}"] = np.broadcast_to(np.asarray(v, np.float64), (n,))
    if records is not None:
      values["record"] = np.asarray(records)
    fams = np.asarray(families)
    by_family = self._scores.setdefault(row, {})
    overall = self._all.setdefault(row, {})
    for col, v in values.items():
      overall.setdefault(col, []).extend(v.tolist())
      for family in dict.fromkeys(families):
        by_family.setdefault(family, {}).setdefault(col, []).extend(v[fams == family].tolist())

  def scores(self) -> dict:
    """`{row: {family: {"record": int [N], "<protocol>/<metric>": float [N]}}}`.

    Raises:
      RuntimeError: If a volume is still missing slices.
    """
    if self._open:
      row, family, volume = next(iter(self._open))
      raise RuntimeError(f"volume {volume} of {row}/{family} never received all its slices")
    return {
      row: {f: {k: np.asarray(v) for k, v in cols.items()} for f, cols in by_family.items()}
      for row, by_family in self._scores.items()
    }

  def means(
    self, names: Sequence[str] = ("psnr", "ssim"), protocol: str | None = None
  ) -> dict[str, float]:
    """Means over all slices and per family: `{row}/{name}` and `{row}/{family}/{name}`.

    Args:
      names: Metric names (`lpips_<net>` are added for every net, `dists` when scored).
      protocol: Which protocol's values (the first by default).
    """
    protocol = protocol or self.protocols[0]
    extra = (*(f"lpips_{net}" for net in self.nets), *(("dists",) if self.dists else ()))
    cols = [f"{protocol}/{n}" for n in (*names, *extra)]
    out = {}
    for row, overall in self._all.items():
      for col in cols:
        name = col.split("/", 1)[1]
        out[f"{row}/{name}"] = float(np.mean(overall[col]))
        for family, by_col in self._scores[row].items():
          out[f"{row}/{family}/{name}"] = float(np.mean(by_col[col]))
    return out


class ScaleMeans:
  """Token-level values averaged over each predicted scale's positions, then over slices.

  Attributes:
    layout: `(begin, end)` of each predicted scale in the sequence.
  """

  def __init__(self, layout: Sequence[tuple[int, int]]):
    self.layout = tuple(layout)
    self._values: dict[str, list[list]] = {}

  def add(self, name: str, values_BL, valid_B) -> None:
    """Adds the per-position `values_BL` of the valid rows of a batch."""
    values_BL, valid_B = np.asarray(values_BL), np.asarray(valid_B)
    per_scale = self._values.setdefault(name, [[] for _ in self.layout])
    for j, (b, e) in enumerate(self.layout):
      per_scale[j].extend(values_BL[valid_B, b:e].mean(axis=1))

  def result(self, name: str, weighted: bool = True) -> dict[str, float]:
    """`{name: overall, f"{name}/scale_{k}": ...}` with scales counted from 1.

    `weighted` averages the scales by their number of positions (the mean over all tokens);
    otherwise each scale counts once (the distillation loss's mean over scales).
    """
    per_k = np.array([np.mean(v) for v in self._values[name]])
    sizes = np.array([e - b for b, e in self.layout], np.float64)
    overall = (per_k * sizes).sum() / sizes.sum() if weighted else per_k.mean()
    out = {name: float(overall)}
    for k in range(len(self.layout)):
      out[f"{name}/scale_{k + 1}"] = float(per_k[k])
    return out
