"""``fastcam bench`` (SPEC §5 table) and its hand-written Grad-CAM baseline."""

import json

import pytest
import torch

import fastcam
import fastcam.cli
from fastcam.workloads import Shape, gradcam_attention_loss, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # fastcam bench runs on the device present


@pytest.mark.parametrize("tokens", [False, True])
def test_gradcam_baseline_computes_the_reference_loss_and_gradients(tokens):
    # Grad-CAM of a pooled linear head is the CAM times 1/N: after the l2 normalization the
    # loss, and so its gradients, are the reference's (up to eps). Labeled and unlabeled rows.
    shape = Shape("small", 4, 5, 6, 3, 4, tokens=tokens)
    f, w, b, labels, mask = make_inputs(shape, dtype=torch.float64)
    w.data = w.data.double()
    b.data = torch.randn(5, dtype=torch.float64)
    labels[0, :3] = 1.0  # a labeled image with a weighted pair
    got = gradcam_attention_loss(f, w, b, labels, mask, eps=1e-12)
    want = fastcam.attention_loss(f, w, b, labels, mask, backend="torch", eps=1e-12).loss
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for g, r in zip(torch.autograd.grad(got, (f, w, b)), torch.autograd.grad(want, (f, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


def test_gradcam_baseline_needs_one_gradient_graph_per_class():
    # The point of the baseline: create_graph=True per class. Its graph holds C gradient nodes.
    f, w, b, labels, mask = make_inputs(Shape("small", 2, 4, 6, 3, 3), dtype=torch.float32)
    calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(kwargs.get("create_graph"))
        return original(*args, **kwargs)

    torch.autograd.grad = counting_grad
    try:
        gradcam_attention_loss(f, w, b, labels, mask)
    finally:
        torch.autograd.grad = original
    assert calls == [True] * 4


def _bench(args, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert fastcam.cli.main(["bench", *args, "--json", str(path)]) == 0
    return capsys.readouterr().out, json.loads(path.read_text())


def test_bench_prints_the_table_and_writes_json(capsys, tmp_path):
    printed, record = _bench(["--shapes", "tiny", "resnet50@224", "--batch", "2", "--skip", "compile",
                              "reduce-overhead", "--reps", "3"], capsys, tmp_path)  # fmt: skip
    assert "copy bandwidth" in printed and "x compile" in printed and "% floor" in printed
    assert record["device"] == DEVICE and record["copy_bandwidth_bytes_per_s"] > 0
    assert [r["shape"] for r in record["rows"]] == ["tiny", "resnet50@224"]
    usable = [n for n, i in fastcam.backends().items() if i.usable and DEVICE in i.device_types and n != "torch"]
    for row in record["rows"]:
        assert row["B"] == 2 and not row["errors"], row["errors"]
        assert set(row["ms"]) == {"eager", "gradcam", *usable}
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["bytes_F"] == row["B"] * row["K"] * row["N"] * 2  # bf16
        assert row["floor_ms"] == pytest.approx(3 * row["bytes_F"] / record["copy_bandwidth_bytes_per_s"] * 1e3)
        if usable:
            best = row["best_backend"]
            assert row["best_ms"] == min(row["ms"][n] for n in usable) == row["ms"][best]
            assert row["speedup_vs_eager"] == pytest.approx(row["ms"]["eager"] / row["best_ms"])
            assert row["speedup_vs_gradcam"] == pytest.approx(row["ms"]["gradcam"] / row["best_ms"])
            assert row["speedup_vs_best_compile"] is None  # skipped
            assert f"{row['shape']}" in printed


def test_bench_times_torch_compile_of_the_reference(capsys, tmp_path):
    args = ["--shapes", "tiny", "--skip", "gradcam", "--reps", "2"]
    compiled = "cpu" if DEVICE == "cpu" else "cuda"
    if fastcam.backends()[compiled].usable:
        args += ["--backends", compiled]
    _, record = _bench(args, capsys, tmp_path)
    row = record["rows"][0]
    assert "compile" in row["ms"] and not row["errors"], row["errors"]
    assert ("reduce-overhead" in row["ms"]) == (DEVICE == "cuda")  # CUDA graphs: GPU only
    if fastcam.backends()[compiled].usable:
        best_compile = min(row["ms"][m] for m in ("compile", "reduce-overhead") if m in row["ms"])
        assert row["speedup_vs_best_compile"] == pytest.approx(best_compile / row["ms"][compiled])


@pytest.mark.parametrize("args, message", [
    (["--backends", "nope"], "--backends nope"),
    (["--backends", "torch"], "--backends torch"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--batch", "0"], "--batch sizes must be at least 1"),
])  # fmt: skip
def test_bench_rejects_bad_options_by_name(args, message):
    with pytest.raises(SystemExit, match=message):
        fastcam.cli.main(["bench", "--shapes", "tiny", *args])


def test_resnet50_is_torchvisions():
    # The same architecture as torchvision's resnet50 (which the GPU images lack): every
    # parameter's name and shape, and the same function given torchvision's weights.
    torchvision = pytest.importorskip("torchvision")
    from fastcam.workloads import ResNet50

    ours, theirs = ResNet50(num_classes=14).eval(), torchvision.models.resnet50(num_classes=14).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_e2e_steps_train_resnet50_with_each_loss():
    # One step of each contender from the same start: fastcam's cpu backend gives the eager
    # reference's gradients (the head's and, through bf16 autocast, the body's); Grad-CAM's are
    # close (the same loss by another graph); the plain step's differ (no attention loss).
    from fastcam.workloads import resnet50_steps

    backend = "cpu" if fastcam.backends()["cpu"].usable else "torch"
    grads = {}
    for name in ("plain", "torch", backend, "gradcam"):
        model, steps = resnet50_steps(2, 64, device="cpu", backends=("torch", backend), seed=3)
        steps[name]()
        grads[name] = (model.fc.weight.grad.clone(), model.layer4[-1].conv3.weight.grad.clone())
    def rel(name, i):  # largest difference from the reference's gradient, relative to its largest value
        return float((grads[name][i] - grads["torch"][i]).abs().max() / grads["torch"][i].abs().max())

    for i in range(2):
        assert rel(backend, i) < 1e-3
        assert rel("gradcam", i) < 3e-2  # its maps come from bf16 gradients of the features
        assert rel("plain", i) > 0.1


def test_bench_e2e_prints_the_steps_and_writes_json(capsys, tmp_path):
    backends = ["cpu"] if fastcam.backends()["cpu"].usable else []
    printed, record = _bench(["--e2e", "--e2e-configs", "2x32", "--reps", "1", *(["--backends", *backends]
                                                                                  if backends else [])],
                             capsys, tmp_path)  # fmt: skip
    assert "whole ResNet-50 training steps" in printed and "2 x 32" in printed
    (row,) = record["e2e"]
    assert (row["batch"], row["side"]) == (2, 32) and not row["errors"], row["errors"]
    assert set(row["ms"]) == {"plain", "torch", "gradcam", *backends} and all(v > 0 for v in row["ms"].values())
    for name, percent in row["overhead_percent"].items():
        assert percent == pytest.approx(100 * (row["ms"][name] / row["ms"]["plain"] - 1))


@pytest.mark.parametrize("args, message", [
    (["--e2e", "--e2e-configs", "16"], "BATCHxSIDE"),
    (["--e2e", "--e2e-configs", "0x224"], "at least 1"),
    (["--e2e", "--e2e-configs", "2x16"], "side at least 32"),
    (["--e2e-configs", "2x64"], "needs --e2e"),
    (["--e2e", "--shapes", "tiny"], "--e2e takes --e2e-configs"),
])  # fmt: skip
def test_bench_e2e_rejects_bad_options(args, message):
    with pytest.raises(SystemExit, match=message):
        fastcam.cli.main(["bench", *args])
