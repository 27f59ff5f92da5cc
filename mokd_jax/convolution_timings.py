"""Times each convolution of a ResNet-18 in JAX (XLA:CPU or the default backend, NHWC) and
in PyTorch (NCHW, the PyTorch peer's layout), forward and forward + backward (the input's
and the kernel's gradients), on the same shapes and data:

    python -m mokd_jax.convolution_timings --image_size=112 --batch_size=16 --json=convs.json

It answers the question the step benchmark (`mokd-benchmark --framework=both`) cannot: is
a gap between the frameworks in the convolutions themselves or around them. Each shape
is timed alone (jitted; median of `--repeats` calls after two warm-ups), and the totals
weigh each shape by how often the ResNet-18 has it. PyTorch uses as many threads as the
process may run on (`taskset -c 0` gives both frameworks one core). Needs torch
(`pip install .[torch]`).
"""

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from mokd_jax import cli

FLAGS = flags.FLAGS


RESNET18_CONVOLUTIONS = (
    # name, input and output channels, kernel, stride, input side as a divisor of the
    # image side, how many the network has
    ("stem_7x7_s2", 3, 64, 7, 2, 1, 1),
    ("layer1_3x3", 64, 64, 3, 1, 4, 4),
    ("layer2_3x3_s2", 64, 128, 3, 2, 4, 1),
    ("layer2_3x3", 128, 128, 3, 1, 8, 3),
    ("layer2_1x1_s2", 64, 128, 1, 2, 4, 1),
    ("layer3_3x3_s2", 128, 256, 3, 2, 8, 1),
    ("layer3_3x3", 256, 256, 3, 1, 16, 3),
    ("layer3_1x1_s2", 128, 256, 1, 2, 8, 1),
    ("layer4_3x3_s2", 256, 512, 3, 2, 16, 1),
    ("layer4_3x3", 512, 512, 3, 1, 32, 3),
    ("layer4_1x1_s2", 256, 512, 1, 2, 16, 1),
)


def resnet18_convolutions(image_size: int) -> list[dict[str, int | str]]:
    """Each distinct convolution of a ResNet-18 on `image_size` images: its name, input and
    output channels, kernel, stride, input side and how many the network has."""
    keys = ("name", "in_channels", "out_channels", "kernel", "stride", "side", "count")
    return [
        dict(zip(keys, (*fields[:5], image_size // fields[5], fields[6]), strict=True))
        for fields in RESNET18_CONVOLUTIONS
    ]


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `call()` (which waits for its result) after two warm-ups."""
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_shape(shape: dict[str, Any], batch_size: int, repeats: int) -> dict[str, Any]:
    """The shape's forward and forward + backward times in milliseconds, ours and torch's."""
    import jax
    import numpy as np
    import torch

    kernel, stride, pad = shape["kernel"], shape["stride"], shape["kernel"] // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, shape["side"], shape["side"], shape["in_channels"]))
    w = 0.05 * rng.standard_normal((kernel, kernel, shape["in_channels"], shape["out_channels"]))
    x, w = x.astype(np.float32), w.astype(np.float32)

    def convolution(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    forward = jax.jit(convolution)
    cotangent = np.ones(forward(x, w).shape, np.float32)
    both = jax.jit(lambda x, w, g: jax.vjp(convolution, x, w)[1](g))
    x_torch = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    w_torch = torch.tensor(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
    g_torch = torch.tensor(cotangent).permute(0, 3, 1, 2).contiguous()

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(x_torch, w_torch, stride=stride, padding=pad)

    def torch_both():
        out = torch.nn.functional.conv2d(x_torch, w_torch, stride=stride, padding=pad)
        torch.autograd.grad(out, (x_torch, w_torch), g_torch)

    milliseconds = {
        "jax_forward_ms": median_seconds(lambda: forward(x, w).block_until_ready(), repeats),
        "torch_forward_ms": median_seconds(torch_forward, repeats),
        "jax_forward_backward_ms": median_seconds(
            lambda: jax.block_until_ready(both(x, w, cotangent)), repeats
        ),
        "torch_forward_backward_ms": median_seconds(torch_both, repeats),
    }
    return {**shape, **{key: 1e3 * value for key, value in milliseconds.items()}}


TIMES = (
    "jax_forward_ms",
    "torch_forward_ms",
    "jax_forward_backward_ms",
    "torch_forward_backward_ms",
)


def network_totals(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each time summed over the network's convolutions (each shape times its count)."""
    return {key: sum(row[key] * row["count"] for row in rows) for key in TIMES}


def measure(image_size: int, batch_size: int, repeats: int) -> dict[str, Any]:
    import jax
    import torch

    # The cores the process may run on (`taskset`), where the platform says.
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(len(cores) if cores else os.cpu_count() or 1)
    rows = []
    for shape in resnet18_convolutions(image_size):
        row = time_shape(shape, batch_size, repeats)
        rows.append(row)
        print(
            f"{row['name']:14s} x{row['count']}  forward: ours {row['jax_forward_ms']:8.2f} ms,"
            f" torch {row['torch_forward_ms']:8.2f} ms;  forward + backward: ours"
            f" {row['jax_forward_backward_ms']:8.2f} ms, torch"
            f" {row['torch_forward_backward_ms']:8.2f} ms",
            flush=True,
        )
    return {
        "image_size": image_size,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "devices": [str(device) for device in jax.devices()],
        "rows": rows,
        "totals_ms": network_totals(rows),
    }


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_integer("image_size", 112, "Square image side.", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 16, "Images per call.", flag_values=flag_values)
    flags.DEFINE_integer("repeats", 15, "Timed calls per measurement.", flag_values=flag_values)
    flags.DEFINE_string("json", "", "Where to write the results as JSON.", flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
    del argv
    results = measure(FLAGS.image_size, FLAGS.batch_size, FLAGS.repeats)
    print(
        "totals over the ResNet-18 (ms):", {k: round(v, 1) for k, v in results["totals_ms"].items()}
    )
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
