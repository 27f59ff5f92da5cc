"""The benchmark's PyTorch peer, seen from the benchmark: which modes have one, and the
timing of a peer mode on the benchmark's models, batch and options (`mokd_jax.torch_peer`,
imported only when a torch framework is asked for)."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from mokd_jax import measurement, normalization
from mokd_jax.benchmark_ours import synthetic_batch
from mokd_jax.benchmark_report import log
from mokd_jax.errors import InputError

PEER_MODES = ("kd_1bwd", "mokd")
"""The modes with a PyTorch peer (`torch_peer.PEER_STEPS`, kept equal by a test): the
package must import without torch, so the list is not read from there."""


def import_torch_peer():
    """`mokd_jax.torch_peer`, or a one-line InputError when torch is not installed."""
    try:
        from mokd_jax import torch_peer
    except ModuleNotFoundError as error:
        raise InputError(
            f"--framework needs torch ({error}): pip install .[torch], or --framework=jax"
        ) from None
    return torch_peer


def peer_timer(
    base: ml_collections.ConfigDict, image_size: int, steps: int, overrides: Mapping[str, Any]
) -> tuple[Callable[[str], dict[str, Any]], dict[str, Any]]:
    """(a function timing one peer mode on fresh models and the benchmark's batch, the
    JSON `peer` section that its rows go into). The models are checked here, before any
    of our modes runs, so that a pair without a peer is refused at once."""
    torch_peer = import_torch_peer()
    torch_peer.check_architectures(base.teacher.model, base.student.model)
    options = torch_peer.options_with(overrides)
    images, labels = synthetic_batch(base.batch_size, image_size, base.num_classes, base.seed)
    inputs = normalization.for_dataset(base.dataset)

    def time_mode(mode: str) -> dict[str, Any]:
        log(f"[peer {mode}] building and timing {steps} steps")
        teacher, student = torch_peer.peer_models(
            base.teacher.model, base.student.model, base.num_classes, base.seed, image_size
        )
        setup = torch_peer.build_setup(
            teacher,
            student,
            images,
            labels,
            inputs,
            options,
            base.student.learning_rate,
            base.student.weight_decay,
        )
        row = torch_peer.time_mode(
            mode,
            setup,
            base.distill,
            base.aggregation.mokd.max_norm,
            steps,
            measurement.WARMUP_STEPS,
        )
        log(f"[peer {mode}] {row['step_time_s']:.4f} s/step")
        return row

    section = {
        "torch": torch_peer.torch.__version__,
        "options": dataclasses.asdict(options),
        "modes": {},
    }
    return time_mode, section
