"""Data consistency settings on a trained model: PSNR/SSIM per mask family for each phase choice and
step count, against the plain decoding and the zero-filled input.

  python bench/consistency.py --model=runs/demo/student \
      --data_dir=runs/demo/tensorflow_datasets --split=test --iterations=1,10

`--model` is a stage-2/3 workdir or an export. Decoding is argmax; the metrics use the `paper`
protocol (per slice, each image over its own maximum).
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", required=True, help="stage-2/3 workdir or export folder")
  p.add_argument("--data_dir", required=True, help="TFDS data dir holding the dataset")
  p.add_argument("--dataset", default="fastmri_brain_multiscale/demo")
  p.add_argument("--split", default="test")
  p.add_argument("--iterations", default="1,10", help="DC step counts to compare")
  p.add_argument("--batch", type=int, default=8)
  args = p.parse_args()

  import jax
  import numpy as np

  sys.path.insert(0, ".")
  from nextaccel_jax import export, inference, losses, sharding
  from nextaccel_jax.data import masks, pipeline
  from nextaccel_jax.evaluation import metrics

  rec = export.load_reconstructor(args.model)
  mesh = sharding.make_mesh()
  source = pipeline.load_split(args.dataset, args.split, args.data_dir)
  loader = pipeline.EvalLoader(source, global_batch_size=args.batch, mesh=mesh, with_maps=True)
  variants = [("decoded", None)] + [
    (f"{phase} phase, {n} step(s)", inference.ConsistencyConfig(iterations=n, phase=phase))
    for phase in inference.DC_PHASES
    for n in (int(i) for i in args.iterations.split(","))
  ]
  scores: dict = {}
  for batch in loader:
    valid = sharding.to_host(batch["valid"])
    family = sharding.to_host(batch["family"])[valid]
    x32 = batch["levels"][:, 0]
    target = sharding.to_host(losses.magnitude(batch["levels"][:, -1]))[valid]
    x_hat = rec.reconstruct(x32, batch["family"])
    outputs = {"zero-filled": x32}
    for name, cfg in variants:
      mask = batch["mask_levels"] == 0
      outputs[name] = (
        x_hat if cfg is None else rec.data_consistent(x_hat, x32, mask, batch["maps"], cfg)
      )
    for name, x in outputs.items():
      pred = sharding.to_host(losses.magnitude(x))[valid]
      psnr = np.atleast_1d(metrics.psnr(target, pred, protocol="paper"))
      ssim = np.atleast_1d(metrics.ssim(target, pred, protocol="paper"))
      for f in np.unique(family):
        cell = scores.setdefault(name, {}).setdefault(masks.FAMILIES[int(f)], ([], []))
        cell[0].extend(psnr[family == f])
        cell[1].extend(ssim[family == f])

  fams = [f for f in masks.FAMILIES if f in next(iter(scores.values()))]
  print(f"{args.model} on {args.dataset}/{args.split} ({jax.device_count()} device(s)), argmax")
  print("| reconstruction | " + " | ".join(f"{f} PSNR / SSIM" for f in fams) + " |")
  print("|---" * (len(fams) + 1) + "|")
  for name, by_family in scores.items():
    cells = [f"{np.mean(by_family[f][0]):.2f} / {np.mean(by_family[f][1]):.3f}" for f in fams]
    print(f"| {name} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
