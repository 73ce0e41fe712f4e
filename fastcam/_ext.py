"""Loading of the compiled extension ``fastcam._C`` (CPU and CUDA kernels).

Kernels never import this module; the functional API asks it whether the extension is
there and, if not, why.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load_extension():
    """``(module, None)`` when ``fastcam._C`` imports, else ``(None, reason)``."""
    try:
        module = importlib.import_module("fastcam._C")
    except ImportError as exc:
        return None, (
            f"the compiled extension fastcam._C is not available ({exc}); this version of "
            "fastcam ships no compiled C++/CUDA kernels yet, use backend='torch'"
        )
    return module, None
