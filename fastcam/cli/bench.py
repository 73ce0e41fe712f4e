"""``fastcam bench``: the table of SPEC §5 on the device present.

One training step of the head (``attention_loss`` forward and the gradients of F, W and b)
per SPEC §5 shape, timed side by side in one run for: the eager reference, ``torch.compile``
of it (default mode; reduce-overhead on CUDA, where CUDA graphs exist), the hand-written
Grad-CAM way (``create_graph=True``, fastcam.workloads.gradcam_attention_loss) and each usable
fastcam backend, with the memory floor from the measured copy bandwidth. On a GPU: medians of
``triton.testing.do_bench`` (L2 flushed) at the SPEC batch sizes, and the extra peak memory of
a step over its inputs. On the CPU: wall-clock medians at batch 2 (``--batch`` to change).

``--e2e`` instead times the number a user feels (SPEC §5 item 6): whole ResNet-50 training
steps (bf16 autocast, channels_last, SGD) without the attention loss, with each fastcam
backend's, with the eager reference's and with hand-written Grad-CAM's, in one run: time per
step, the overhead over the plain step, and the peak memory on a GPU (at batch 256 @ 224,
32 @ 1024 and 16 @ 224 there; at 2 @ 224 on the CPU, ``--e2e-configs`` to change).
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time

import torch

import fastcam
from fastcam.workloads import E2E_CONFIGS, SPEC_SHAPES, Shape, gradcam_attention_loss, make_inputs, resnet50_steps

HELP = "time the loss step against the SPEC §5 baselines on this device (prints the table, writes JSON)"
TINY = Shape("tiny", 2, 3, 5, 2, 2)
BASELINES = ("eager", "compile", "reduce-overhead", "gradcam")


def add_arguments(parser) -> None:
    names = [s.name for s in SPEC_SHAPES] + [TINY.name]
    parser.add_argument("--shapes", nargs="+", choices=names, metavar="SHAPE",
                        help=f"shapes to run (default: the six of SPEC §5; one of {', '.join(names)})")
    parser.add_argument("--batch", type=int, nargs="+", metavar="B",
                        help="batch sizes (default: the SPEC's on a GPU, 2 on the CPU)")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="fastcam backends to time (default: every one usable on this device)")
    parser.add_argument("--skip", nargs="+", default=[], choices=BASELINES[1:],
                        help="baselines to leave out (compiling takes about a minute per shape on a CPU)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions on the CPU (default 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--e2e", action="store_true",
                        help="time whole ResNet-50 training steps instead (SPEC §5 item 6)")
    parser.add_argument("--e2e-configs", nargs="+", metavar="BxSIDE",
                        help="batch x image side of the --e2e steps (default: 256x224 32x1024 16x224 on a GPU, "
                             "2x224 on the CPU)")  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, reps: int, gpu_ms: int = 100) -> float:
    """Median milliseconds of fn(): triton's do_bench on a GPU (L2 flushed, repeated for about
    gpu_ms), wall clock on the CPU (reps times)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=gpu_ms, return_mode="median"))
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: str, reps: int) -> float:
    """Bytes per second of a device-to-device copy, read and write counted (SPEC §5)."""
    n = (256 if device == "cuda" else 64) << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * n / (ms / 1e3)


def peak_bytes(fn, device: str) -> int | None:
    """Peak memory allocated while fn() runs, everything held counted (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def extra_peak_bytes(fn, device: str) -> int | None:
    """Peak memory a step allocates beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    return peak_bytes(fn, device) - base


def steps(shape: Shape, device: str, backends: list[str], skip: list[str]) -> dict:
    """Each contender's training step of the head on the inputs of ``shape``."""
    f, w, b, labels, mask = make_inputs(shape, device=device)

    def grads(loss):
        torch.autograd.grad(loss, (f, w, b))  # F's gradient as the backbone would receive it

    def reference_loss(f, w, b):
        return fastcam.attention_loss(f, w, b, labels, mask, backend="torch").loss

    out = {"eager": lambda: grads(reference_loss(f, w, b))}
    modes = [m for m in ("compile", "reduce-overhead") if m not in skip]
    if modes:
        # Every shape compiles the same function again: past dynamo's recompile limit (8) the
        # later shapes would silently run eager (seen on an H200: vit and B128 "compiled" at eager speed).
        torch._dynamo.reset()
    for mode in modes:
        if mode == "reduce-overhead" and device != "cuda":
            continue  # CUDA graphs
        compiled = torch.compile(reference_loss, mode="default" if mode == "compile" else mode, dynamic=False)
        out[mode] = lambda compiled=compiled: grads(compiled(f, w, b))
    if "gradcam" not in skip:
        out["gradcam"] = lambda: grads(gradcam_attention_loss(f, w, b, labels, mask))
    for name in backends:
        out[name] = lambda name=name: grads(fastcam.attention_loss(f, w, b, labels, mask, backend=name).loss)
    return out, f


