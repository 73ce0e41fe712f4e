"""``fastcam demo``: the main job (SPEC §6). Trains a small CNN on the embedded synthetic chest
"radiographs" twice, from the same initialization, with the same data in the same order:

* **baseline** -- masked BCE on the labeled images only (the unlabeled images of a batch add nothing);
* **attention loss** -- :class:`fastcam.AttentionMapLoss`: the same masked BCE plus
  ``lambda_distinct`` times the overlap of the maps of co-present classes (SPEC §2.3), over the
  labeled *and* the unlabeled images (the latter weighed by the model's own predictions).

Then it evaluates both on a fully labeled test set with boxes -- macro ROC AUC, pointing game,
energy pointing game, IoU/IoBB hit rates at the ChestX-ray8 thresholds and the mean overlap of
the maps of co-present classes -- prints one table, and writes ``overlays.png``, ``curves.png``
and ``metrics.json`` into the output folder. The numbers are whatever this run measures.

matplotlib, tqdm and scikit-learn are imported when the command runs, so that ``import fastcam``
stays light.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastcam
from fastcam import metrics
from fastcam.data import SYNTHETIC_CLASSES, make_synthetic

HELP = ("train a small CNN on synthetic chest radiographs with and without the attention loss, "
        "and compare AUC, localization and map overlap")

RUNS = ("baseline", "attention")
RUN_TITLES = {"baseline": "baseline (BCE)", "attention": "attention loss"}
TABLE_THRESHOLDS = (0.1, 0.25, 0.5)  # the table shows these; metrics.json has all of CHESTXRAY8_THRESHOLDS
NORMALIZE = ("none", "max", "sum", "l2", "softmax")
MEASURES = ("cosine", "dot", "soft_iou", "dice", "intersection")
BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")


# ------------------------------------------------------------------------ options


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def _float_in(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if open_low else value >= low)
        if high is not None:
            ok = ok and (value < high if open_high else value <= high)
        if not ok:
            lo, hi = "(" if open_low else "[", ")" if open_high else "]"
            top = "inf" if high is None else high
            raise argparse.ArgumentTypeError(f"must be a number in {lo}{low}, {top}{hi}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    add = parser.add_argument
    add("--out", metavar="DIR", default=None,
        help="output folder (created if missing); default: a new fastcam-demo-YYYYmmdd-HHMMSS in the current folder")
    add("--epochs", type=_int_at_least(1), default=16, help="training epochs of each run" + d)
    add("--train-size", type=_int_at_least(8), default=2000, help="training images" + d)
    add("--test-size", type=_int_at_least(8), default=600, help="test images (all labeled, with boxes)" + d)
    add("--image-size", type=_int_at_least(32), default=96, help="image side in pixels" + d)
    add("--unlabeled-fraction", type=_float_in(0.0, 1.0, open_high=True), default=0.5,
        help="share of the training images whose labels are hidden (mask all False)" + d)
    add("--batch-size", type=_int_at_least(2), default=64, help="training batch size" + d)
    add("--lr", type=_float_in(0.0, open_low=True), default=3e-3, help="peak AdamW learning rate (one-cycle)" + d)
    add("--width", type=_int_at_least(4), default=16, help="channels of the first conv block (the last has 4x)" + d)
    add("--lambda-distinct", type=_float_in(0.0), default=0.1,
        help="weight of the class-distinctiveness term in the attention run" + d)
    add("--lambda-consist", type=_float_in(0.0), default=0.0,
        help="weight of the spatial-consistency term (a class's maps across the batch)" + d)
    add("--lambda-coherence", type=_float_in(0.0), default=0.0,
        help="weight of the spatial-coherence term (compactness of each map)" + d)
    add("--normalize", choices=NORMALIZE, default="l2", help="map normalization in the loss" + d)
    add("--measure", choices=MEASURES, default="cosine", help="overlap measure in the loss" + d)
    add("--seed", type=int, default=0, help="seed of the data, the initialization and the data order" + d)
    add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N" + d)
    add("--backend", choices=BACKENDS, default="auto", help="fastcam backend for the maps and the loss" + d)
    add("--threads", type=_int_at_least(1), default=None,
        help="CPU threads for torch (default: torch's choice; 1 can be faster on a busy machine)")
    add("--rows", type=_int_at_least(1), default=4, help="test images shown in overlays.png" + d)
    add("--no-progress", action="store_true", help="no progress bars")


def _fail(message: str, command: str = "demo") -> int:
    print(f"fastcam {command}: error: {message}", file=sys.stderr)
    return 2


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _default_out() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, k = f"fastcam-demo-{stamp}", 1
    while os.path.exists(out):
        k += 1
        out = f"fastcam-demo-{stamp}-{k}"
    return out


# ------------------------------------------------------------------------ model


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (BN + ReLU; the first three with stride 2) -> global average pooling -> linear.

    ``body(x)`` gives the features ``[B, 4 * width, S/8, S/8]`` (12 x 12 for 96 x 96 images) and
    ``head`` is the ``nn.Linear`` after the pooling, the pair fastcam works on.
    """

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(1, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE with logits averaged over the known entries (0, with a gradient path, when none is known)."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[mask], labels[mask])


# ------------------------------------------------------------------------ training and evaluation


def compute_loss(model: nn.Module, criterion, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 attention: bool, body=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, bce, distinct)`` of one batch: ``criterion`` (an AttentionMapLoss) on ``model.body``'s
    features and ``model.head`` when ``attention``, else the masked BCE (``distinct`` NaN). ``body``
    replaces ``model.body`` (a DDP wrapper that returns the features)."""
    features = (body or model.body)(images)
    if attention:
        out = criterion(features, model.head, labels, mask, return_output=True)
        distinct = out.distinct if out.distinct is not None else torch.zeros(())
        return out.loss, out.bce, distinct
    loss = masked_bce(model.head(features.mean((2, 3))), labels, mask)
    return loss, loss, torch.full((), math.nan)


def make_optimizer(model: nn.Module, lr: float, total_steps: int, optimizer_state: dict | None = None,
                   steps_done: int = 0):
    """AdamW and its one-cycle schedule (peak ``lr``, 15 % warm-up) over ``total_steps``; with
    ``optimizer_state`` (a resumed run) the schedule goes on after ``steps_done`` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, pct_start=0.15, total_steps=total_steps,
                                                    last_epoch=steps_done - 1 if optimizer_state else -1)
    return optimizer, scheduler


