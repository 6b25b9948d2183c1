"""Evaluation of reconstructions (fastmri_spec.md §2.2–2.5, decisions.md §7).

- `metrics`: PSNR, SSIM and NMSE under the paper and fastMRI protocols (numpy).
- `lpips_metric`: LPIPS on magnitude images under the same protocols (a JAX network).
- `dists_metric`: DISTS on magnitude images, prepared as for LPIPS (needs dists-pytorch's weights).
- `evaluators`: the accumulators every stage's validation and the evaluation stage share.
- `report`: tables, per-slice CSV, figure grids and the self-contained `report.html` from the
  accumulated scores.
- `curves`: training curves of a stage's `metrics.jsonl` for the report.
"""