def run_shape(shape: Shape, device: str, backends: list[str], skip: list[str], reps: int, bandwidth: float) -> dict:
    contenders, f = steps(shape, device, backends, skip)
    bytes_f = f.numel() * f.element_size()
    row = {"shape": shape.name, "B": shape.B, "C": shape.C, "K": shape.K, "N": shape.N,
           "layout": "tokens" if shape.tokens else "NCHW", "bytes_F": bytes_f,
           "floor_ms": 3 * bytes_f / bandwidth * 1e3, "ms": {}, "errors": {}, "extra_peak_bytes": {}}  # fmt: skip
    for name, fn in contenders.items():
        try:
            row["ms"][name] = time_ms(fn, device, reps)
            row["extra_peak_bytes"][name] = extra_peak_bytes(fn, device)
        except Exception as exc:  # noqa: BLE001 - a baseline that fails here is reported, not fatal
            row["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    timed = [n for n in backends if n in row["ms"]]
    if timed:
        best = min(timed, key=lambda n: row["ms"][n])
        compiled = [row["ms"][m] for m in ("compile", "reduce-overhead") if m in row["ms"]]
        row["best_backend"] = best
        row["best_ms"] = row["ms"][best]
        row["speedup_vs_eager"] = row["ms"]["eager"] / row["best_ms"] if "eager" in row["ms"] else None
        row["speedup_vs_best_compile"] = min(compiled) / row["best_ms"] if compiled else None
        row["speedup_vs_gradcam"] = row["ms"]["gradcam"] / row["best_ms"] if "gradcam" in row["ms"] else None
        row["percent_of_floor"] = 100 * row["floor_ms"] / row["best_ms"]
    return row


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_header(columns: list[str]) -> None:
    print("milliseconds per step (forward + gradients of F, W, b), median")
    print(f"{'shape':22s} {'B':>4s} {'floor':>7s} " + " ".join(f"{c:>9s}" for c in columns)
          + f" {'best':>7s} {'x eager':>8s} {'x compile':>9s} {'x gradcam':>9s} {'% floor':>8s} {'extra MB':>9s}",
          flush=True)  # fmt: skip


def print_row(r: dict, columns: list[str]) -> None:
    """One shape's line (printed as soon as it is measured: a time-limited run keeps what it did)."""
    cells = " ".join(f"{_fmt(r['ms'].get(c)):>9s}" for c in columns)
    extra = r["extra_peak_bytes"].get(r.get("best_backend"))
    print(f"{r['shape']:22s} {r['B']:4d} {r['floor_ms']:7.3f} {cells} {r.get('best_backend', '-'):>7s} "
          f"{_fmt(r.get('speedup_vs_eager'), '.2f'):>8s} {_fmt(r.get('speedup_vs_best_compile'), '.2f'):>9s} "
          f"{_fmt(r.get('speedup_vs_gradcam'), '.1f'):>9s} {_fmt(r.get('percent_of_floor'), '.1f'):>8s} "
          f"{_fmt(None if extra is None else extra / 2**20, '.1f'):>9s}", flush=True)  # fmt: skip
    for name, error in r["errors"].items():
        print(f"    {name} failed: {error}", flush=True)


def _e2e_configs(values: list[str] | None, device: str) -> list[tuple[int, int]]:
    if not values:
        return list(E2E_CONFIGS) if device == "cuda" else [(2, 224)]
    configs = []
    for value in values:
        try:
            batch, side = (int(part) for part in value.lower().split("x"))
        except ValueError:
            raise SystemExit(f"fastcam bench: --e2e-configs takes BATCHxSIDE (e.g. 16x224), got {value!r}") from None
        if batch < 1 or side < 32:
            raise SystemExit(f"fastcam bench: --e2e-configs {value}: the batch must be at least 1 and the side at "
                             "least 32 (ResNet-50 divides it by 32)")  # fmt: skip
        configs.append((batch, side))
    return configs


def run_e2e(configs, device: str, backends: list[str], skip: list[str], reps: int) -> list[dict]:
    """Each config's training steps, timed side by side; overheads against the plain step."""
    contenders = list(dict.fromkeys(["torch", *backends]))
    rows = []
    for batch, side in configs:
        _, steps = resnet50_steps(batch, side, device=device, backends=contenders, gradcam="gradcam" not in skip)
        row = {"batch": batch, "side": side, "ms": {}, "peak_bytes": {}, "errors": {}}
        for name, fn in steps.items():
            try:
                # Whole steps take 15-140 ms: 100 ms of repeats was 1-6 steps, and at batch 16 the
                # medians moved by +-30% between runs (H200); 2 s of repeats per contender.
                row["ms"][name] = time_ms(fn, device, reps, gpu_ms=2000)
                row["peak_bytes"][name] = peak_bytes(fn, device)
            except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
                row["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        plain = row["ms"].get("plain")
        row["overhead_percent"] = {n: 100 * (ms / plain - 1) for n, ms in row["ms"].items() if plain and n != "plain"}
        rows.append(row)
        # As soon as measured (a time-limited run keeps what it did); the table follows at the end.
        print(f"{batch} x {side}: " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in row["ms"].items()), flush=True)
        del steps
    return rows


def print_e2e_table(rows: list[dict], device: str) -> None:
    names = list(dict.fromkeys(n for r in rows for n in (*r["ms"], *r["errors"])))
    print("whole ResNet-50 training steps (bf16 autocast, channels_last, SGD): median ms per step, "
          "(+% over the plain step)" + (", peak GiB" if device == "cuda" else ""))  # fmt: skip
    print(f"{'batch x side':14s} " + " ".join(f"{n:>18s}" for n in names))
    for r in rows:
        cells = []
        for n in names:
            if n not in r["ms"]:
                cells.append(f"{'failed':>18s}")
                continue
            extra = "" if n == "plain" else f" ({r['overhead_percent'][n]:+.1f}%)" if n in r["overhead_percent"] else ""
            cells.append(f"{r['ms'][n]:.2f}{extra}".rjust(18))
        print(f"{str(r['batch']) + ' x ' + str(r['side']):14s} " + " ".join(cells))
        if device == "cuda":
            print(f"{'  peak GiB':14s} " + " ".join(
                f"{_fmt(None if r['peak_bytes'].get(n) is None else r['peak_bytes'][n] / 2**30, '.2f'):>18s}"
                for n in names))  # fmt: skip
        for name, error in r["errors"].items():
            print(f"    {name} failed: {error}")


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable = [n for n, info in fastcam.backends().items() if info.usable and device in info.device_types]
    backends = args.backends or [n for n in usable if n != "torch"]
    unknown = [n for n in backends if n not in usable or n == "torch"]
    if unknown:
        raise SystemExit(f"fastcam bench: --backends {' '.join(unknown)}: not a fastcam backend usable on {device} "
                         f"here (usable: {', '.join(n for n in usable if n != 'torch') or 'none'}; "
                         "see `fastcam info`)")  # fmt: skip
    if args.e2e_configs and not args.e2e:
        raise SystemExit("fastcam bench: --e2e-configs needs --e2e")
    if args.reps < 1:
        raise SystemExit(f"fastcam bench: --reps must be at least 1, got {args.reps}")
    if args.batch and min(args.batch) < 1:
        raise SystemExit(f"fastcam bench: --batch sizes must be at least 1, got {args.batch}")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "device_name": name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "fastcam": fastcam.__version__,
              "backends": {n: str(fastcam.backends()[n]) for n in backends}}  # fmt: skip
    if args.e2e:
        if args.shapes or args.batch:
            raise SystemExit("fastcam bench: --shapes and --batch are for the head's table; --e2e takes --e2e-configs")
        configs = _e2e_configs(args.e2e_configs, device)
        print(f"device {device} ({name}) | torch {torch.__version__} | fastcam {fastcam.__version__}")
        record["e2e"] = run_e2e(configs, device, backends, args.skip, args.reps)
        print_e2e_table(record["e2e"], device)
    else:
        by_name = {s.name: s for s in (*SPEC_SHAPES, TINY)}
        shapes = [by_name[n] for n in (args.shapes or [s.name for s in SPEC_SHAPES])]
        batches = args.batch or ([None] if device == "cuda" else [2])
        bandwidth = copy_bandwidth(device, args.reps)
        print(f"device {device} ({name}) | torch {torch.__version__} | fastcam {fastcam.__version__} | "
              f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write) | bf16 features")
        columns = [c for c in BASELINES if c not in args.skip and not (c == "reduce-overhead" and device != "cuda")]
        columns += backends
        print_header(columns)
        rows = []
        for shape in shapes:
            for batch in batches:
                rows.append(run_shape(shape if batch is None else shape.scaled(batch), device, backends, args.skip,
                                      args.reps, bandwidth))  # fmt: skip
                print_row(rows[-1], columns)
        record.update(copy_bandwidth_bytes_per_s=bandwidth, rows=rows)
    if args.json:
        try:
            import triton

            record["triton"] = triton.__version__
        except ImportError:
            record["triton"] = None
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"wrote {args.json}")
    return 0
