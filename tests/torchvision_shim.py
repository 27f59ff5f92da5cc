"""The real torchvision, imported beside the pinned CPU-only torch, for reference tests.

The torchvision wheel on PyPI that matches torch 2.13 ships its C++ operators built against
CUDA torch, so its extension library does not load here and `import torchvision` fails
while registering fake kernels for those operators. Its Python code (the detection models,
anchor generator, box coder, matcher, losses and transforms) needs none of them except
`torchvision::nms` in post-processing. `import_torchvision()` therefore skips the fake-kernel
registrations, declares `torchvision::nms` with a plain greedy implementation on the CPU
(the textbook algorithm: visit boxes by descending score, keep one unless its IoU with an
already kept box exceeds the threshold), and marks the operators as present.

Every test that compares against torchvision's detection code goes through here, after
`pytest.importorskip("torch")`.
"""

import sys
import types

import torch

_NMS_SCHEMA = "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIBRARY: list = []  # keeps the operator library alive for the process


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes ([x1, y1, x2, y2]), by descending score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.argsort(scores, descending=True, stable=True)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        width = (torch.minimum(x2, x2[index]) - torch.maximum(x1, x1[index])).clamp(min=0)
        height = (torch.minimum(y2, y2[index]) - torch.maximum(y1, y1[index])).clamp(min=0)
        intersection = width * height
        iou = intersection / (areas + areas[index] - intersection)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def import_torchvision() -> types.ModuleType:
    """`torchvision`, importable and with a working `torchvision.ops.nms` on the CPU."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    # The fake (meta) kernels are registered at import for operators whose library did not
    # load; nothing here traces torchvision's operators, so the module is left empty.
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    library = torch.library.Library("torchvision", "DEF")
    library.define(_NMS_SCHEMA)
    library.impl("nms", greedy_nms, "CPU")
    _LIBRARY.append(library)
    import torchvision
    import torchvision.extension

    # `_has_ops` answered False when the extension library failed to load; the operators'
    # callers look it up at each call, so replacing it here reaches them.
    torchvision.extension._has_ops = lambda: True
    return torchvision
