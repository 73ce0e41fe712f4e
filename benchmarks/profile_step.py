"""Where a training step of the head spends its time: the kernels of one ``attention_loss``
forward + backward per backend and SPEC §5 shape, from torch.profiler (CUDA kernel times on a
GPU, operator self times on the CPU). For tuning: the table says which kernel to work on.

    python benchmarks/profile_step.py                       # every SPEC shape, every backend
    python benchmarks/profile_step.py --shapes resnet50@224 --backends cuda --top 20

scripts/gpu_check.sh runs it (stage ``profile``).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fastcam
from fastcam.workloads import SPEC_SHAPES, make_inputs


def step(f, w, b, labels, mask, backend):
    loss = fastcam.attention_loss(f, w, b, labels, mask, backend=backend).loss
    torch.autograd.grad(loss, (f, w, b))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable = [n for n, i in fastcam.backends().items() if i.usable and device in i.device_types]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SPEC_SHAPES],
                        choices=[s.name for s in SPEC_SHAPES])  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=usable, choices=usable)
    parser.add_argument("--batch", type=int, help="batch size (default: the SPEC's on a GPU, 2 on the CPU)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    args = parser.parse_args()
    sort = "cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    by_name = {s.name: s for s in SPEC_SHAPES}
    for name in args.shapes:
        shape = by_name[name]
        batch = args.batch or (shape.B if device == "cuda" else 2)
        shape = shape.scaled(batch)
        f, w, b, labels, mask = make_inputs(shape, device=device)
        for backend in args.backends:
            for _ in range(2):
                step(f, w, b, labels, mask, backend)
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    step(f, w, b, labels, mask, backend)
                if device == "cuda":
                    torch.cuda.synchronize()
            print(f"\n### {shape.name} B={shape.B} backend={backend} ({args.steps} steps; times are totals)")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
        del f, w, b


if __name__ == "__main__":
    main()
