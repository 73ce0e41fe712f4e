"""Two builds of fastcam side by side on the CPU: processes of each alternated, each timing the
cpu backend's training step (attention_loss forward + gradients of F, W, b) at a few shapes.

    git worktree add /tmp/old <commit>; (cd /tmp/old && FASTCAM_CUDA=0 python setup.py build_ext --inplace)
    python benchmarks/ab_builds.py /tmp/old . --rounds 3
    python benchmarks/ab_builds.py /tmp/old . --shapes densenet121@512-174:4 resnet50@224:8

The VM drifts by 10-30% within minutes: a build measured after the other mistakes the drift for
a change, so the processes alternate and each round prints both builds' medians (ms). The same
step as benchmarks/compare_backends.py (its steady allocator), without the reference.
"""

import argparse
import os
import subprocess
import sys

DEFAULT_CASES = ["densenet121@512-174:4", "densenet121@512-174:8", "resnet50@224:8", "vit-b16@224-tokens:4",
                 "vit-b16@224-tokens:8"]


def measure(cases: list[str], reps: int) -> list[float]:
    """Median ms (compare_backends.median_ms) of the cpu step at each 'shape:batch', this process's fastcam."""
    import torch
    from compare_backends import median_ms, steady_allocator

    import fastcam
    from fastcam.workloads import SPEC_SHAPES, make_inputs

    steady_allocator()
    medians = []
    for case in cases:
        name, batch = case.rsplit(":", 1)
        shape = next(s for s in SPEC_SHAPES if s.name == name).scaled(int(batch))
        f, w, b, labels, mask = make_inputs(shape, device="cpu")

        def step(f=f, w=w, b=b, labels=labels, mask=mask):
            out = fastcam.attention_loss(f, w, b, labels, mask, backend="cpu")
            torch.autograd.grad(out.loss, (f, w, b))

        medians.append(median_ms(step, "cpu", reps))
    return medians


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs=2, help="two checkouts with fastcam._C built in place")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_CASES, metavar="SHAPE:B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(" ".join(f"{m:.3f}" for m in measure(args.shapes, args.reps)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    print("ms per step (median of %d), builds alternated: %s" % (args.reps, " | ".join(args.builds)))
    print(f"{'round':6s} {'build':40s} " + " ".join(f"{c:>22s}" for c in args.shapes))
    for r in range(args.rounds):
        for build in args.builds:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(build), here]))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *args.builds, "--child", "--reps",
                                  str(args.reps), "--shapes", *args.shapes], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{build}: {out.stderr.strip().splitlines()[-1]}")
            values = out.stdout.split()
            print(f"{r + 1:<6d} {build[-40:]:40s} " + " ".join(f"{v:>22s}" for v in values))


if __name__ == "__main__":
    main()
