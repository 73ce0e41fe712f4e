"""``fastcam info``: versions, and which backends are usable here and why the others are not."""

from __future__ import annotations

import json
import platform

import torch

import fastcam

HELP = "print versions and the backends usable here (and why others are not)"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the same as JSON")


def collect() -> dict:
    return {
        "fastcam": fastcam.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "backends": {name: vars(info) for name, info in fastcam.backends().items()},
    }


def run(args) -> int:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for key in ("fastcam", "python", "torch", "torch_cuda", "cuda_available"):
        print(f"{key:15s} {facts[key]}")
    for i, name in enumerate(facts["devices"]):
        print(f"{'device ' + str(i):15s} {name}")
    print("backends:")
    for info in fastcam.backends().values():
        print(f"  {info}")
    return 0
