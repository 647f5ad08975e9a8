"""What a run asks of Ray and of the device, CPU and GPU alike (GPUs cannot run here)."""
import torch

from trainers.config import TrainConfig
from trainers.launch import build_trainer, scaling_config
from trainers.optim import build_optimizer
from trainers.models import build_model
from trainers.step import use_bf16


def test_gpu_run_requests_one_gpu_per_worker_and_nccl(tmp_path):
    cfg = TrainConfig(use_gpu=True, workers=8, cpus_per_worker=4, batch_size=4096)
    sc = scaling_config(cfg)
    assert sc.num_workers == 8 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 4, "GPU": 1}
    trainer = build_trainer(cfg, str(tmp_path), "gpu")
    assert trainer.backend_config.backend == "nccl"


def test_cpu_run_uses_gloo_and_no_gpu(tmp_path):
    cfg = TrainConfig(workers=2, batch_size=64)
    assert scaling_config(cfg).resources_per_worker == {"CPU": 1}
    assert build_trainer(cfg, str(tmp_path), "cpu").backend_config.backend == "gloo"
    assert cfg.worker_batch == 32


def test_bf16_autocast_on_gpu_only():
    cfg = TrainConfig()
    assert use_bf16(cfg, torch.device("cuda"))
    assert not use_bf16(cfg, torch.device("cpu"))  # bf16 runs at half speed on this CPU
    assert not use_bf16(TrainConfig(amp="off"), torch.device("cuda"))


def test_lr_scales_with_batch_and_weight_decay_skips_norms_biases_tokens():
    cfg = TrainConfig(batch_size=4096, preset="tiny")
    assert cfg.lr == 1.5e-4 * 4096 / 256
    opt = build_optimizer(build_model(cfg), cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    assert {"cls_token", "mask_token"} <= {names[id(p)] for p in opt.param_groups[1]["params"]}
