"""Shared fixtures: tiny models and images built in the test, nothing downloaded."""

import contextlib
import importlib.util
import sys
import types

import pytest
import torch


def _import_cpu_torchvision() -> None:
    """Make a CUDA build of torchvision importable beside a CPU-only torch, for the LPIPS parity test.

    PyPI's torchvision wheels are CUDA builds: beside a CPU-only torch their operators do not load,
    and the import fails where ``torchvision._meta_registrations`` registers fake kernels for them
    ("operator torchvision::nms does not exist"). Those serve torch.compile's detection ops only,
    which LPIPS (VGG16 convolutions) never calls: the module is replaced by an empty one. This runs
    before anything imports diffusers or transformers, which import torchvision when it is present.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401


_import_cpu_torchvision()

from first_stage.alignment import save_standin_dinov2  # noqa: E402
from first_stage.config import ModelConfig  # noqa: E402
from first_stage.model import new_autoencoder  # noqa: E402
from first_stage.perceptual import LPIPS, VGG16_FILENAME  # noqa: E402


def standin_vgg16_state() -> dict[str, torch.Tensor]:
    """Random VGG16 weights under torchvision's keys, scaled like a trained net (He init)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, value in LPIPS().state_dict().items():
        if not key.startswith("features."):
            continue
        if key.endswith("weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.01
    # The real file also holds the classifier, which LPIPS must ignore (tiny shapes here).
    state["classifier.0.weight"] = torch.zeros(4, 4)
    state["classifier.0.bias"] = torch.zeros(4)
    return state


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory):
    """A stand-in for torchvision's vgg16-397923af.pth (random weights, the real keys)."""
    path = tmp_path_factory.mktemp("weights") / VGG16_FILENAME
    torch.save(standin_vgg16_state(), path)
    return path


@pytest.fixture
def accelerator():
    """A one-process CPU Accelerator, its global state reset afterwards."""
    from accelerate import Accelerator

    yield Accelerator(cpu=True)
    reset_accelerator()


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return new_autoencoder(ModelConfig(preset="tiny"))


@pytest.fixture
def images():
    """(2,3,32,32) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=32, mode="bilinear")
    return x * 2 - 1


@pytest.fixture(scope="session")
def dinov2_folder(tmp_path_factory):
    """A tiny random DINOv2 (hidden 32, one layer, patch 4) saved as a model folder."""
    return save_standin_dinov2(tmp_path_factory.mktemp("dinov2"), hidden=32, layers=1, heads=2, patch=4, image_size=32,
                               crop=32)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a multi-process run's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` for ``num_processes`` CPU processes (gloo) on a free port; run it with
    :func:`cpu_env`. Every multi-process test uses this, so no two tests share a fixed port."""
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if num_processes > 1 else []
    return ["accelerate", "launch", *multi, "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a launched test run: CPU processes only, plus ``extra``."""
    import os

    return {**os.environ, "ACCELERATE_USE_CPU": "1", **extra}


def identical(a, b) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


@contextlib.contextmanager
def training_accelerator(config):
    """A one-process CPU Accelerator as the entry points build it for ``config`` (trainer.accelerator_options),
    Accelerate's global state reset on exit, so that the next test can build another."""
    from accelerate import Accelerator

    from first_stage.trainer import accelerator_options

    try:
        yield Accelerator(cpu=True, **accelerator_options(config.train))
    finally:
        reset_accelerator()


def reset_accelerator() -> None:
    """Forget Accelerate's global state (process, mixed precision, gradient accumulation) of the last Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
