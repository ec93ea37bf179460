"""Training with the paper's recipes: Xception (any backend) or Inception V3, on an ImageFolder directory or a
synthetic dataset, on one process or data-parallel under torchrun (DistributedDataParallel: NCCL on GPUs, gloo on
CPUs), with Polyak averaging, bf16 autocast, channels_last, synchronized BatchNorm and checkpoints that resume
exactly.

    xception-ops train --preset imagenet --data /path/to/imagenet --epochs 100 --bf16 --channels-last
    torchrun --nproc-per-node 8 -m xception_ops.cli train --preset imagenet --data ... --sync-bn
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .batchnorm import convert_sync_batchnorm
from .compiling import compile_mode
from .progress import Progress


@dataclass(frozen=True)
class Preset:
    """The paper's section 4.2-4.3 recipes (the same for Xception and Inception V3, but for the weight decay)."""
    optimizer: str            # "sgd" or "rmsprop"
    lr: float
    momentum: float
    decay_rate: float         # the learning rate is multiplied by this ...
    decay_epochs: float | None = None  # ... every this many epochs
    decay_samples: int | None = None   # ... or every this many samples
    dropout: float = 0.0


PRESETS = {
    "imagenet": Preset("sgd", lr=0.045, momentum=0.9, decay_rate=0.94, decay_epochs=2, dropout=0.5),
    "jft": Preset("rmsprop", lr=0.001, momentum=0.9, decay_rate=0.9, decay_samples=3_000_000, dropout=0.0),
}
WEIGHT_DECAY = {"xception": 1e-5, "inception_v3": 4e-5}  # section 4.3

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    model: str = "xception"                 # "xception" or "inception_v3"
    preset: str = "imagenet"
    data: str | None = None                 # ImageFolder root with train/ (and val/); None: synthetic data
    synthetic_size: int = 256               # images in the synthetic training set
    num_classes: int = 1000
    multi_label: bool = False               # synthetic data only: multi-hot targets and a sigmoid head
    image_size: int = 299
    batch_size: int = 32                    # per process
    epochs: float = 1.0
    max_steps: int | None = None            # stop after this many optimizer steps in total
    lr: float | None = None                 # override the preset's
    weight_decay: float | None = None       # override the model's
    dropout: float | None = None            # override the preset's
    backend: str = "auto"                   # Xception's separable convs
    residual: bool = True                   # paper section 4.6
    mid_activation: str | None = None       # paper section 4.7: "relu" or "elu"
    bf16: bool = False                      # autocast to bfloat16
    dtype: str = "float32"                  # parameter dtype; float64 for exact comparisons
    channels_last: bool = False
    compile: str | None = None              # torch.compile's mode for the training forward and backward, or None
    sync_bn: bool = False
    ema_decay: float | None = 0.9999        # Polyak averaging of the weights (None: off)
    checkpoint: str | None = None           # where to save; resumed from when it exists and resume is set
    checkpoint_every: int = 0               # steps between checkpoints (0: only at the end)
    resume: bool = False
    seed: int = 0
    workers: int = 0
    eval_batches: int | None = None         # limit evaluation to this many batches
    log: bool = True


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    steps_per_s: float = 0.0
    images_per_s: float = 0.0


# ---------------------------------------------------------------------------------------------- data

class SyntheticImages(Dataset):
    """A learnable synthetic dataset: each class has a fixed random prototype image; a sample is its prototype
    plus noise. Deterministic per index, so every process and every resumed run sees the same data."""

    def __init__(self, size: int, image_size: int, num_classes: int, multi_label: bool = False, seed: int = 0):
        self.size, self.image_size, self.num_classes, self.multi_label = size, image_size, num_classes, multi_label
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(num_classes, 3, 8, 8, generator=gen)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        proto = F.interpolate(self.prototypes[label:label + 1], size=self.image_size, mode="nearest")[0]
        image = proto + 0.5 * torch.randn(3, self.image_size, self.image_size, generator=gen)
        if self.multi_label:
            target = (torch.rand(self.num_classes, generator=gen) < 0.1).float()
            target[label] = 1.0
            return image, target
        return image, label