def make_criterion(args) -> fastcam.AttentionMapLoss:
    return fastcam.AttentionMapLoss(lambda_distinct=args.lambda_distinct, lambda_consist=args.lambda_consist,
                                    lambda_coherence=args.lambda_coherence, normalize=args.normalize,
                                    measure=args.measure, unlabeled="predicted", backend=args.backend)


@torch.no_grad()
def predict_batches(model: nn.Module, batches, device: torch.device, backend: str, *, bar=None,
                    autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and max-normalized maps ``[N, C, h, w]`` (fp32, on the CPU) of ``model``
    (with ``body`` and ``head``) in eval mode over an iterable of image batches; ``autocast``: bf16
    autocast on CUDA."""
    model.eval()
    logits, cams = [], []
    for x in batches:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            lg, cm = fastcam.cam_head(model.body(x), model.head.weight, model.head.bias, normalize="max",
                                      backend=backend)
        logits.append(lg.float().cpu())
        cams.append(cm.float().cpu())
        if bar is not None:
            bar.update(x.shape[0])
    model.train()
    return torch.cat(logits), torch.cat(cams)


def predict(model: SmallCNN, images: torch.Tensor, device: torch.device, backend: str, *,
            batch_size: int = 256, bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_batches` over ``images`` in batches of ``batch_size``."""
    batches = (images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))
    return predict_batches(model, batches, device, backend, bar=bar)


