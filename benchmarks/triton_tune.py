"""The Triton backend's autotuning at the SPEC §5 shapes (a GPU): the first training step's
wall time at each shape (compiles and tuning included), the configuration each GEMM kernel
chose and every configuration's time, then the head's GEMM ops timed alone against the bytes
they must move (S: F read once; backward: F read and dF written), beside cuBLAS doing the
same products (torch.matmul on the three bf16 parts of W) for scale.

    python benchmarks/triton_tune.py [--shapes resnet50@224 ...] [--json out.json]

scripts/gpu_check.sh runs it (stage ``triton-tune``); benchmarks/NOTES.md records the results
and fastcam/triton/cam_head.py's configuration lists come from them.
"""

import argparse
import json
import time

import torch

import fastcam
from fastcam.cli.bench import copy_bandwidth
from fastcam.workloads import SPEC_SHAPES, make_inputs


def _step(f, w, b, labels, mask):
    loss = fastcam.attention_loss(f, w, b, labels, mask, backend="triton").loss
    torch.autograd.grad(loss, (f, w, b))


def _tuning(kernel) -> dict:
    """key -> (chosen config, {config: median ms}) of an autotuned kernel."""
    timings = getattr(kernel, "configs_timings", None) or {}
    out = {"best": str(getattr(kernel, "best_config", None))}
    out["timings_ms"] = {str(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
    return out


def _gemm_times(shape, f, w, bandwidth) -> dict:
    """The GEMM ops alone (median ms), their floors, and cuBLAS doing their products in bf16 with
    the parts stacked (S: W3 [3C, K] @ F; dF: W3^T @ G3 [B, 3C, N]; dW: G3 @ F^T per image, unsummed)."""
    from triton.testing import do_bench

    from fastcam.triton.cam_head import scores, scores_backward

    fk = f.transpose(1, 2) if shape.tokens else f.flatten(2)
    g = torch.randn(shape.B, shape.C, shape.N, device=f.device)
    bytes_f = fk.numel() * fk.element_size()
    hi = w.bfloat16()
    mid = (w - hi.float()).bfloat16()
    w3 = torch.cat([hi, mid, (w - hi.float() - mid.float()).bfloat16()])
    g3 = torch.cat([g.bfloat16()] * 3, dim=1)  # [B, 3C, N]: the parts' shapes (values do not matter here)
    return dict(scores_ms=do_bench(lambda: scores(fk, w), return_mode="median"),
                backward_ms=do_bench(lambda: scores_backward(g, fk, w, True, True), return_mode="median"),
                cublas_w3_f_ms=do_bench(lambda: torch.matmul(w3, fk), return_mode="median"),
                cublas_df_ms=do_bench(lambda: torch.matmul(w3.t(), g3), return_mode="median"),
                cublas_dw_per_image_ms=do_bench(lambda: torch.matmul(g3, fk.transpose(1, 2)), return_mode="median"),
                scores_floor_ms=bytes_f / bandwidth * 1e3, backward_floor_ms=2 * bytes_f / bandwidth * 1e3)  # fmt: skip


def main() -> None:
    from fastcam.triton import cam_head as kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SPEC_SHAPES],
                        choices=[s.name for s in SPEC_SHAPES])  # fmt: skip
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "a GPU is needed"
    bandwidth = copy_bandwidth("cuda", 20)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    by_name = {s.name: s for s in SPEC_SHAPES}
    rows = []
    for name in args.shapes:
        shape = by_name[name]
        f, w, b, labels, mask = make_inputs(shape, device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        _step(f, w, b, labels, mask)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        row = {"shape": name, "B": shape.B, "first_step_s": first_s}
        for kname in ("_scores_kernel", "_grad_features_kernel", "_grad_weight_kernel"):
            row[kname] = _tuning(getattr(kernels, kname))
        row.update(_gemm_times(shape, f.detach(), w.detach(), bandwidth))
        rows.append(row)
        print(f"\n### {name} B={shape.B}: first step {first_s:.2f} s (compiles + tuning)")
        for kname in ("_scores_kernel", "_grad_features_kernel", "_grad_weight_kernel"):
            t = row[kname]
            print(f"  {kname:22s} best {t['best']}")
            for cfg, ms in sorted(t["timings_ms"].items(), key=lambda kv: kv[1]):
                print(f"      {ms:8.4f} ms  {cfg}")
        print(f"  scores {row['scores_ms']:.4f} ms (floor {row['scores_floor_ms']:.4f}), backward "
              f"{row['backward_ms']:.4f} ms (floor {row['backward_floor_ms']:.4f}), cuBLAS W3 @ F "
              f"{row['cublas_w3_f_ms']:.4f} ms, dF {row['cublas_df_ms']:.4f}, dW per image "
              f"{row['cublas_dw_per_image_ms']:.4f}")  # fmt: skip
        del f, w, b
    print("\nshape                  first s  scores ms  floor  backward ms  floor  cuBLAS W3@F")
    for r in rows:
        print(f"{r['shape']:22s} {r['first_step_s']:7.2f} {r['scores_ms']:10.4f} {r['scores_floor_ms']:6.4f} "
              f"{r['backward_ms']:12.4f} {r['backward_floor_ms']:6.4f} {r['cublas_w3_f_ms']:11.4f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bandwidth": bandwidth, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
