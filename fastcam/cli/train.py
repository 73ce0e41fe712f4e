"""``fastcam train``: the training of ``fastcam demo`` on real chest X-rays (SPEC §6).

A label CSV read by :func:`fastcam.data.read_labels` (NIH, CheXpert, PadChest or generic), an
image folder, a torchvision backbone (ResNet-18/50, DenseNet-121; random initialization or a
local ``state_dict`` file), :class:`fastcam.AttentionMapLoss` (``--lambda-distinct 0``: the
masked BCE alone), a checkpoint after every epoch, ``--resume``, and after every epoch the
demo's table on the validation images (macro ROC AUC, localization figures when ``--boxes``
holds boxes of validation images, co-present map overlap).

Images: PNG or JPEG of any bit depth and mode, read with Pillow into one channel in [0, 1]
(8-bit modes by /255 after conversion to gray, 16-bit ``I;16*``/``I`` by /65535, ``F`` clipped),
resized (bilinear, antialiased) to a square ``--image-size`` whatever their aspect ratio --
boxes are scaled by the same factors -- and standardized with the gray ImageNet mean and
std (0.449, 0.226). The backbone's first convolution takes that one channel: its RGB weights are
summed (for ``--weights`` files holding a 3-channel first convolution; the head is new).

Multi-GPU (``torchrun``): with ``WORLD_SIZE`` > 1 in the environment each process joins the
process group (NCCL on CUDA, Gloo on the CPU), trains on its share of the images
(``DistributedSampler``) through a ``DistributedDataParallel`` wrapper, and rank 0 alone
evaluates, prints and writes checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastcam.cli.demo import (
    BACKENDS,
    MEASURES,
    NORMALIZE,
    _fail,
    _float_in,
    _int_at_least,
    _json_safe,
    _resolve_device,
    compute_loss,
    evaluate,
    make_criterion,
    make_optimizer,
    metric_rows,
    predict_batches,
)

HELP = "train a torchvision classifier with the attention loss on a chest X-ray label file and an image folder"

ARCHS = ("resnet18", "resnet50", "densenet121")
FORMATS = ("nih", "chexpert", "padchest", "generic")
GRAY_MEAN, GRAY_STD = 0.449, 0.226  # the ImageNet RGB means and stds, averaged
CONFIG_KEYS = ("arch", "image_size", "format", "lambda_distinct", "lambda_consist", "lambda_coherence",
               "normalize", "measure", "lr", "batch_size", "epochs", "seed", "labels", "images")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    add = parser.add_argument
    add("--labels", metavar="CSV", required=True, help="label file (Data_Entry_2017.csv, train.csv, ...)")
    add("--format", choices=FORMATS, default=None, help="format of the label files (default: told from the header)")
    add("--uncertain", choices=("ignore", "ones", "zeros"), default="ignore",
        help="CheXpert -1 (uncertain): unknown, 1 or 0" + d)
    add("--images", metavar="DIR", required=True,
        help="image root: the files' paths are relative to it (a name not found there is looked up in its subfolders)")
    add("--boxes", metavar="CSV", default=None, help="BBox_List_2017.csv, for the localization figures")
    add("--val-labels", metavar="CSV", default=None, help="validation label file (default: a share of --labels)")
    add("--val-fraction", type=_float_in(0.0, 1.0, open_low=True, open_high=True), default=0.1,
        help="share of --labels held out for validation, chosen by --seed (without --val-labels)" + d)
    add("--arch", choices=ARCHS, default="resnet50", help="torchvision backbone" + d)
    add("--weights", metavar="FILE", default=None,
        help="a local state_dict file of the backbone (torchvision layout; never downloaded); default: random init")
    add("--image-size", type=_int_at_least(32), default=224, help="images are resized to this square" + d)
    add("--epochs", type=_int_at_least(1), default=10, help="training epochs (in all, when resuming)" + d)
    add("--batch-size", type=_int_at_least(2), default=32, help="batch size (per process)" + d)
    add("--lr", type=_float_in(0.0, open_low=True), default=1e-3, help="peak AdamW learning rate (one-cycle)" + d)
    add("--lambda-distinct", type=_float_in(0.0), default=0.1,
        help="weight of the class-distinctiveness term (0 with the others 0: the masked BCE alone)" + d)
    add("--lambda-consist", type=_float_in(0.0), default=0.0, help="weight of the spatial-consistency term" + d)
    add("--lambda-coherence", type=_float_in(0.0), default=0.0, help="weight of the spatial-coherence term" + d)
    add("--normalize", choices=NORMALIZE, default="l2", help="map normalization in the loss" + d)
    add("--measure", choices=MEASURES, default="cosine", help="overlap measure in the loss" + d)
    add("--out", metavar="DIR", default="fastcam-train", help="checkpoint folder" + d)
    add("--resume", metavar="CKPT", default=None, help="a checkpoint to go on from (its next epoch)")
    add("--workers", type=_int_at_least(0), default=None, help="DataLoader workers (default: 0 on CPU, 4 on GPU)")
    add("--seed", type=int, default=0, help="seed of the split, the initialization and the data order" + d)
    add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N" + d)
    add("--backend", choices=BACKENDS, default="auto", help="fastcam backend for the maps and the loss" + d)
    add("--no-progress", action="store_true", help="no progress bars")


class TrainError(ValueError):
    """A bad input (a file, an option) that the command reports as one line."""


# ------------------------------------------------------------------------ images


def load_image(path: str, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image file as a ``[1, size, size]`` float tensor in [0, 1] and its original ``(height, width)``."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16") or image.mode == "I":
                array = np.asarray(image, dtype=np.float32) / 65535.0
            elif image.mode == "F":
                array = np.asarray(image, dtype=np.float32)
            else:
                array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TrainError(f"{path}: cannot read the image: {err}") from None
    x = torch.from_numpy(np.ascontiguousarray(array)).clamp_(0, 1)
    if x.dim() != 2:
        raise TrainError(f"{path}: unexpected image shape {tuple(x.shape)} (mode {image.mode})")
    height, width = x.shape
    x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp_(0, 1), (height, width)


def resolve_paths(root: str, paths: list[str], csv_path: str) -> list[str]:
    """The file of every listed image: ``root/path``, else the file of that name anywhere under ``root``
    (the NIH set ships its images in ``images_001/images`` ... folders). A missing one is an error
    naming it and its CSV row."""
    index = None
    found = []
    for row, name in enumerate(paths, start=1):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            if index is None:
                index = {}
                for folder, _, files in os.walk(root):
                    for file in files:
                        index.setdefault(file, os.path.join(folder, file))
            path = index.get(os.path.basename(name))
            if path is None:
                raise TrainError(f"{csv_path}: data row {row}: image {name!r} not found: no "
                                 f"{os.path.join(root, name)} and no file of that name under {root}")
        found.append(path)
    return found


class LabeledImages(torch.utils.data.Dataset):
    """Images of a label table: ``(image [1, S, S], labels [C], mask [C], index, original (h, w))``."""

    def __init__(self, files: list[str], labels: torch.Tensor, mask: torch.Tensor, size: int, csv_path: str):
        self.files, self.labels, self.mask, self.size, self.csv_path = files, labels, mask, size, csv_path

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            image, hw = load_image(self.files[i], self.size)
        except TrainError as err:
            raise TrainError(f"{err} (listed in {self.csv_path}, data row {i + 1})") from None
        return image, self.labels[i], self.mask[i], i, torch.tensor(hw)


def standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - GRAY_MEAN) / GRAY_STD


# ------------------------------------------------------------------------ model


class SplitClassifier(nn.Module):
    """A torchvision classifier split by :func:`fastcam.models.split_model`: ``body`` (features before the
    pooling) and ``head`` (the linear layer). ``forward(x)`` gives the logits, ``forward(x, features=True)``
    the features (what the training calls through DDP)."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        f = self.body(x)
        return f if features else self.head(f.mean((2, 3)))