def image_folder(root: Path, image_size: int, train: bool) -> Dataset:
    from torchvision import datasets, transforms
    normalize = transforms.Normalize([0.5] * 3, [0.5] * 3)  # Xception's preprocessing: pixels in [-1, 1]
    if train:
        transform = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), normalize])
    else:
        transform = transforms.Compose([transforms.Resize(int(image_size * 1.14)), transforms.CenterCrop(image_size),
                                        transforms.ToTensor(), normalize])
    return datasets.ImageFolder(str(root), transform)


def datasets_for(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    if cfg.data is None:
        train = SyntheticImages(cfg.synthetic_size, cfg.image_size, cfg.num_classes, cfg.multi_label, cfg.seed)
        val = SyntheticImages(max(cfg.synthetic_size // 4, cfg.batch_size), cfg.image_size, cfg.num_classes,
                              cfg.multi_label, cfg.seed + 1)
        return train, val
    root = Path(cfg.data)
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = root / "val"
    return (image_folder(train_root, cfg.image_size, True),
            image_folder(val_root, cfg.image_size, False) if val_root.is_dir() else None)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (the same order on one process as the union over many) that can start an epoch past
    its first `skip` samples without loading them, so a resumed run sees exactly what the uninterrupted one did."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


# ---------------------------------------------------------------------------------------------- model, optimizer

def build_model(cfg: TrainConfig, dropout: float) -> nn.Module:
    if cfg.model == "xception":
        from .models import xception
        return xception(num_classes=cfg.num_classes, residual=cfg.residual, mid_activation=cfg.mid_activation,
                        drop_rate=dropout, multi_label=cfg.multi_label, backend=cfg.backend)
    if cfg.model == "inception_v3":
        from torchvision.models import inception_v3
        return inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=cfg.num_classes,
                            dropout=dropout)
    raise ValueError(f"model must be 'xception' or 'inception_v3', got {cfg.model!r}")


def make_optimizer(cfg: TrainConfig, preset: Preset, params) -> torch.optim.Optimizer:
    """The preset's optimizer. SGD on CUDA parameters takes PyTorch's fused kernel: the same update in one launch,
    where the default (foreach) version cost the host 1.4 ms per Xception step in Python and launches (H100 host,
    session 12), in a step the host bounds."""
    lr = cfg.lr if cfg.lr is not None else preset.lr
    wd = cfg.weight_decay if cfg.weight_decay is not None else WEIGHT_DECAY[cfg.model]
    if preset.optimizer == "sgd":
        params = list(params)
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.SGD(params, lr=lr, momentum=preset.momentum, weight_decay=wd, fused=fused or None)
    # TensorFlow's RMSprop as the Inception recipes use it: decay (alpha) 0.9, epsilon 1.0.
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=preset.momentum, eps=1.0, weight_decay=wd)


def lr_factor(preset: Preset, samples: int, epoch_size: int) -> float:
    """Step decay by samples seen: x decay_rate every decay_epochs epochs, or every decay_samples samples."""
    every = preset.decay_samples if preset.decay_samples else preset.decay_epochs * epoch_size
    return preset.decay_rate ** math.floor(samples / every)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    return F.cross_entropy(logits, target)


# ---------------------------------------------------------------------------------------------- checkpoints

