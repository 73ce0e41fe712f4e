"""Shared fixtures: every test that takes ``backend`` and ``device`` runs once per usable
backend and device, so a backend added to fastcam is tested by the whole suite.

``FASTCAM_TEST_BACKENDS=cpu,torch`` restricts the run to those backends;
``FASTCAM_REQUIRE_BACKENDS=torch,cpu`` fails the run when one of those is not usable
(CI sets it, so that an extension that did not build cannot pass as "not usable here").
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels on CPU tensors (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastcam  # noqa: E402


def _selected_backends() -> list[tuple[str, str]]:
    only = {b for b in os.environ.get("FASTCAM_TEST_BACKENDS", "").split(",") if b}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for name, info in fastcam.backends().items():
        if not info.usable or (only and name not in only):
            continue
        # Under the Triton interpreter the whole suite would take hours: tests/test_triton.py
        # runs the Triton backend on CPU tensors; FASTCAM_TEST_BACKENDS=triton runs everything.
        pairs += [(name, device) for device in devices if device in info.device_types
                  and not (name == "triton" and device == "cpu" and "triton" not in only)]
    return pairs


def _check_required_backends() -> None:
    infos = fastcam.backends()
    for name in filter(None, os.environ.get("FASTCAM_REQUIRE_BACKENDS", "").split(",")):
        if not infos[name].usable:
            raise pytest.UsageError(
                f"FASTCAM_REQUIRE_BACKENDS names {name!r}, which is not usable: {infos[name].reason}"
            )


_check_required_backends()
BACKEND_DEVICES = _selected_backends()


@pytest.fixture(params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def backend_device(request) -> tuple[str, str]:
    """``(backend, device)`` for each usable backend and each device it runs on."""
    return request.param


@pytest.fixture
def backend(backend_device) -> str:
    return backend_device[0]


@pytest.fixture
def device(backend_device) -> str:
    return backend_device[1]
