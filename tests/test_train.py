"""Training: recipes, synthetic and ImageFolder data, exact resume, data-parallel equivalence with synchronized
BatchNorm (two gloo processes against one process with the combined batch), and the command's errors."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from xception_ops import cli
from xception_ops.train import PRESETS, TrainConfig, TrainResult, lr_factor, train

SMALL = dict(synthetic_size=12, image_size=71, batch_size=4, num_classes=4, log=False)


def state(path):
    return torch.load(path, weights_only=False)


def test_presets_are_the_papers():
    imagenet, jft = PRESETS["imagenet"], PRESETS["jft"]
    assert (imagenet.optimizer, imagenet.lr, imagenet.momentum, imagenet.dropout) == ("sgd", 0.045, 0.9, 0.5)
    assert lr_factor(imagenet, samples=2 * 1000 - 1, epoch_size=1000) == 1.0
    assert lr_factor(imagenet, samples=4 * 1000, epoch_size=1000) == pytest.approx(0.94**2)
    assert (jft.optimizer, jft.lr, jft.momentum, jft.dropout) == ("rmsprop", 0.001, 0.9, 0.0)
    assert lr_factor(jft, samples=6_000_000, epoch_size=10) == pytest.approx(0.81)


def test_sgd_takes_the_fused_kernel_on_cuda_parameters():
    """CUDA parameters (fake ones here: nothing runs) get PyTorch's fused SGD, CPU ones the default; RMSprop, which
    has no fused kernel, stays as it was."""
    from xception_ops.train import make_optimizer

    cfg = TrainConfig(**SMALL)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        cuda_params = [torch.nn.Parameter(torch.empty(3, 4, device="cuda")), torch.nn.Parameter(torch.empty(4,
                                                                                                         device="cuda"))]
        assert make_optimizer(cfg, PRESETS["imagenet"], iter(cuda_params)).defaults["fused"] is True
    cpu = make_optimizer(cfg, PRESETS["imagenet"], [torch.nn.Parameter(torch.zeros(2))])
    assert not cpu.defaults["fused"]
    assert isinstance(make_optimizer(cfg, PRESETS["jft"], [torch.nn.Parameter(torch.zeros(2))]), torch.optim.RMSprop)


def test_synthetic_training_decreases_the_loss():
    result = train(TrainConfig(**{**SMALL, "synthetic_size": 32}, max_steps=12, epochs=10, dropout=0.0, lr=0.01))
    assert result.steps == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert 0.0 <= result.top5 <= 1.0 and result.top1 <= result.top5
    assert result.steps_per_s > 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """With dropout (the RNG state) and across an epoch boundary (3 steps per epoch)."""
    common = dict(**SMALL, epochs=10, checkpoint_every=1, ema_decay=0.9)
    straight = train(TrainConfig(**common, max_steps=5, checkpoint=str(tmp_path / "straight.pt")))
    train(TrainConfig(**common, max_steps=2, checkpoint=str(tmp_path / "resumed.pt")))
    resumed = train(TrainConfig(**common, max_steps=5, checkpoint=str(tmp_path / "resumed.pt"), resume=True))
    assert resumed.steps == 5 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[2:]
    a, b = state(tmp_path / "straight.pt"), state(tmp_path / "resumed.pt")
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.slow
def test_compiled_training_follows_eager(monkeypatch):
    """--compile: the training step runs through torch.compile in the mode asked for (here with the aot_eager
    backend, graph capture and autograd without code generation: inductor takes minutes on this CPU), one graph
    for the model, and the same losses as eager."""
    real_compile, modes = torch.compile, []

    def compile_(model, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(model, backend="aot_eager", fullgraph=True)

    common = dict(**SMALL, max_steps=3, dropout=0.0, ema_decay=None)
    eager = train(TrainConfig(**common))
    monkeypatch.setattr(torch, "compile", compile_)
    compiled = train(TrainConfig(**common, compile="reduce-overhead"))
    assert modes == ["reduce-overhead"]
    assert len(compiled.losses) == 3
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        train(TrainConfig(**SMALL, max_steps=1, compile="fast"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**cfg_kwargs))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("sync_bn", [True, False])
def test_two_gloo_processes_match_one_with_the_combined_batch(tmp_path, sync_bn):
    """float64 so that rounding cannot hide a difference. Without synchronized BatchNorm each process normalizes
    with its own half-batch statistics, and the runs must differ: the comparison can fail."""
    common = dict(**{**SMALL, "synthetic_size": 16}, max_steps=2, epochs=10, dtype="float64", dropout=0.0,
                  ema_decay=None, sync_bn=sync_bn)
    train(TrainConfig(**common, checkpoint=str(tmp_path / "one.pt")))
    two = dict(common, batch_size=2, checkpoint=str(tmp_path / "two.pt"))
    mp.start_processes(_ddp_worker, args=(2, _free_port(), two), nprocs=2, start_method="spawn")
    one, both = state(tmp_path / "one.pt")["model"], state(tmp_path / "two.pt")["model"]
    worst = max(((one[k] - both[k]).norm() / one[k].norm().clamp_min(1e-30)).item()
                for k in one if one[k].is_floating_point())
    if sync_bn:
        assert worst <= 1e-9
    else:
        assert worst > 1e-6


def test_image_folder_training_and_evaluation(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                color = (255, 0, 0) if cls == "cat" else (0, 0, 255)
                Image.new("RGB", (90, 80), color).save(folder / f"{i}.png")
    result = train(TrainConfig(data=str(tmp_path), image_size=71, batch_size=4, num_classes=2, max_steps=2,
                               log=False))
    assert result.steps == 2 and result.top1 is not None


def test_inception_v3_and_the_jft_preset_train():
    result = train(TrainConfig(**{**SMALL, "image_size": 75}, model="inception_v3", preset="jft", max_steps=1,
                               ema_decay=None))
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.losses)).all()


def test_multi_label_synthetic_training():
    result = train(TrainConfig(**SMALL, multi_label=True, max_steps=1, preset="jft"))
    assert result.steps == 1 and result.top1 is not None


def test_ablation_flags():
    result = train(TrainConfig(**SMALL, residual=False, mid_activation="elu", max_steps=1, bf16=True,
                               channels_last=True))
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.losses)).all()


def test_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "cifar"])
    assert "invalid choice: 'cifar'" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(tmp_path / "missing")]) == 2
    assert "data directory" in capsys.readouterr().err
    assert cli.main(["train", "--checkpoint", "/proc/no/such/ckpt.pt", "--max-steps", "1"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_cli_trains(capsys, monkeypatch):
    assert cli.main(["train", "--synthetic-size", "8", "--image-size", "71", "--batch-size", "4", "--num-classes",
                     "3", "--max-steps", "1", "--no-ema"]) == 0
    assert '"steps": 1' in capsys.readouterr().out
    configs = []
    monkeypatch.setattr("xception_ops.train.train", lambda cfg: configs.append(cfg) or TrainResult(0))
    for flags, mode in (([], None), (["--compile"], "default"), (["--compile", "reduce-overhead"], "reduce-overhead")):
        assert cli.main(["train", "--max-steps", "1", *flags]) == 0
        assert configs[-1].compile == mode


def test_torchrun_launches_data_parallel_training(tmp_path):
    """The documented command, under torchrun with two gloo processes on the CPU."""
    import subprocess
    import sys
    ckpt = tmp_path / "run.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "xception_ops.cli", "train", "--synthetic-size", "8", "--image-size", "71",
           "--batch-size", "2", "--num-classes", "3", "--max-steps", "2", "--sync-bn", "--checkpoint", str(ckpt)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"steps": 2' in result.stdout
    assert state(ckpt)["step"] == 2
