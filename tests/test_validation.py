"""Bad input (SPEC §3) raises a clear ValueError/TypeError that names the argument.

Every case is checked on each public entry point it applies to: ``fastcam.cam_head``,
``fastcam.pairwise_overlap``, ``fastcam.attention_loss`` and ``fastcam.AttentionMapLoss``
(whose forward takes ``(features, head, labels, label_mask)``, head an ``nn.Linear``).
Each case asserts the error type and a regex naming the argument (and the shapes or
devices where they matter); the accepted inputs next to them are checked to work, so that
a check that rejects everything cannot pass either.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import fastcam
from helpers import make_head_inputs

B, C, K, H, W = 2, 3, 5, 3, 4
N = H * W

HEAD_ENTRIES = ("cam_head", "attention_loss", "AttentionMapLoss")
LOSS_ENTRIES = ("attention_loss", "AttentionMapLoss")


# ------------------------------------------------------------------------ inputs and calls


def default_inputs(layout: str = "nchw") -> dict:
    """Valid float64 inputs; a case replaces some of them."""
    features, weight, bias = make_head_inputs(layout, B, C, K, H, W)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    label_mask = torch.tensor([[True, True, False], [True, True, True]])
    return dict(features=features, weight=weight, bias=bias, labels=labels, label_mask=label_mask, options={})


def make_head(weight, bias) -> nn.Linear:
    """An ``nn.Linear`` holding exactly ``weight`` and ``bias`` (any shape, dtype, device)."""
    head = nn.Linear(1, 1, dtype=torch.float64)
    head.weight = nn.Parameter(weight, requires_grad=False)
    head.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return head


def call(entry: str, inp: dict):
    """Call ``entry`` with the inputs of ``inp``; for the module, building it is part of the call."""
    f, w, b, opts = inp["features"], inp["weight"], inp["bias"], inp["options"]
    if entry == "cam_head":
        return fastcam.cam_head(f, w, b, **opts)
    if entry == "attention_loss":
        return fastcam.attention_loss(f, w, b, inp["labels"], inp["label_mask"], **opts)
    if entry == "AttentionMapLoss":
        return fastcam.AttentionMapLoss(**opts)(f, make_head(w, b), inp["labels"], inp["label_mask"])
    raise AssertionError(entry)


def loss_of(entry: str, inp: dict) -> torch.Tensor:
    out = call(entry, inp)
    return out.loss if entry == "attention_loss" else out


def with_(**changes):
    """A case: replace entries of the inputs (a callable value gets the inputs) or options."""

    def apply(inp: dict) -> dict:
        inp = dict(inp, options=dict(inp["options"]))
        for key, value in changes.items():
            value = value(inp) if callable(value) else value
            if key in ("features", "weight", "bias", "labels", "label_mask"):
                inp[key] = value
            else:
                inp["options"][key] = value
        return inp

    return apply


def tokens(inp: dict) -> torch.Tensor:
    return inp["features"].flatten(2).transpose(1, 2).contiguous()  # [B, N, K]


NAN, INF = math.nan, math.inf


def test_default_inputs_are_accepted():
    """The inputs the cases start from are valid on every entry point (so each error is the case's)."""
    for layout in ("nchw", "channels_last", "tokens"):
        inp = default_inputs(layout)
        logits, cams = call("cam_head", inp)
        assert logits.shape == (B, C) and cams.shape[:2] == (B, C)
        for entry in LOSS_ENTRIES:
            assert torch.isfinite(loss_of(entry, inp))
        assert fastcam.pairwise_overlap(cams).shape == (B, C, C)


# ------------------------------------------------------------ features, weight, bias


HEAD_CASES = [
    # wrong ranks
    ("features-rank2", with_(features=lambda d: d["features"].flatten(1)), ValueError,
     r"features .*got shape \[2, 60\]"),
    ("features-rank5", with_(features=lambda d: d["features"][..., None]), ValueError,
     r"features .*got shape \[2, 5, 3, 4, 1\]"),
    ("features-rank1", with_(features=lambda d: d["features"].flatten()), ValueError,
     r"features .*got shape \[120\]"),
    ("weight-rank1", with_(weight=lambda d: d["weight"][0]), ValueError, r"weight .*got shape \[5\]"),
    ("weight-rank3", with_(weight=lambda d: d["weight"][None]), ValueError, r"weight .*got shape \[1, 3, 5\]"),
    # K mismatch between features and weight
    ("K-mismatch-nchw", with_(weight=lambda d: torch.ones(C, K + 1, dtype=torch.float64)), ValueError,
     r"(?s)weight.*K=6.*K=5.*\[2, 5, 3, 4\].*\[3, 6\]"),
    ("K-mismatch-tokens", with_(features=tokens, weight=lambda d: torch.ones(C, K - 1, dtype=torch.float64)),
     ValueError, r"(?s)weight.*K=4.*K=5.*\[2, 12, 5\].*\[3, 4\]"),
    ("weight-transposed-nchw", with_(weight=lambda d: d["weight"].t()), ValueError,
     r"(?s)weight.*\[2, 5, 3, 4\].*\[5, 3\]"),
    ("weight-transposed-tokens", with_(features=tokens, weight=lambda d: d["weight"].t()), ValueError,
     r"(?s)weight.*\[2, 12, 5\].*\[5, 3\]"),
    ("tokens-given-as-BKN", with_(features=lambda d: d["features"].flatten(2)), ValueError,
     r"(?s)weight.*K=5.*\[2, 5, 12\]"),
    # bias of the wrong shape (C mismatch with the weight)
    ("bias-C+1", with_(bias=lambda d: torch.zeros(C + 1, dtype=torch.float64)), ValueError,
     r"bias .*\[3\].*got shape \[4\]"),
    ("bias-C-1", with_(bias=lambda d: torch.zeros(C - 1, dtype=torch.float64)), ValueError,
     r"bias .*\[3\].*got shape \[2\]"),
    ("bias-2d", with_(bias=lambda d: d["bias"][None]), ValueError, r"bias .*got shape \[1, 3\]"),
    ("bias-scalar", with_(bias=lambda d: d["bias"][0]), ValueError, r"bias .*got shape \[\]"),
    # unsupported dtypes
    ("features-int", with_(features=lambda d: d["features"].long()), TypeError, r"features .*int64"),
    ("features-bool", with_(features=lambda d: d["features"] > 0), TypeError, r"features .*bool"),
    ("features-complex", with_(features=lambda d: d["features"].to(torch.complex128)), TypeError,
     r"features .*complex128"),
    ("weight-int", with_(weight=lambda d: d["weight"].int()), TypeError, r"weight .*int32"),
    ("weight-complex", with_(weight=lambda d: d["weight"].to(torch.complex64)), TypeError, r"weight .*complex64"),
    ("bias-int", with_(bias=lambda d: d["bias"].long()), TypeError, r"bias .*int64"),
    ("bias-complex", with_(bias=lambda d: d["bias"].to(torch.complex128)), TypeError, r"bias .*complex128"),
    # not a tensor
    ("features-list", with_(features=lambda d: d["features"].tolist()), TypeError, r"features .*Tensor.*list"),
    # no positions, no classes
    ("N=0-nchw", with_(features=lambda d: d["features"][:, :, :0]), ValueError,
     r"features .*N=0.*\[2, 5, 0, 4\]"),
    ("N=0-nchw-W", with_(features=lambda d: d["features"][..., :0]), ValueError,
     r"features .*N=0.*\[2, 5, 3, 0\]"),
    ("N=0-tokens", with_(features=lambda d: tokens(d)[:, :0]), ValueError, r"features .*N=0.*\[2, 0, 5\]"),
    ("C=0", with_(weight=lambda d: d["weight"][:0], bias=lambda d: d["bias"][:0]), ValueError,
     r"weight .*C=0.*\[0, 5\]"),
    ("C=0-no-bias", with_(weight=lambda d: d["weight"][:0], bias=None), ValueError, r"weight .*C=0.*\[0, 5\]"),
    # mixed devices (meta stands for a second device on a machine without a GPU)
    ("weight-on-meta", with_(weight=lambda d: d["weight"].to("meta")), ValueError,
     r"device.*features on cpu.*weight on meta"),
    ("bias-on-meta", with_(bias=lambda d: d["bias"].to("meta")), ValueError, r"device.*bias on meta"),
    ("features-on-meta", with_(features=lambda d: d["features"].to("meta")), ValueError,
     r"device.*features on meta.*weight on cpu"),
]


@pytest.mark.parametrize("entry", HEAD_ENTRIES)
@pytest.mark.parametrize("case, error, pattern", [c[1:] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES])
def test_bad_head_inputs(entry, case, error, pattern):
    with pytest.raises(error, match=pattern):
        call(entry, case(default_inputs()))


@pytest.mark.parametrize("entry", ("cam_head", "attention_loss"))
@pytest.mark.parametrize("value", [None, "weight", 3.0], ids=["None", "str", "float"])
def test_weight_not_a_tensor(entry, value):
    inp = with_(weight=value)(default_inputs())
    with pytest.raises(TypeError, match=r"weight .*Tensor"):
        call(entry, inp)


@pytest.mark.parametrize("entry", ("cam_head", "attention_loss"))
@pytest.mark.parametrize("value", ["bias", 1.0, [0.0, 0.0, 0.0]], ids=["str", "float", "list"])
def test_bias_not_a_tensor(entry, value):
    inp = with_(bias=value)(default_inputs())
    with pytest.raises(TypeError, match=r"bias .*Tensor"):
        call(entry, inp)


@pytest.mark.parametrize("entry", HEAD_ENTRIES)
def test_bias_none_is_accepted(entry):
    inp = with_(bias=None)(default_inputs())
    out = call(entry, inp)
    assert torch.isfinite(out[0] if entry == "cam_head" else loss_of(entry, inp)).all()


class _NoWeight(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "head",
    [_NoWeight(), nn.ReLU(), nn.Sequential(nn.Linear(K, C)), make_head(torch.zeros(C, K), None)],
    ids=["module-without-weight", "relu", "sequential", "weight-None"],
)
def test_attention_map_loss_head_without_weight(head):
    if isinstance(head, nn.Linear):
        head.weight = None
    inp = default_inputs()
    with pytest.raises(TypeError, match=r"head"):
        fastcam.AttentionMapLoss()(inp["features"], head, inp["labels"], inp["label_mask"])


def test_attention_map_loss_head_on_meta():
    inp = default_inputs()
    head = nn.Linear(K, C, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"device.*features on cpu.*weight on meta"):
        fastcam.AttentionMapLoss()(inp["features"], head, inp["labels"], inp["label_mask"])


def test_attention_map_loss_k_mismatch_linear():
    inp = default_inputs()
    head = nn.Linear(K + 2, C, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"(?s)weight.*K=7.*K=5"):
        fastcam.AttentionMapLoss()(inp["features"], head, inp["labels"], inp["label_mask"])


# ------------------------------------------------------------------------ labels, label_mask


LABEL_CASES = [
    ("labels-list", with_(labels=lambda d: d["labels"].tolist()), TypeError, r"labels .*Tensor.*list"),
    ("labels-float", with_(labels=1.0), TypeError, r"labels .*Tensor.*float"),
    ("labels-complex", with_(labels=lambda d: d["labels"].to(torch.complex128)), TypeError, r"labels .*complex"),
    ("labels-C+1", with_(labels=lambda d: torch.zeros(B, C + 1)), ValueError,
     r"labels .*\[2, 3\].*got shape \[2, 4\]"),
    ("labels-B+1", with_(labels=lambda d: torch.zeros(B + 1, C)), ValueError,
     r"labels .*\[2, 3\].*got shape \[3, 3\]"),
    ("labels-transposed", with_(labels=lambda d: d["labels"].t()), ValueError,
     r"labels .*\[2, 3\].*got shape \[3, 2\]"),
    ("labels-flat", with_(labels=lambda d: d["labels"].flatten()), ValueError,
     r"labels .*\[2, 3\].*got shape \[6\]"),
    ("labels-3d", with_(labels=lambda d: d["labels"][..., None]), ValueError,
     r"labels .*\[2, 3\].*got shape \[2, 3, 1\]"),
    ("label_mask-float", with_(label_mask=lambda d: d["label_mask"].double()), TypeError,
     r"label_mask .*float64"),
    ("label_mask-uint8", with_(label_mask=lambda d: d["label_mask"].to(torch.uint8)), TypeError,
     r"label_mask .*uint8"),
    ("label_mask-list", with_(label_mask=lambda d: d["label_mask"].tolist()), TypeError,
     r"label_mask .*Tensor.*list"),
    ("label_mask-transposed", with_(label_mask=lambda d: d["label_mask"].t()), ValueError,
     r"label_mask .*\[2, 3\].*got shape \[3, 2\]"),
    ("label_mask-C+1", with_(label_mask=lambda d: torch.ones(B, C + 1, dtype=torch.bool)), ValueError,
     r"label_mask .*\[2, 3\].*got shape \[2, 4\]"),
    ("label_mask-without-labels", with_(labels=None), ValueError, r"label_mask .*without labels"),
    ("labels-on-meta", with_(labels=lambda d: d["labels"].to("meta"), label_mask=None), ValueError,
     r"device.*features on cpu.*labels on meta"),
    ("label_mask-on-meta", with_(label_mask=lambda d: d["label_mask"].to("meta")), ValueError,
     r"device.*label_mask on meta"),
    ("labels-int-2", with_(labels=lambda d: torch.full((B, C), 2), label_mask=None), ValueError,
     r"labels .*\[0, 1\]"),
    ("labels-C-mismatch-linear", with_(labels=lambda d: torch.zeros(B, C + 2), label_mask=None), ValueError,
     r"labels .*got shape \[2, 5\]"),
]


@pytest.mark.parametrize("entry", LOSS_ENTRIES)
@pytest.mark.parametrize("case, error, pattern", [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_bad_labels(entry, case, error, pattern):
    with pytest.raises(error, match=pattern):
        call(entry, case(default_inputs()))


@pytest.mark.parametrize("entry", LOSS_ENTRIES)
@pytest.mark.parametrize("mask", ["given", "None"])
@pytest.mark.parametrize("bad", [2.0, -1.0, NAN, INF, -INF, 1.0000001, -1e-9], ids=str)
def test_known_label_outside_unit_interval(entry, mask, bad):
    inp = default_inputs()
    labels = inp["labels"].clone()
    labels[1, 2] = bad  # known in the default mask
    inp = with_(labels=labels, label_mask=None if mask == "None" else inp["label_mask"])(inp)
    pattern = r"labels .*\[0, 1\].*labels\[1, 2\] = " + re.escape(str(bad))
    with pytest.raises(ValueError, match=pattern):
        call(entry, inp)


@pytest.mark.parametrize("entry", LOSS_ENTRIES)
@pytest.mark.parametrize("bad", [2.0, -1.0, NAN, INF, -INF, 1e30], ids=str)
def test_unknown_label_values_are_ignored(entry, bad):
    """Where label_mask is False any value is accepted and never read."""
    inp = default_inputs()  # labels[0, 2] is unknown
    reference = loss_of(entry, inp)
    labels = inp["labels"].clone()
    labels[0, 2] = bad
    got = loss_of(entry, with_(labels=labels)(inp))
    assert torch.isfinite(got)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("entry", LOSS_ENTRIES)
def test_valid_label_kinds_are_accepted(entry):
    inp = default_inputs()
    for labels in (inp["labels"] > 0.5, (inp["labels"] > 0.5).long(), inp["labels"].float(),
                   torch.tensor([[0.0, 1.0, 0.25], [1.0, 0.0, 1.0]], dtype=torch.float64)):
        for mask in (None, inp["label_mask"]):
            assert torch.isfinite(loss_of(entry, with_(labels=labels, label_mask=mask)(inp)))


# ------------------------------------------------------------------------------- options


OPTION_CASES = [
    # (id, entries, case, error, pattern)
    ("normalize-unknown", HEAD_ENTRIES, with_(normalize="L1"), ValueError, r"normalize .*'L1'"),
    ("normalize-case", HEAD_ENTRIES, with_(normalize="L2"), ValueError, r"normalize .*'L2'"),
    ("normalize-None", HEAD_ENTRIES, with_(normalize=None), ValueError, r"normalize .*None"),
    ("backend-unknown", HEAD_ENTRIES, with_(backend="gpu"), ValueError, r"backend .*'gpu'"),
    ("backend-case", HEAD_ENTRIES, with_(backend="CPU"), ValueError, r"backend .*'CPU'"),
    ("backend-None", HEAD_ENTRIES, with_(backend=None), ValueError, r"backend .*None"),
    ("temperature-0", HEAD_ENTRIES, with_(temperature=0.0), ValueError, r"temperature .*> 0"),
    ("temperature-negative", HEAD_ENTRIES, with_(temperature=-1.0), ValueError, r"temperature"),
    ("temperature-nan", HEAD_ENTRIES, with_(temperature=NAN), ValueError, r"temperature"),
    ("temperature-inf", HEAD_ENTRIES, with_(temperature=INF), ValueError, r"temperature"),
    ("temperature-str", HEAD_ENTRIES, with_(temperature="1"), TypeError, r"temperature"),
    ("eps-negative", HEAD_ENTRIES, with_(eps=-1e-6), ValueError, r"eps .*> 0"),
    ("eps-zero", HEAD_ENTRIES, with_(eps=0.0), ValueError, r"eps .*> 0"),
    ("eps-nan", HEAD_ENTRIES, with_(eps=NAN), ValueError, r"eps"),
    ("measure-unknown", LOSS_ENTRIES, with_(measure="iou"), ValueError, r"measure .*'iou'"),
    ("measure-None", LOSS_ENTRIES, with_(measure=None), ValueError, r"measure .*None"),
    ("unlabeled-unknown", LOSS_ENTRIES, with_(unlabeled="zeros"), ValueError, r"unlabeled .*'zeros'"),
    ("unlabeled-bool", LOSS_ENTRIES, with_(unlabeled=True), ValueError, r"unlabeled .*True"),
    ("lambda_distinct-negative", LOSS_ENTRIES, with_(lambda_distinct=-1.0), ValueError, r"lambda_distinct .*>= 0"),
    ("lambda_distinct-nan", LOSS_ENTRIES, with_(lambda_distinct=NAN), ValueError, r"lambda_distinct"),
    ("lambda_consist-negative", LOSS_ENTRIES, with_(lambda_consist=-0.5), ValueError, r"lambda_consist"),
    ("lambda_consist-nan", LOSS_ENTRIES, with_(lambda_consist=NAN), ValueError, r"lambda_consist"),
    ("lambda_coherence-negative", LOSS_ENTRIES, with_(lambda_coherence=-1e-3), ValueError, r"lambda_coherence"),
    ("lambda_coherence-nan", LOSS_ENTRIES, with_(lambda_coherence=NAN), ValueError, r"lambda_coherence"),
    ("lambda_coherence-inf", LOSS_ENTRIES, with_(lambda_coherence=INF), ValueError, r"lambda_coherence"),
    ("lambda_distinct-str", LOSS_ENTRIES, with_(lambda_distinct="1"), TypeError, r"lambda_distinct"),
    ("lambda_consist-bool", LOSS_ENTRIES, with_(lambda_consist=True), TypeError, r"lambda_consist"),
    ("classification-int", LOSS_ENTRIES, with_(classification=1), TypeError, r"classification"),
    ("classification-str", LOSS_ENTRIES, with_(classification="yes"), TypeError, r"classification"),
    ("classification-None", LOSS_ENTRIES, with_(classification=None), TypeError, r"classification"),
    ("gather-int", LOSS_ENTRIES, with_(gather=0), TypeError, r"gather"),
    ("gather-tensor", LOSS_ENTRIES, with_(gather=torch.tensor(True)), TypeError, r"gather"),
    # grid
    ("grid-nchw-mismatch", LOSS_ENTRIES, with_(grid=(W, H)), ValueError, r"grid.*\(4, 3\).*\(3, 4\)"),
    ("grid-nchw-mismatch-no-coherence", LOSS_ENTRIES, with_(grid=(2, 6), lambda_coherence=0.0), ValueError,
     r"grid.*\(2, 6\).*\(3, 4\)"),
    ("grid-nchw-three", LOSS_ENTRIES, with_(grid=(H, W, 1)), ValueError, r"grid"),
    ("grid-nchw-int", LOSS_ENTRIES, with_(grid=N), (ValueError, TypeError), r"grid"),
    ("grid-tokens-HW!=N", LOSS_ENTRIES, with_(features=tokens, grid=(3, 3), lambda_coherence=1.0), ValueError,
     r"grid.*\(3, 3\).*9.*N=12"),
    ("grid-tokens-HW!=N-no-coherence", LOSS_ENTRIES, with_(features=tokens, grid=(2, 5)), ValueError,
     r"grid.*\(2, 5\).*10.*N=12"),
    ("grid-tokens-missing", LOSS_ENTRIES, with_(features=tokens, lambda_coherence=1.0), ValueError,
     r"grid=\(H, W\)"),
    ("grid-tokens-int", LOSS_ENTRIES, with_(features=tokens, grid=N, lambda_coherence=1.0), ValueError, r"grid"),
    ("grid-tokens-float", LOSS_ENTRIES, with_(features=tokens, grid=(3, 4.0), lambda_coherence=1.0), ValueError,
     r"grid"),
    ("grid-tokens-zero", LOSS_ENTRIES, with_(features=tokens, grid=(0, 12), lambda_coherence=1.0), ValueError,
     r"grid"),
    ("grid-tokens-negative", LOSS_ENTRIES, with_(features=tokens, grid=(-3, -4), lambda_coherence=1.0), ValueError,
     r"grid"),
]


@pytest.mark.parametrize(
    "entry, case, error, pattern",
    [(e, *c[2:]) for c in OPTION_CASES for e in c[1]],
    ids=[f"{c[0]}-{e}" for c in OPTION_CASES for e in c[1]],
)
def test_bad_options(entry, case, error, pattern):
    with pytest.raises(error, match=pattern):
        call(entry, case(default_inputs()))


@pytest.mark.parametrize("entry", LOSS_ENTRIES)
def test_good_options_are_accepted(entry):
    """The accepted neighbours of the bad options above."""
    inp = default_inputs()
    for case in (with_(grid=(H, W), lambda_coherence=1.0), with_(grid=[H, W], lambda_coherence=1.0),
                 with_(features=tokens, grid=(H, W), lambda_coherence=1.0), with_(features=tokens),
                 with_(eps=1e-3, lambda_distinct=0, lambda_consist=2, temperature=3, normalize="softmax"),
                 with_(classification=False, gather=True, unlabeled="ignore", measure="dice")):
        assert torch.isfinite(loss_of(entry, case(inp)))


# ------------------------------------------------------------------------ pairwise_overlap


def _cams() -> torch.Tensor:
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


OVERLAP_CASES = [
    ("cams-list", lambda: (_cams().tolist(), {}), TypeError, r"cams .*Tensor.*list"),
    ("cams-None", lambda: (None, {}), TypeError, r"cams .*Tensor"),
    ("cams-int", lambda: ((_cams() * 10).long(), {}), TypeError, r"cams .*int64"),
    ("cams-bool", lambda: (_cams() > 0.5, {}), TypeError, r"cams .*bool"),
    ("cams-complex", lambda: (_cams().to(torch.complex128), {}), TypeError, r"cams .*complex128"),
    ("cams-rank2", lambda: (_cams()[0, 0], {}), ValueError, r"cams .*got shape \[3, 4\]"),
    ("cams-rank1", lambda: (_cams().flatten(), {}), ValueError, r"cams .*got shape \[72\]"),
    ("cams-rank5", lambda: (_cams()[..., None], {}), ValueError, r"cams .*got shape \[2, 3, 3, 4, 1\]"),
    ("cams-N=0", lambda: (_cams().flatten(2)[..., :0], {}), ValueError, r"cams .*N=0.*\[2, 3, 0\]"),
    ("cams-N=0-4d", lambda: (_cams()[:, :, :0], {}), ValueError, r"cams .*N=0.*\[2, 3, 0, 4\]"),
    ("measure-unknown", lambda: (_cams(), {"measure": "jaccard"}), ValueError, r"measure .*'jaccard'"),
    ("measure-None", lambda: (_cams(), {"measure": None}), ValueError, r"measure .*None"),
    ("eps-negative", lambda: (_cams(), {"eps": -1.0}), ValueError, r"eps"),
    ("eps-zero", lambda: (_cams(), {"eps": 0.0}), ValueError, r"eps .*> 0"),
    ("eps-nan", lambda: (_cams(), {"eps": NAN}), ValueError, r"eps"),
    ("eps-str", lambda: (_cams(), {"eps": "1e-6"}), TypeError, r"eps"),
    ("backend-unknown", lambda: (_cams(), {"backend": "gpu"}), ValueError, r"backend .*'gpu'"),
]


@pytest.mark.parametrize("make, error, pattern", [c[1:] for c in OVERLAP_CASES], ids=[c[0] for c in OVERLAP_CASES])
def test_bad_pairwise_overlap_inputs(make, error, pattern):
    cams, options = make()
    with pytest.raises(error, match=pattern):
        fastcam.pairwise_overlap(cams, **options)


def test_pairwise_overlap_accepts_both_layouts():
    cams = _cams()
    torch.testing.assert_close(fastcam.pairwise_overlap(cams), fastcam.pairwise_overlap(cams.flatten(2)))


# --------------------------------------------------------------------- unusable backends


UNUSABLE = [name for name in ("cpu", "cuda", "triton") if not fastcam.backends()[name].usable]


@pytest.mark.parametrize("entry", (*HEAD_ENTRIES, "pairwise_overlap"))
@pytest.mark.parametrize("name", UNUSABLE)
def test_unusable_backend_says_why(entry, name):
    reason = fastcam.backends()[name].reason
    assert reason.strip(), f"backend {name!r} is not usable but gives no reason"
    inp = with_(backend=name)(default_inputs())
    with pytest.raises(RuntimeError, match=re.escape(reason)) as info:
        if entry == "pairwise_overlap":
            fastcam.pairwise_overlap(_cams(), backend=name)
        else:
            call(entry, inp)
    assert name in str(info.value)
