"""Evaluation of reconstructions: image-quality metrics under the paper and fastMRI protocols.

See fastmri_spec.md §2.2, §2.3, §2.5 and decisions.md §7.
"""