def _first_conv_key(arch: str) -> str:
    return "features.conv0.weight" if arch.startswith("densenet") else "conv1.weight"


def build_model(arch: str, classes: int, weights: str | None = None) -> SplitClassifier:
    """The torchvision ``arch`` with ``classes`` outputs and a one-channel first convolution; ``weights``: a
    local state_dict file (a 3-channel first convolution is summed over its input channels; a head of
    another shape is left out)."""
    import torchvision

    from fastcam.models import split_model

    if arch not in ARCHS:
        raise TrainError(f"unknown arch {arch!r}; expected one of {list(ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=classes)
    conv_key = _first_conv_key(arch)
    owner = model.features if arch.startswith("densenet") else model
    name = "conv0" if arch.startswith("densenet") else "conv1"
    old = getattr(owner, name)
    conv = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(old.weight.sum(1, keepdim=True))
    setattr(owner, name, conv)
    if weights is not None:
        state = load_tensors(weights, "--weights ", "state_dict")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise TrainError(f"--weights {weights}: holds a {type(state).__name__}, not a state_dict")
        if conv_key in state and state[conv_key].dim() == 4 and state[conv_key].shape[1] == 3:
            state[conv_key] = state[conv_key].sum(1, keepdim=True)
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape)}  # the 1000-way head
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = ("fc.", "classifier.")
        missing = [k for k in missing if not k.startswith(head)]
        if missing or unexpected:
            raise TrainError(f"--weights {weights}: not a {arch} state_dict (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return SplitClassifier(*split_model(model))


# ------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str, model: SplitClassifier, optimizer, config: dict, epoch: int, steps: int,
                    classes: list[str], history: dict) -> None:
    """Tensors and primitive containers only, so that ``torch.load(..., weights_only=True)`` reads it."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "config": config, "epoch": epoch, "steps": steps,
             "classes": list(classes), "history": _json_safe(history)}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_tensors(path: str, option: str, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU; errors name the file (after ``option``)."""
    if not os.path.isfile(path):
        raise TrainError(f"{option}{path}: no such {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainError(f"{option}{path}: cannot load the {what}: {err}") from None


def load_checkpoint(path: str) -> dict:
    ckpt = load_tensors(path, "", "checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch", "classes"} <= set(ckpt):
        raise TrainError(f"{path}: not a fastcam train checkpoint")
    return ckpt


# ------------------------------------------------------------------------ the command


def _boxes_of(files_names: list[str], boxes: dict, hw: torch.Tensor, size: int):
    """Box tensors (in resized-image pixels) of the images whose name or file name has boxes."""
    xywh, index = [], []
    for b, name in enumerate(files_names):
        image_boxes = boxes.get(name) or boxes.get(os.path.basename(name)) or []
        sy, sx = size / float(hw[b, 0]), size / float(hw[b, 1])
        for c, x, y, w, h in image_boxes:
            xywh.append((x * sx, y * sy, w * sx, h * sy))
            index.append((b, c))
    return (torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(index, dtype=torch.int64).reshape(-1, 2))


def _inputs(loader, sizes: list, channels_last: bool):
    """The standardized images of ``loader``'s batches; their original sizes go into ``sizes``."""
    for x, _, _, _, hw in loader:
        sizes.append(hw)
        x = standardize(x)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


def format_results(result: dict) -> str:
    rows = metric_rows(result)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'value':>9}", "-" * (width + 11)]
    lines += [f"{label:<{width}}  {value:>9.3f}" for label, value in rows]
    return "\n".join(lines)


