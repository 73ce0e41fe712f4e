"""Side by side, in one run: attention_loss forward + backward per usable backend and the
speed-up over the reference, on the SPEC §5 shapes.

    python benchmarks/compare_backends.py                 # CPU: batch 2, 4 and 8
    python benchmarks/compare_backends.py --batch 64      # any batch (the SPEC's on a GPU: --spec)
    python benchmarks/compare_backends.py --tiny --reps 200   # the fixed cost of a step

Wall-clock medians (CUDA-synchronized on a GPU), the backends run in turn (a few warm
repetitions of each per round) and the speed-up the median of the rounds' ratios; the
pytest-benchmark suite next to this file measures the same step with statistics. The
backward computes the gradients of F, W and b with torch.autograd.grad, as in training where
F comes from the backbone: no accumulation into a leaf's .grad is timed.

The last columns put the GEMMs in scale: "gemm ms" is the time of the three dense fp32 GEMMs
of the head (S = W F, dF = W^T G, dW = G F^T over every map, on features already in fp32,
torch.matmul on this device) and "max x" the reference's time over it: the most a backend
that runs all three in full could gain. Only S = W F is unavoidable (every map is
returned); the backward's GEMMs need only the maps some loss term weighs (at the real
label rates, most labeled images have none), which the CPU backend exploits.
"""

import argparse
import ctypes
import sys
import time

import torch

import fastcam
from fastcam.workloads import SPEC_SHAPES, Shape, make_inputs


def _median_s(fn, sync, reps):
    """The median of `reps` timed calls of fn, in seconds (synchronized after each)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def median_ms(fn, device, reps):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    return _median_s(fn, sync, reps) * 1e3


def interleaved_ms(steps, device, reps, inner=5):
    """Median ms of each step and median speed-up over the reference's, the steps run in turn:
    each round runs each step `inner` times and keeps the median (warm, like a training loop
    repeating one step); the VM's speed drifts by 10-30% within minutes, which moves blocks of
    repetitions measured one after the other, not the ratio within a round. (One step of each
    per round measured each after the other's, with cold caches: the cpu backend's tiny step
    95 -> 179 us.)"""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in steps.values():
        for _ in range(3):
            fn()
    sync()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            fn()  # the other step's data out of the caches
            sync()
            times[name].append(_median_s(fn, sync, inner))

    def median(values):
        return sorted(values)[len(values) // 2]

    ratios = {name: median([t / s for t, s in zip(times["torch"], ts)]) for name, ts in times.items()}
    return {name: median(ts) * 1e3 for name, ts in times.items()}, ratios


def steady_allocator() -> bool:
    """On glibc, serve every block under 32 MiB from the heap (mallopt M_MMAP_THRESHOLD).

    glibc starts by mmapping every block over 128 KiB, so each step of a fresh process page-faults
    its multi-MB temporaries in again, and raises that threshold only once such a block is freed:
    the reference's step at resnet50@224 B=8 took 5.8-6.7 ms in a fresh process and 2.6-2.9 ms
    after larger shapes had run (2 cores, 2026-11-26). A training loop is in the second state;
    this puts every shape there, whatever ran before it (--cold-malloc to leave glibc alone)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # glibc's own warm state: after freeing an mmapped block of size s it serves blocks up to s
    # from the heap and trims the heap's free top only beyond 2 s. Setting the first by hand
    # leaves the second at 128 KiB (each step's frees then hand its pages back, and the next
    # step faults them in again), so both are set.
    m_trim_threshold, m_mmap_threshold = -1, -3
    return libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 64 << 20) == 1


def gemm_floor_ms(shape, device, reps):
    """The three unavoidable fp32 GEMMs of one step at this shape."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(shape.B, shape.K, shape.N, generator=g).to(device)
    w = torch.randn(shape.C, shape.K, generator=g).to(device)
    grad = torch.randn(shape.B, shape.C, shape.N, generator=g).to(device)

    def gemms():
        torch.matmul(w, f)  # S
        torch.matmul(w.t(), grad)  # dF
        torch.matmul(grad, f.transpose(1, 2)).sum(0)  # dW

    return median_ms(gemms, device, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default 2 4 8 on CPU)")
    parser.add_argument("--spec", action="store_true", help="the SPEC's batch sizes")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tiny", action="store_true",
                        help="only a tiny shape (B=2, C=3, K=5, 2x2): the fixed cost of a step")
    parser.add_argument("--cold-malloc", action="store_true",
                        help="leave glibc's allocator as it starts (see steady_allocator)")
    args = parser.parse_args()
    steady = not args.cold_malloc and steady_allocator()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = [n for n, b in fastcam.backends().items() if b.usable and device in b.device_types]
    batches = [None] if args.spec else (args.batch or [2, 4, 8])
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | bf16 features, "
          f"fwd+bwd of attention_loss, median of {args.reps} | malloc {'steady' if steady else 'as started'}")
    print(f"{'shape':24s} {'B':>4s} " + " ".join(f"{b + ' ms':>10s}" for b in backends)
          + "".join(f" {b + ' x':>8s}" for b in backends if b != "torch") + f" {'gemm ms':>9s} {'max x':>7s}")
    shapes = [Shape("tiny", 2, 3, 5, 2, 2)] if args.tiny else SPEC_SHAPES
    for batch in batches if not args.tiny else [None]:
        for shape in shapes:
            shape = shape if batch is None else shape.scaled(batch)
            f, w, b, labels, mask = make_inputs(shape, device=device)
            steps = {}
            for name in backends:
                def step(name=name, f=f, w=w, b=b, labels=labels, mask=mask):
                    out = fastcam.attention_loss(f, w, b, labels, mask, backend=name)
                    torch.autograd.grad(out.loss, (f, w, b))  # the gradients, not accumulated into .grad

                steps[name] = step
            times, ratios = interleaved_ms(steps, device, args.reps)
            floor = gemm_floor_ms(shape, device, args.reps)
            print(f"{shape.name:24s} {shape.B:4d} " + " ".join(f"{times[n]:10.3f}" for n in backends)
                  + "".join(f" {ratios[n]:8.2f}" for n in backends if n != "torch")
                  + f" {floor:9.3f} {times['torch'] / floor:7.2f}")


if __name__ == "__main__":
    main()
