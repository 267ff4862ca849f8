"""Where and how a run executes: device, precision, memory format, distributed rank.

Pre-flight: a device that does not exist is a clear error before anything is built
(``device=cuda`` on a machine without a GPU); ``device=auto`` picks CUDA when present.
Under ``torchrun`` the process group is initialised here (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode argument (None: its default)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The run's mixed precision for a forward pass (a no-op context without AMP)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def input_format(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in the memory format the model was placed in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"{self.device.type} ({torch.get_num_threads()} threads)"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda was requested but this machine has no usable CUDA GPU; use device=auto or device=cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps was requested but MPS is not available; use device=auto or device=cpu")
    return device


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Resolve device/precision/format from the config and torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.amp == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    elif cfg.amp == "off":
        amp_dtype = None
    elif cfg.amp in AMP_DTYPES:
        amp_dtype = AMP_DTYPES[cfg.amp]
    else:
        raise ConfigError(f"amp={cfg.amp!r} is not one of auto, bf16, fp16, off")
    on_cuda = device.type == "cuda"  # what null (auto) means for compile and channels_last
    channels_last = on_cuda if cfg.channels_last is None else cfg.channels_last
    compile_model = on_cuda if cfg.compile is None else cfg.compile
    mode = resolve_compile_mode(cfg.compile_mode, device, world_size, cfg.data.drop_last)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Runtime(device, amp_dtype, channels_last, rank, world_size, compile_model, mode)


def resolve_compile_mode(mode: str | None, device: torch.device, world_size: int, drop_last: bool) -> str | None:
    """torch.compile's mode for ``compile_mode``; ``auto`` records CUDA graphs where they are safe.

    CUDA graphs ("reduce-overhead") need static shapes (every training batch full: drop_last) and
    are not combined with DDP's communication hooks, so ``auto`` uses them on a single CUDA device
    with drop_last only, and torch's default mode elsewhere.
    """
    if mode is None or mode == "default":
        return None
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and world_size == 1 and drop_last else None
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode={mode!r} is not one of auto, {', '.join(COMPILE_MODES)}")
    return mode