def _box_tensors(boxes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """All boxes of all images as ``boxes [M, 4]`` and ``box_index [M, 2]`` = (image, class)."""
    xywh, index = [], []
    for b, image_boxes in enumerate(boxes):
        for c, x, y, w, h in image_boxes:
            xywh.append((x, y, w, h))
            index.append((b, c))
    return (torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(index, dtype=torch.int64).reshape(-1, 2))


def evaluate(logits: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None,
             box_index: torch.Tensor | None, image_size: int, classes=SYNTHETIC_CLASSES,
             mask: torch.Tensor | None = None) -> dict:
    """Every figure of the table (and more) for one run's test-set logits and maps. ``mask``: the
    known labels (None: all); no boxes (None or none at all): no localization figures."""
    result = {"macro_auc": metrics.macro_auc(logits, labels, mask),
              "per_class_auc": dict(zip(classes, metrics.per_class_auc(logits, labels, mask).tolist()))}
    if boxes is not None and boxes.shape[0]:
        loc = metrics.localization(cams, boxes, box_index, (image_size, image_size))
        per_class_pointing = {}
        for c, name in enumerate(classes):
            hits = loc["pointing"][box_index[:, 1] == c]
            per_class_pointing[name] = hits.double().mean().item() if hits.numel() else math.nan
        result |= {
            "pointing_game": loc["pointing"].double().mean().item(),
            "per_class_pointing_game": per_class_pointing,
            "energy_pointing_game": loc["energy"].mean().item(),
            "mean_iou": loc["iou"].mean().item(),
            "mean_iobb": loc["iobb"].mean().item(),
            "iou_hit_rates": {str(t): v for t, v in metrics.hit_rates(loc["iou"]).items()},
            "iobb_hit_rates": {str(t): v for t, v in metrics.hit_rates(loc["iobb"]).items()},
        }
    result["copresent_overlap"] = metrics.copresent_overlap(cams, labels, mask)
    return result


def train(name: str, attention: bool, init: dict, data, test, args, device: torch.device, progress) -> dict:
    """One training run from the state ``init``; returns the model and the per-epoch history."""
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    model = SmallCNN(len(SYNTHETIC_CLASSES), args.width)
    model.load_state_dict(init)
    model.to(device)
    n = data.images.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    optimizer, scheduler = make_optimizer(model, args.lr, args.epochs * steps_per_epoch)
    criterion = make_criterion(args)
    order = torch.Generator().manual_seed(args.seed)  # the same batches in the same order for both runs
    images, labels, mask = data.images.to(device), data.labels.to(device), data.mask.to(device)
    history = {k: [] for k in ("epoch", "loss", "bce", "distinct", "test_macro_auc", "test_copresent_overlap")}
    start = time.perf_counter()
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"training {RUN_TITLES[name]}", unit="step",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    model.train()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=order).to(device)
        sums = {"loss": 0.0, "bce": 0.0, "distinct": 0.0}
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            loss, bce, distinct = compute_loss(model, criterion, images[idx], labels[idx], mask[idx], attention)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums["loss"] += loss.item()
            sums["bce"] += bce.item()
            sums["distinct"] += float(distinct.detach())
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch}/{args.epochs}", loss=f"{loss.item():.3f}", refresh=False)
        logits, cams = predict(model, test.images, device, args.backend)
        history["epoch"].append(epoch)
        for key, total in sums.items():
            history[key].append(total / steps_per_epoch)
        history["test_macro_auc"].append(metrics.macro_auc(logits, test.true_labels))
        history["test_copresent_overlap"].append(metrics.copresent_overlap(cams, test.true_labels))
        bar.set_postfix(epoch=f"{epoch}/{args.epochs}", loss=f"{history['loss'][-1]:.3f}",
                        test_auc=f"{history['test_macro_auc'][-1]:.3f}")
    bar.close()
    return {"model": model, "history": history, "train_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------ the table


def metric_rows(result: dict) -> list[tuple[str, float]]:
    """``(label, value)`` of the table's rows for one :func:`evaluate` result (localization rows
    only when it has them)."""
    rows = [("macro ROC AUC", result["macro_auc"])]
    if "pointing_game" in result:
        rows += [("pointing game (hit rate)", result["pointing_game"]),
                 ("energy pointing game", result["energy_pointing_game"])]
        for key, label in (("iou_hit_rates", "IoU"), ("iobb_hit_rates", "IoBB")):
            rows += [(f"{label} >= {t} (hit rate)", result[key][str(t)]) for t in TABLE_THRESHOLDS]
    rows.append(("co-present map overlap (cosine, lower = apart)", result["copresent_overlap"]))
    return rows


def table_rows(results: dict) -> list[tuple[str, float, float]]:
    base, att = metric_rows(results["baseline"]), metric_rows(results["attention"])
    return [(label, b, a) for (label, b), (_, a) in zip(base, att)]


def format_table(results: dict) -> str:
    rows = table_rows(results)
    width = max(len(r[0]) for r in rows)
    head = f"{'metric':<{width}}  {'baseline':>9}  {'attention':>9}  {'difference':>10}"
    lines = [head, "-" * len(head)]
    for label, b, a in rows:
        lines.append(f"{label:<{width}}  {b:>9.3f}  {a:>9.3f}  {a - b:>+10.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ figures


def _class_colors():
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i) for i in range(len(SYNTHETIC_CLASSES))]


def _pick_rows(test, count: int) -> list[int]:
    """Test images with 2 or 3 findings (every finding with a box), the first ``count`` of them."""
    picked = []
    for i, image_boxes in enumerate(test.boxes):
        present = sorted({c for c, *_ in image_boxes})
        if 2 <= len(present) <= 3 and len(present) == int(test.true_labels[i].sum()):
            picked.append(i)
        if len(picked) == count:
            break
    return picked


