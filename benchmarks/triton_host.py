"""Host time of the triton backend's training step, on the CPU, with the kernels stubbed out.

The triton backend is host-bound at the SPEC shapes on a GPU (BENCHMARKS.md: 3-4 ms a step
around 0.13-0.84 ms of kernels). This measures its Python and PyTorch work without a GPU:
under the Triton interpreter every launch is replaced by a call that returns at once (the
launch is counted), so what remains is the step's own host work — the ops' dispatch and
autograd, the argument preparation, the small tensor ops — less what Triton's launcher costs
on a GPU per launch. Batch 2 of each SPEC shape, one thread, median of --reps rounds of
--steps steps (the outputs are not the loss's: the kernels do not run).

    .venv/bin/python benchmarks/triton_host.py [--shapes NAME ...] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import fastcam  # noqa: E402
from fastcam.workloads import SPEC_SHAPES, make_inputs  # noqa: E402

LAUNCHES = [0]


def _stub(self, *args, **kwargs):
    LAUNCHES[0] += 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=[s.name for s in SPEC_SHAPES])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of five steps")
    args = parser.parse_args(argv)
    interpreter.InterpretedFunction.run = _stub
    torch.set_num_threads(1)
    by_name = {s.name: s for s in SPEC_SHAPES}
    print(f"{'shape':22s} {'host us/step':>12s} {'launches/step':>13s}")
    for name in args.shapes:
        f, w, b, labels, mask = make_inputs(by_name[name].scaled(2), device="cpu")

        def step(f=f, w=w, b=b, labels=labels, mask=mask):
            out = fastcam.attention_loss(f, w, b, labels, mask, backend="triton")
            torch.autograd.grad(out.loss, (f, w, b))

        for _ in range(3):
            step()
        rounds = []
        for _ in range(args.reps):
            LAUNCHES[0] = 0
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rounds.append((time.perf_counter() - start) / args.steps)
        print(f"{name:22s} {statistics.median(rounds) * 1e6:12.0f} {LAUNCHES[0] / args.steps:13.1f}")
        if args.profile:
            with torch.profiler.profile() as prof:
                for _ in range(5):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
