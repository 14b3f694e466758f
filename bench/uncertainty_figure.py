"""Figure: one calib-predict uncertainty map over its image (matplotlib PNG).

Run:  python bench/uncertainty_figure.py PRED_FOLDER IMAGES_FOLDER CASE OUT.png [--map entropy] [--slice K]

``PRED_FOLDER``: a ``calib-predict ... --uncertainty`` output (``CASE<file_ending>`` and
``uncertainty/CASE_<map><file_ending>``); ``IMAGES_FOLDER``: the input images (``CASE_0000<file_ending>``).
The slice (first array axis, SimpleITK order z, y, x) is ``--slice`` or the one with the most
predicted foreground. Three panels: the image; the image with the segmentation's outlines; the
image with the map (colour where the map is above 0.01, colour bar 0-1). Nothing else is
computed: the values shown are those of the files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_folder", type=Path)
    p.add_argument("images_folder", type=Path)
    p.add_argument("case")
    p.add_argument("out_png", type=Path)
    p.add_argument("--map", default="entropy", choices=("entropy", "mutual_information", "fold_disagreement"))
    p.add_argument("--slice", type=int, default=None)
    p.add_argument("--file-ending", default=".nii.gz")
    a = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    fe = a.file_ending
    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # noqa: E731
    image = read(a.images_folder / f"{a.case}_0000{fe}").astype(np.float32)
    seg = read(a.pred_folder / f"{a.case}{fe}")
    umap = read(a.pred_folder / "uncertainty" / f"{a.case}_{a.map}{fe}")
    if not (image.shape == seg.shape == umap.shape):
        raise SystemExit(f"shapes differ: image {image.shape}, segmentation {seg.shape}, map {umap.shape}")
    if image.ndim == 2:
        image, seg, umap = image[None], seg[None], umap[None]
    k = a.slice if a.slice is not None else int(np.argmax((seg > 0).reshape(len(seg), -1).sum(1)))
    img, s, u = image[k], seg[k], umap[k]
    lo, hi = np.percentile(img, [1, 99])

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax in axes:
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_axis_off()
    axes[0].set_title(f"{a.case}, slice {k}")
    for label, colour in zip(sorted(set(np.unique(s)) - {0}), ("tab:red", "tab:green", "tab:blue", "tab:orange")):
        axes[1].contour(s == label, levels=[0.5], colors=[colour], linewidths=1.0)
    axes[1].set_title("segmentation (calib-predict)")
    shown = np.ma.masked_where(u <= 0.01, u)
    im = axes[2].imshow(shown, cmap="inferno", vmin=0, vmax=1, alpha=0.85)
    axes[2].set_title(f"{a.map.replace('_', ' ')} (normalised)")
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    fig.tight_layout()
    a.out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out_png, dpi=110)
    print(f"written: {a.out_png} (slice {k}; map max {float(u.max()):.3f}, mean over the slice "
          f"{float(u.mean()):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