def draw_map(ax, image, cam: torch.Tensor) -> None:
    """``image`` (2-D, in [0, 1]) in gray with a max-normalized map of the same size over it (jet,
    more opaque where the map is high)."""
    import matplotlib

    m = cam.clamp(0, 1).numpy()
    rgba = matplotlib.colormaps["jet"](m)
    rgba[..., 3] = 0.15 + 0.6 * m
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(rgba)


def save_overlays(path: str, test, outputs: dict, rows: list[int]) -> None:
    """One row per image: the image with its true boxes, then per finding present the baseline map
    and the attention-loss map over the image, with that finding's boxes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    colors = _class_colors()
    size = test.images.shape[-1]
    present = [sorted({c for c, *_ in test.boxes[i]}) for i in rows]
    ncols = 1 + 2 * max((len(p) for p in present), default=1)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.0 * ncols, 2.25 * len(rows)), squeeze=False)
    maps = {run: metrics.upsample_maps(outputs[run]["cams"][rows], (size, size)) for run in RUNS}

    def boxes_on(ax, i, classes, color=None):
        for c, x, y, w, h in test.boxes[i]:
            if c in classes:  # pixel j spans [j - 0.5, j + 0.5] in imshow's coordinates
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, lw=1.3,
                                       edgecolor=color or colors[c]))

    for r, i in enumerate(rows):
        image = test.images[i, 0].numpy()
        ax = axes[r, 0]
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        boxes_on(ax, i, set(present[r]))
        ax.legend(handles=[Patch(fill=False, edgecolor=colors[c], lw=1.3, label=SYNTHETIC_CLASSES[c])
                           for c in present[r]], loc="best", fontsize=6, handlelength=1.2, framealpha=0.75,
                  borderpad=0.3, labelspacing=0.25)
        ax.set_title(f"test image {i}\ntrue boxes", fontsize=8)
        for k, c in enumerate(present[r]):
            for j, run in enumerate(RUNS):
                ax = axes[r, 1 + 2 * k + j]
                draw_map(ax, image, maps[run][r, c])
                boxes_on(ax, i, {c}, color="white")
                p = torch.sigmoid(outputs[run]["logits"][i, c]).item()
                ax.set_title(f"{SYNTHETIC_CLASSES[c]} map\n{RUN_TITLES[run]}, p={p:.2f}", fontsize=8,
                             color=colors[c] if j == 0 else "black")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle("class maps (fastcam.cam_head, max-normalized) of test images with several findings; white: the "
                 "true box of the map's class; p: the model's predicted probability of that class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves(path: str, outputs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    styles = {"baseline": dict(color="tab:blue"), "attention": dict(color="tab:orange")}
    for run in RUNS:
        h = outputs[run]["history"]
        ep = h["epoch"]
        axes[0].plot(ep, h["bce"], marker="o", ms=3, label=f"{RUN_TITLES[run]}: BCE", **styles[run])
        if run == "attention":
            axes[0].plot(ep, h["loss"], ls="--", marker="o", ms=3, label="attention loss: total", **styles[run])
            axes[0].plot(ep, h["distinct"], ls=":", marker="o", ms=3,
                         label="attention loss: distinct term (unweighted)", **styles[run])
        axes[1].plot(ep, h["test_macro_auc"], marker="o", ms=3, label=RUN_TITLES[run], **styles[run])
        axes[2].plot(ep, h["test_copresent_overlap"], marker="o", ms=3, label=RUN_TITLES[run], **styles[run])
    axes[0].set_title("training loss (mean over the epoch's batches)", fontsize=9)
    axes[1].set_title("test macro ROC AUC after each epoch", fontsize=9)
    axes[2].set_title("test: mean overlap of co-present class maps (cosine)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------ the command


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _versions() -> dict:
    import matplotlib
    import numpy
    import sklearn
    import tqdm

    return {"fastcam": fastcam.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "matplotlib": matplotlib.__version__,
            "tqdm": tqdm.__version__}


def run(args) -> int:
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # the command may run in-process (tests, notebooks): leave torch's thread count as it was
        torch.set_num_threads(threads)


def _run(args) -> int:
    started = time.perf_counter()
    try:
        device = _resolve_device(args.device)
    except ValueError as err:
        return _fail(str(err))
    from fastcam._backends import resolve_backend

    try:
        backend_used = resolve_backend(args.backend, device)
    except Exception as err:  # BackendUnavailableError or ValueError, each saying why
        return _fail(f"--backend {args.backend}: {err}")
    out = args.out or _default_out()
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        return _fail(f"--out {out}: cannot create the folder: {err}")
    progress = not args.no_progress
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"fastcam demo: writing into {os.path.abspath(out)}")
    print(f"device {device} ({device_name}, {torch.get_num_threads()} threads), fastcam backend {backend_used}"
          f" (asked: {args.backend})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    t = time.perf_counter()
    train_set = make_synthetic(args.train_size, args.image_size, seed=2 * args.seed,
                               unlabeled_fraction=args.unlabeled_fraction)
    test = make_synthetic(args.test_size, args.image_size, seed=2 * args.seed + 1, unlabeled_fraction=0.0)
    boxes, box_index = _box_tensors(test.boxes)
    n_unlabeled = int((~train_set.mask.any(1)).sum())
    findings = (test.true_labels > 0.5).sum(1)
    pairs = int((findings * (findings - 1) // 2).sum())
    data_seconds = time.perf_counter() - t
    print(f"data: {args.train_size} training images ({args.train_size - n_unlabeled} labeled, {n_unlabeled} unlabeled),"
          f" {args.test_size} test images with {boxes.shape[0]} boxes and {pairs} co-present class pairs,"
          f" {args.image_size}x{args.image_size}, classes {', '.join(SYNTHETIC_CLASSES)} ({data_seconds:.1f} s)")

    torch.manual_seed(args.seed)
    init = {k: v.clone() for k, v in SmallCNN(len(SYNTHETIC_CLASSES), args.width).state_dict().items()}
    outputs = {}
    for name in RUNS:
        outputs[name] = train(name, name == "attention", init, train_set, test, args, device, progress)

    from tqdm.auto import tqdm

    results = {}
    t = time.perf_counter()
    with tqdm(total=len(RUNS) * args.test_size, desc="evaluating on the test set", unit="image",
              disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for name in RUNS:
            logits, cams = predict(outputs[name]["model"], test.images, device, args.backend, bar=bar)
            outputs[name].update(logits=logits, cams=cams)
            results[name] = evaluate(logits, cams, test.true_labels, boxes, box_index, args.image_size)
    eval_seconds = time.perf_counter() - t

    print()
    print(f"{args.test_size} test images, {boxes.shape[0]} boxes, {pairs} co-present pairs; "
          f"{args.epochs} epochs on {args.train_size} images ({args.unlabeled_fraction:.0%} unlabeled); "
          f"attention loss: lambda_distinct={args.lambda_distinct:g}"
          + (f", lambda_consist={args.lambda_consist:g}" if args.lambda_consist else "")
          + (f", lambda_coherence={args.lambda_coherence:g}" if args.lambda_coherence else ""))
    print(format_table(results))
    print()

    t = time.perf_counter()
    rows = _pick_rows(test, args.rows)
    files = {"curves": os.path.join(out, "curves.png"), "metrics": os.path.join(out, "metrics.json")}
    if rows:
        files["overlays"] = os.path.join(out, "overlays.png")
        save_overlays(files["overlays"], test, outputs, rows)
    else:
        print("no test image has two or more findings: overlays.png is not written")
    save_curves(files["curves"], outputs)
    figure_seconds = time.perf_counter() - t

    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("command",)} | {"out": os.path.abspath(out)},
        "environment": _versions() | {"device": str(device), "device_name": device_name,
                                      "threads": torch.get_num_threads(), "backend_asked": args.backend,
                                      "backend_used": backend_used},
        "data": {"classes": list(SYNTHETIC_CLASSES), "train_images": args.train_size,
                 "train_labeled": args.train_size - n_unlabeled, "train_unlabeled": n_unlabeled,
                 "train_seed": 2 * args.seed, "test_images": args.test_size, "test_seed": 2 * args.seed + 1,
                 "test_boxes": int(boxes.shape[0]), "test_copresent_pairs": pairs,
                 "overlay_images": rows},
        "thresholds": list(metrics.CHESTXRAY8_THRESHOLDS),
        "runs": {name: results[name] | {"history": outputs[name]["history"],
                                        "train_seconds": outputs[name]["train_seconds"]} for name in RUNS},
        "difference": {label: a - b for label, b, a in table_rows(results)},
        "seconds": {"data": data_seconds, "evaluation": eval_seconds, "figures": figure_seconds,
                    "total": time.perf_counter() - started},
        "files": {k: os.path.basename(v) for k, v in files.items()},
    }
    with open(files["metrics"], "w") as fh:
        json.dump(_json_safe(report), fh, indent=2)
    print(f"wrote {', '.join(sorted(os.path.basename(f) for f in files.values()))} into {out} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0
