"""``fastcam explain``: class-map overlays of a ``fastcam train`` checkpoint on given images (SPEC §6).

The checkpoint is read with ``torch.load(..., weights_only=True)``; the model is rebuilt from
its saved configuration. Each image is read and resized as in training; one PNG per image
shows it with, per class predicted above ``--threshold``, its map (``fastcam.cam_head`` of the
body's features and the head, max-normalized) over it, titled with the class and its
probability.
"""

from __future__ import annotations

import argparse
import os

import torch

from fastcam.cli.demo import BACKENDS, _float_in, _resolve_device, draw_map, predict_batches
from fastcam.cli.train import build_model, guarded, load_checkpoint, load_image, standardize

COLUMNS = 5  # panels a row of the figure

HELP = "write class-map overlays of a fastcam train checkpoint for the given images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    add = parser.add_argument
    add("--checkpoint", metavar="CKPT", required=True, help="a checkpoint written by fastcam train")
    add("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    add("--out", metavar="DIR", default="fastcam-explain", help="output folder" + d)
    add("--threshold", type=_float_in(0.0, 1.0), default=0.5,
        help="show the map of every class whose probability is above this" + d)
    add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N" + d)
    add("--backend", choices=BACKENDS, default="auto", help="fastcam backend for the maps" + d)


def save_explanation(path: str, image, name: str, classes: list[str], probs: torch.Tensor,
                     cams: torch.Tensor, threshold: float) -> list[int]:
    """One row: the image, then the map of each class above ``threshold`` over it. Returns those classes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from fastcam import metrics

    shown = [c for c in probs.argsort(descending=True).tolist() if probs[c] > threshold]
    panels = 1 + len(shown)
    ncols = min(COLUMNS, panels)
    nrows = -(-panels // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.9 * nrows), squeeze=False)
    axes = grid.reshape(1, -1)
    size = image.shape[-1]
    maps = metrics.upsample_maps(cams[None], (size, size))[0]
    axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
    top = int(probs.argmax())
    axes[0, 0].set_title(f"{os.path.basename(name)}\n" + (f"{len(shown)} above {threshold:g}" if shown else
                         f"none above {threshold:g} (top: {classes[top]} {probs[top]:.2f})"), fontsize=8)
    for k, c in enumerate(shown):
        draw_map(axes[0, 1 + k], image, maps[c])
        axes[0, 1 + k].set_title(f"{classes[c]}\np = {probs[c]:.2f}", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return shown


def run(args) -> int:
    return guarded("explain", _run, args)


def _run(args) -> int:
    device = _resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    config, classes = ckpt["config"], list(ckpt["classes"])
    model = build_model(config["arch"], len(classes))
    model.load_state_dict(ckpt["model"])
    model.to(device)
    size = int(config["image_size"])
    os.makedirs(args.out, exist_ok=True)
    used = set()
    for path in args.images:
        image, _ = load_image(path, size)
        logits, cams = predict_batches(model, [standardize(image[None])], device, args.backend)
        probs = torch.sigmoid(logits[0])
        stem = os.path.splitext(os.path.basename(path))[0]
        out, k = os.path.join(args.out, f"{stem}-cam.png"), 1
        while out in used:  # two images of the same name from different folders
            k += 1
            out = os.path.join(args.out, f"{stem}-{k}-cam.png")
        used.add(out)
        shown = save_explanation(out, image[0].numpy(), path, classes, probs, cams[0], args.threshold)
        listed = ", ".join(f"{classes[c]} {probs[c]:.2f}" for c in shown) or f"no class above {args.threshold:g}"
        print(f"{path}: {listed} -> wrote {out}")
    print(f"fastcam explain: wrote {len(args.images)} overlay(s) into {os.path.abspath(args.out)}")
    return 0