def guarded(command: str, body, args) -> int:
    """``body(args)``, with a bad input (missing file, unreadable image, bad option value) reported as one line."""
    try:
        return body(args)
    except (TrainError, FileNotFoundError, ValueError) as err:
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line is the error
            message = message.strip().splitlines()[-1].split("TrainError: ", 1)[-1]
        return _fail(message, command)


def run(args) -> int:
    return guarded("train", _run, args)


def _setup_distributed(device: torch.device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def _run(args) -> int:
    from fastcam.data import read_boxes, read_labels

    device = _resolve_device(args.device)
    world, rank, device = _setup_distributed(device)
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and ckpt["config"].get("arch") != args.arch:
        raise TrainError(f"--resume {args.resume}: the checkpoint is a {ckpt['config'].get('arch')}, not {args.arch}")

    table = read_labels(args.labels, args.format, args.uncertain,
                        classes=ckpt["classes"] if ckpt else None)
    classes = list(table.classes)
    files = resolve_paths(args.images, table.paths, args.labels)
    if args.val_labels:
        val_table = read_labels(args.val_labels, args.format, args.uncertain, classes=classes)
        train_idx, val_idx = torch.arange(len(table)), None
        val_files, val_csv = resolve_paths(args.images, val_table.paths, args.val_labels), args.val_labels
        val_names, val_y, val_m = val_table.paths, val_table.labels, val_table.mask
    else:
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(args.seed))
        n_val = max(1, round(args.val_fraction * len(table)))
        if n_val >= len(table):
            raise TrainError(f"{args.labels}: {len(table)} images are too few to hold out {n_val} for validation")
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        val_files, val_csv = files, args.labels
        val_names = [table.paths[i] for i in val_idx]
        val_y, val_m = table.labels[val_idx], table.mask[val_idx]
    boxes = read_boxes(args.boxes, classes=classes) if args.boxes else {}

    train_set = torch.utils.data.Subset(LabeledImages(files, table.labels, table.mask, args.image_size, args.labels),
                                        train_idx.tolist())
    val_base = LabeledImages(val_files, table.labels if val_idx is not None else val_y,
                             table.mask if val_idx is not None else val_m, args.image_size, val_csv)
    val_set = torch.utils.data.Subset(val_base, val_idx.tolist()) if val_idx is not None else val_base
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                                         num_workers=workers, pin_memory=cuda,
                                         drop_last=len(train_set) > args.batch_size,  # no 1-image batch for BN
                                         generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, num_workers=workers, pin_memory=cuda)

    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(classes), args.weights if ckpt is None else None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(loader)
    start_epoch = ckpt["epoch"] + 1 if ckpt else 1
    steps_done = int(ckpt.get("steps", (start_epoch - 1) * steps_per_epoch)) if ckpt else 0
    total_steps = max(args.epochs * steps_per_epoch, steps_done + 1)
    optimizer, scheduler = make_optimizer(model, args.lr, total_steps, ckpt["optimizer"] if ckpt else None,
                                          steps_done)
    criterion = make_criterion(args)
    attention = True  # AttentionMapLoss: with every lambda 0 it is the masked BCE
    body = model
    if world > 1:
        body = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    config = {k: getattr(args, k) for k in CONFIG_KEYS} | {"classes": len(classes), "gray_mean": GRAY_MEAN,
                                                           "gray_std": GRAY_STD}
    config = {k: v for k, v in config.items() if v is not None}
    history = {k: list(v) for k, v in ckpt.get("history", {}).items()} if ckpt else {}
    if main:
        os.makedirs(args.out, exist_ok=True)
    log(f"fastcam train: {len(train_set)} training and {len(val_set)} validation images, {len(classes)} classes, "
        f"{args.arch} at {args.image_size}x{args.image_size} on {device}"
        + (f" x {world} processes" if world > 1 else "") + f"; checkpoints into {os.path.abspath(args.out)}")
    if start_epoch > args.epochs:
        log(f"the checkpoint is at epoch {start_epoch - 1} of --epochs {args.epochs}: nothing to do")
        return 0

    from tqdm.auto import tqdm

    def features(x):
        return body(x, features=True)

    for epoch in range(start_epoch, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        sums = {"loss": 0.0, "bce": 0.0, "distinct": 0.0}
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=args.no_progress or not main,
                   file=sys.stderr, dynamic_ncols=True)
        for x, y, m, _, _ in bar:
            x = standardize(x.to(device, non_blocking=True))
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y, m = y.to(device, non_blocking=True), m.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, bce, distinct = compute_loss(model, criterion, x, y, m, attention, body=features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps_done += 1
            for key, value in (("loss", loss), ("bce", bce), ("distinct", distinct)):
                sums[key] += float(value.detach())
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        if not main:
            continue
        hw_list = []
        logits, cams = predict_batches(model, _inputs(val_loader, hw_list, cuda), device, args.backend, autocast=cuda)
        hw = torch.cat(hw_list)
        val_boxes, box_index = _boxes_of(val_names, boxes, hw, args.image_size)
        result = evaluate(logits, cams, val_y, val_boxes, box_index, args.image_size, classes, val_m)
        record = {"epoch": epoch, **{k: v / max(1, steps_per_epoch) for k, v in sums.items()},
                  "val_macro_auc": result["macro_auc"], "seconds": time.perf_counter() - started}
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        log(f"\nepoch {epoch}/{args.epochs}: loss {record['loss']:.4f} (bce {record['bce']:.4f}), "
            f"{record['seconds']:.1f} s; validation ({len(val_set)} images, {val_boxes.shape[0]} boxes):")
        log(format_results(result))
        path = os.path.join(args.out, f"checkpoint-epoch{epoch:03d}.pt")
        save_checkpoint(path, model, optimizer, config, epoch, steps_done, classes, history)
        save_checkpoint(os.path.join(args.out, "checkpoint-last.pt"), model, optimizer, config, epoch, steps_done,
                        classes, history)
        log(f"wrote {path} and checkpoint-last.pt")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0