def check_writable(path: str) -> None:
    """Fails now, not after hours of training, when the checkpoint cannot be written."""
    parent = Path(path).expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".xception-ops-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"checkpoint path {path!r} is not writable: {e.strerror or e}") from e


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, optimizer, ema, step: int, cfg: TrainConfig) -> None:
    """Atomically: a crash while writing leaves the previous checkpoint intact."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": asdict(cfg),
             "ema": ema.state_dict() if ema is not None else None, "rng": _rng_state()}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the loop

def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, cfg: TrainConfig) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (multi-label: whether the top-1 / any of the top-5 predictions is a positive)."""
    model.eval()
    hits1 = hits5 = seen = 0
    for i, (images, target) in enumerate(loader):
        if cfg.eval_batches is not None and i >= cfg.eval_batches:
            break
        images = images.to(device, DTYPES[cfg.dtype])
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        if cfg.multi_label:
            positive = target.bool().gather(1, top5)
            hits1 += int(positive[:, 0].sum())
            hits5 += int(positive.any(1).sum())
        else:
            hits1 += int((top5[:, 0] == target).sum())
            hits5 += int((top5 == target[:, None]).any(1).sum())
        seen += len(target)
    counts = torch.tensor([hits1, hits5, seen], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()


def train(cfg: TrainConfig) -> TrainResult:
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; expected one of {', '.join(PRESETS)}")
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise ValueError(f"data directory {cfg.data!r} does not exist")
    if cfg.multi_label and cfg.data is not None:
        raise ValueError("multi_label needs the synthetic dataset (ImageFolder data is single-label)")
    if cfg.checkpoint is not None:
        check_writable(cfg.checkpoint)
    if cfg.compile is not None:
        compile_mode(cfg.compile)  # an unknown mode is refused before anything runs
    preset = PRESETS[cfg.preset]
    rank, world, local_rank = _distributed()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    random.seed(cfg.seed)

    model = build_model(cfg, preset.dropout if cfg.dropout is None else cfg.dropout)
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        convert_sync_batchnorm(model)
    optimizer = make_optimizer(cfg, preset, model.parameters())
    ema = None
    if cfg.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    step = 0
    if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists():
        state = torch.load(cfg.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        step = state["step"]
        _set_rng_state(state["rng"])
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if cfg.compile is not None:  # (the module itself stays uncompiled for checkpoints, EMA and evaluation)
        ddp_model = torch.compile(ddp_model, mode=compile_mode(cfg.compile))

    train_set, val_set = datasets_for(cfg)
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                               drop_last=True)
    # The loader's own generator: creating an iterator then leaves the global RNG (dropout) alone.
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = len(train_set) // world // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global batch "
                         f"({cfg.batch_size} x {world} processes)")
    global_batch = cfg.batch_size * world
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    base_lr = cfg.lr if cfg.lr is not None else preset.lr

    result = TrainResult(steps=step)
    bar = Progress(total_steps - step, None if cfg.log and rank == 0 else (lambda line: None))
    # A step's loss is read (a wait for the GPU) after the next step has been issued, so that the host queues step
    # k + 1 while the GPU still runs step k instead of idling between them.
    unread: torch.Tensor | None = None

    def read_loss() -> float:
        value = unread.item()
        result.losses.append(value)
        return value

    start = time.perf_counter()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.skip = done_in_epoch * cfg.batch_size  # resumed mid-epoch: the same order, past what was seen
        for images, target in loader:
            if step >= total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_factor(preset, step * global_batch, len(train_set))
            images = images.to(device, DTYPES[cfg.dtype], non_blocking=True)
            target = target.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            ddp_model.train()
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(ddp_model(images), target, cfg.multi_label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            shown = read_loss() if unread is not None else float("nan")
            unread = loss.detach()
            elapsed = time.perf_counter() - start
            done = step - result.steps
            bar.step(f"loss {shown:.4f}, {done / elapsed:.2f} steps/s, {done * global_batch / elapsed:.1f} "
                     f"images/s, lr {optimizer.param_groups[0]['lr']:.3g}")
            if cfg.checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and rank == 0:
                save_checkpoint(cfg.checkpoint, model, optimizer, ema, step, cfg)
    if unread is not None:
        read_loss()
    elapsed = time.perf_counter() - start
    done = step - result.steps
    result.steps_per_s = done / elapsed if elapsed > 0 else 0.0
    result.images_per_s = result.steps_per_s * global_batch
    result.steps = step
    if cfg.checkpoint and rank == 0:
        save_checkpoint(cfg.checkpoint, model, optimizer, ema, step, cfg)
    if val_set is not None:
        val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
        val_loader = DataLoader(val_set, cfg.batch_size, sampler=val_sampler, num_workers=cfg.workers)
        result.top1, result.top5 = evaluate(ema.module if ema is not None else model, val_loader, device, cfg)
    if dist.is_initialized():
        dist.barrier()
    return result
