"""The GPU paths, checked on CPU by emulating what a GPU cluster does differently (issue 16).

Each crash point has a test that failed on the code before the fix:
1. DeepSpeed bf16: parameters bf16, buffers fp32, no autocast (engine.forward turns CUDA autocast off), in
   training and validation; and the inference checkpoint comes from the fp32 masters.
2. NCCL has no CPU backend: every tensor the loop hands to a collective is on the loop's device.
3. Every shipped config's model takes the tokens its clips produce (one forward on the meta device).
4. An autoscaling cluster (0-CPU head, GPU nodes from 0) is compared with what it can grow to.
5. use_gpu=true with CUDA unusable stops at start-up naming the node, torch's CUDA build and the driver.
6. ZeRO-3 (2 CPU Ray Train workers): no hang at the first checkpoint, a correct inference checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from jobs.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (ROOT / "jobs" / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeShard:
    """What `ray.train.get_dataset_shard` gives the loop, for `iter_torch_batches`: numpy batches through the
    loop's own collate function."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches

    def iter_torch_batches(self, *, batch_size, drop_last, collate_fn, prefetch_batches):
        for b in self.batches:
            yield collate_fn(b)


def val_batches(cfg, n_batches=2, batch=3, views=1, seed=0) -> list[dict[str, np.ndarray]]:
    from models.vit import get_config

    m = get_config(cfg.model.variant, **cfg.model.overrides)
    L, K = m.temporal_tokens * m.num_patches, m.token_dim
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, 256, (batch, views, L, K), dtype=np.uint8),
             "label": rng.integers(0, 4, batch), "path": np.array([f"v{i}_{j}.mp4" for j in range(batch)])}
            for i in range(n_batches)]


def tiny_cfg(*overrides):
    return load_config("tiny_cpu", ["mone.val_budgets=[0.3,1.0]", "optim.batch_size=3", *overrides])


def budget_arg_for(cfg):
    from models.capacity import capacities_for_budget

    return lambda e: None if e >= 1.0 else capacities_for_budget(e, delta=cfg.mone.delta, beta=cfg.mone.beta)


def as_deepspeed_bf16(model):
    """What DeepSpeed's bf16 mode does to the module (0.19.2+): parameters to bf16, buffers left in fp32."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


# --------------------------------------------------------------------------- 1. bf16 under DeepSpeed


def test_bf16_parameters_fp32_buffers_without_autocast_train_and_validate():
    from jobs.train import TokensClassifier, _validate
    from models.flops import model_flops
    from models.vit import create_model

    cfg = tiny_cfg()
    torch.manual_seed(0)
    ref = create_model(cfg.model.variant, num_classes=4, drop_path=0.1, **cfg.model.overrides)
    model = as_deepspeed_bf16(create_model(cfg.model.variant, num_classes=4, drop_path=0.1, **cfg.model.overrides))
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")
    net = TokensClassifier(model)
    batch = val_batches(cfg, 1, batch=4)[0]
    tokens, target = torch.from_numpy(batch["tokens"][:, 0]), torch.from_numpy(batch["label"])  # (B, L, K), (B,)
    budget_arg = budget_arg_for(cfg)

    # training: forward, loss and backward at the budgets a step draws, drop path on
    for e_c in (1.0, 0.3, 0.15):
        net.train()
        model.zero_grad()
        logits = net(tokens, budget=budget_arg(e_c))  # (B, classes)
        assert logits.dtype == torch.bfloat16
        F.cross_entropy(logits.float(), target).backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    # the bf16 model computes the fp32 model's function, to bf16 accuracy
    net.eval()
    ref.eval()
    with torch.no_grad():
        got, want = net(tokens, budget=None).float(), ref.forward_tokens(tokens, budget=None)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99

    # validation: the loop's own function, through the loop's batch iterator
    out = _validate(net, FakeShard(val_batches(cfg, 2)), cfg, torch.device("cpu"), budget_arg, model_flops, 4)[0]
    assert out["val_clips"] == 6 and 0.0 <= out["top1_ec0.3"] <= 1.0 and 0.0 <= out["top5_ec1.0"] <= 1.0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_engine_trains_validates_and_checkpoints_fp32_masters(stage, gloo_world_of_one, tmp_path):
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from jobs.train import (
        TokensClassifier,
        _disable_deepspeed_shm_comm,
        _validate,
        deepspeed_config,
        full_fp32_state_dict,
    )
    from models.flops import model_flops
    from models.vit import create_model

    # the GPU config (bf16 via precision=auto on a GPU) with ZeRO-3 partitioning every parameter
    cfg = tiny_cfg(f"scaling.zero_stage={stage}",
                   "scaling.deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    ds_config = deepspeed_config(cfg, use_gpu=True)
    assert ds_config["bf16"]["enabled"] and ds_config["zero_optimization"]["overlap_comm"]
    torch.manual_seed(0)
    model = create_model(cfg.model.variant, num_classes=4, **cfg.model.overrides)
    net = TokensClassifier(model)
    _disable_deepspeed_shm_comm()
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2),
                                      config=ds_config, dist_init_required=False)
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    batch = val_batches(cfg, 1, batch=3)[0]
    tokens, target = torch.from_numpy(batch["tokens"][:, 0]), torch.from_numpy(batch["label"])
    budget_arg = budget_arg_for(cfg)
    for e_c in (1.0, 0.3):  # the worker's step: no autocast around the engine
        engine.train()
        loss = F.cross_entropy(engine(tokens, budget=budget_arg(e_c)).float(), target)
        engine.backward(loss)
        engine.step()
    out = _validate(net, FakeShard(val_batches(cfg, 2)), cfg, torch.device("cpu"), budget_arg, model_flops, 4)[0]
    assert out["val_clips"] == 6

    weights = full_fp32_state_dict(engine)
    assert set(weights) == set(create_model(cfg.model.variant, num_classes=4, **cfg.model.overrides).state_dict())
    assert all(v.dtype == torch.float32 for v in weights.values())
    # DeepSpeed's own offline consolidation of the same masters, from the checkpoint files
    engine.save_checkpoint(str(tmp_path / "ds"), tag="state")
    masters = {k.removeprefix("model."): v for k, v in
               get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ds"), tag="state").items()}
    for k, v in weights.items():
        torch.testing.assert_close(v, masters[k].float(), rtol=0, atol=0, msg=k)
    # ... which are not the bf16 working copies: after two steps of lr 1e-2 some masters hold bits bf16 cannot
    assert any(not torch.equal(v, v.bfloat16().float()) for v in weights.values())


# --------------------------------------------------------------------------- 2. collectives on the loop's device


def test_every_collective_in_validation_is_on_the_loop_device(monkeypatch):
    """NCCL reduces only CUDA tensors. Emulated on CPU: tensors made without `device=` land on the meta device
    here, and every tensor handed to torch.distributed must be on the loop's device."""
    import torch.distributed as dist

    from jobs.train import TokensClassifier, _validate
    from models.flops import model_flops
    from models.vit import create_model

    cfg = tiny_cfg()
    loop_device = torch.device("cpu")
    net = TokensClassifier(create_model(cfg.model.variant, num_classes=4, **cfg.model.overrides))
    seen = []

    def collective(tensor, *args, **kwargs):
        seen.append(tensor.device)
        assert tensor.device == loop_device, f"a collective got a tensor on {tensor.device}, the loop runs on " \
                                             f"{loop_device}: NCCL would raise 'No backend type associated with " \
                                             "device type cpu'"

    def all_gather(tensor_list, tensor, *args, **kwargs):  # torchmetrics' sync of its counters (a world of one)
        collective(tensor)
        for t in tensor_list:
            t.copy_(tensor)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    for name in ("all_reduce", "reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, collective)
    torch.set_default_device("meta")
    try:
        out = _validate(net, FakeShard(val_batches(cfg, 2)), cfg, loop_device, budget_arg_for(cfg), model_flops,
                        4)[0]
    finally:
        torch.set_default_device(None)
    assert len(seen) >= 2 and out["val_clips"] == 6  # ours (clips/s) and torchmetrics' (the counts)


# --------------------------------------------------------------------------- 3. configs fit their models


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_model_takes_its_tokens_on_meta(name):
    """The model each shipped config builds runs one forward on uint8 tokens of the shape its clips produce."""
    from jobs.data import clip_spec_dict
    from models.vit import create_model
    from pipeline.sampling import ClipSpec

    cfg = load_config(name) if name == "tiny_cpu" else load_config(name, check_paths=False)  # a cluster's paths
    with torch.device("meta"):
        model = create_model(cfg.model.variant, num_classes=7, **cfg.model.overrides)
    for train in (True, False):
        V, L, K = ClipSpec(**clip_spec_dict(cfg, train=train)).tokens_shape
        tokens = torch.empty(2 * V, L, K, dtype=torch.uint8, device="meta")  # (B*V, L, K)
        model.train(train)
        for e_c in (1.0, min(cfg.mone.val_budgets)):
            from models.capacity import capacities_for_budget

            budget = None if e_c >= 1.0 else capacities_for_budget(e_c)
            assert model.forward_tokens(tokens, budget=budget).shape == (2 * V, 7)


def test_mismatched_crop_is_refused_before_ray_in_one_line(capsys):
    from jobs.cli import main

    assert main(["train", "--config", "ssv2_vivit_b16", "--dry-run", "data.crop_size=224"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "data.crop_size=224 does not match model vivit_b16 (img_size=256)" in out[0]
    with pytest.raises(ConfigError, match="data.num_frames=16 does not match model vivit_tiny"):
        load_config("tiny_cpu", ["data.num_frames=16"])
    with pytest.raises(ConfigError, match="model.overrides.img_sise: not a model setting; did you mean 'img_size'"):
        load_config("tiny_cpu", ["model.overrides.img_sise=64"])


def test_dry_run_of_the_ssv2_config_passes_without_ray(capsys):
    import ray

    from jobs.cli import main

    assert main(["train", "--config", "ssv2_vivit_b16", "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["train_tokens"] == [1, 16 * 16 * 16, 1536]  # 16 tubelet frames x 16x16
    assert not ray.is_initialized()


def test_init_from_a_checkpoint_at_another_img_size(tmp_path):
    """ssv2_vivit_b16 (256 px) starts from 224-px weights: position embeddings are resampled, the rest loads."""
    from models.vit import create_model
    from models.weights import load_pretrained

    src = create_model("vivit_tiny", num_classes=4, pool="cls")  # 64 px: 8x8 patches of 8 px
    torch.save(src.state_dict(), tmp_path / "src.pt")
    dst = create_model("vivit_tiny", num_classes=4, img_size=96, pool="cls")  # 12x12 patches
    assert load_pretrained(dst, tmp_path / "src.pt") == []
    assert dst.pos_embed.shape == (1, 1 + 144, 64)  # CLS + 12x12
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)


# --------------------------------------------------------------------------- 4. autoscaling clusters


def launcher_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_readme_submit_fits_the_autoscaling_cluster_of_cluster_yaml(monkeypatch, tmp_path):
    """cluster.yaml's head advertises 0 CPUs and its GPU nodes start at 0: what `mone submit train ... --config
    k400_vivit_b16` finds on the head. The check compares with what the cluster can grow to."""
    import ray
    import ray._private.state

    from jobs.preflight import cluster_capacity
    from jobs.train import check_resources

    (tmp_path / "ray_bootstrap_config.yaml").write_text((ROOT / "cluster.yaml").read_text())  # `ray up` puts it
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0, "memory": 6.4e10})
    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: None)
    capacity = cluster_capacity()
    assert capacity.autoscaling and capacity.ceiling["GPU"] == 16 and capacity.ceiling["CPU"] == 192

    cfg = load_config("k400_vivit_b16", ["data.root=", "run.name=k400_b16"], check_paths=False)  # the README's example
    warnings = check_resources(cfg, capacity)
    assert any("can grow to 16" in w for w in warnings)
    too_big = load_config("k400_vivit_b16", ["data.root=", "scaling.num_workers=24"], check_paths=False)
    with pytest.raises(ConfigError, match="needs 24 GPUs, the autoscaling cluster can grow to 16"):
        check_resources(too_big, capacity)


def test_autoscaler_with_unknown_limits_warns_and_a_fixed_cluster_refuses(monkeypatch):
    from jobs.preflight import ClusterCapacity, check_resources, launcher_max_resources

    cfg = load_config("k400_vivit_b16", ["data.root="], check_paths=False)
    unknown = ClusterCapacity({"CPU": 0.0}, None, True, "~/ray_bootstrap_config.yaml (resources not declared)")
    warnings = check_resources(cfg, unknown)
    assert len(warnings) == 2 and all("waits for nodes to join" in w for w in warnings)
    with pytest.raises(ConfigError, match=f"needs {cfg.scaling.num_workers} GPUs, the Ray cluster has 0"):
        check_resources(cfg, {"CPU": 256.0})
    # the global max_workers caps every node type together
    conf = launcher_config()
    conf["max_workers"] = 1
    assert launcher_max_resources(conf)["GPU"] == 8
    del conf["available_node_types"]["gpu_worker"]["resources"]  # left to Ray's instance-type lookup: unknown
    assert launcher_max_resources(conf) is None


def test_evaluate_auto_uses_gpus_an_autoscaling_cluster_can_start(monkeypatch):
    import ray

    from jobs import evaluate, preflight

    monkeypatch.setattr(preflight, "cluster_capacity",
                        lambda: preflight.ClusterCapacity({"CPU": 0.0}, {"CPU": 192.0, "GPU": 16.0}, True, "test"))
    with_gpu, actors, pool = evaluate._model_actors("auto", None, chunks=40, echo=lambda *a, **k: None)
    assert with_gpu and actors == 16 and (pool.min_size, pool.max_size) == (1, 16)
    assert evaluate._model_actors("auto", None, chunks=3, echo=lambda *a, **k: None)[1] == 3
    monkeypatch.setattr(preflight, "cluster_capacity", lambda: preflight.ClusterCapacity({"CPU": 8.0, "GPU": 4.0}))
    with_gpu, actors, pool = evaluate._model_actors("auto", None, chunks=40, echo=lambda *a, **k: None)
    assert with_gpu and actors == 4 and (pool.min_size, pool.max_size) == (4, 4)
    monkeypatch.setattr(preflight, "cluster_capacity", lambda: preflight.ClusterCapacity({"CPU": 8.0}))
    assert evaluate._model_actors("auto", None, chunks=40, echo=lambda *a, **k: None)[:2] == (False, 1)
    assert isinstance(pool, ray.data.ActorPoolStrategy)


# --------------------------------------------------------------------------- 5. CUDA unusable on a GPU worker


def test_use_gpu_without_usable_cuda_stops_at_startup_naming_node_build_and_driver(monkeypatch):
    import ray.train

    from jobs.train import train_loop_per_worker

    class Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = load_config("tiny_cpu", ["scaling.use_gpu=true", "scaling.num_workers=1"])
    loop = {"config": cfg.to_dict(), "labels": ["a", "b"], "num_train": 8, "num_val": 4, "run_dir": "unused",
            "eval_clip": {}, "train_error_log": None}
    with pytest.raises(RuntimeError) as e:
        train_loop_per_worker(loop)
    msg = str(e.value)
    assert "CUDA is unusable" in msg and socket.gethostname() in msg and torch.__version__ in msg
    assert ("CPU-only build" in msg or f"CUDA {torch.version.cuda}" in msg) and "NVIDIA driver" in msg
    assert "DS_ACCELERATOR" not in os.environ  # stopped before the CPU fallback set anything up


# --------------------------------------------------------------------------- 6. ZeRO-3 on 2 Ray Train workers


@pytest.mark.slow
def test_zero3_two_workers_checkpoint_without_hang_and_inference_weights_are_the_masters(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from jobs.checkpoint import load_inference

    storage, cache = tmp_path / "runs", tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "jobs.cli", "train", "--config", "tiny_cpu", "optim.epochs=1", "optim.batch_size=4",
        "data.synth.classes=2", "data.synth.videos_per_class=6", "data.synth.val_videos_per_class=2",
        "data.synth.corrupt=0", "scaling.num_workers=2", "scaling.zero_stage=3", "mone.dense_epochs=0",
        "mone.val_budgets=[0.3,1.0]", "run.max_failures=0", f"data.cache_dir={cache}",
        f"run.storage_path={storage}", "run.name=z3",
        # partition every parameter (by default DeepSpeed keeps tensors under 1e5 elements whole on every rank,
        # which is all of vivit_tiny): validation and the checkpoint must gather them
        "scaling.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
                             start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ZeRO-3 run hung (no result in 420 s): {(e.stdout or b'')[-3000:]!r}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and 0.0 <= summary["top1_ec0.3"] <= 1.0 and 0.0 <= summary["top1_ec1.0"] <= 1.0

    # The inference checkpoint equals DeepSpeed's own offline consolidation of both ranks' shards.
    ray_ckpt = Path(summary["ray_checkpoint"])
    masters = get_fp32_state_dict_from_zero_checkpoint(str(ray_ckpt / "deepspeed"), tag="state")
    ck = load_inference(summary["checkpoint"])
    from safetensors.torch import load_file

    weights = load_file(Path(summary["checkpoint"]) / "model.safetensors")
    assert set(weights) == {k.removeprefix("model.") for k in masters}
    for k, v in masters.items():
        torch.testing.assert_close(weights[k.removeprefix("model.")], v.float(), rtol=0, atol=0)
    L = ck.model.cfg.temporal_tokens * ck.model.cfg.num_patches
    tokens = torch.randint(0, 255, (2, L, ck.model.cfg.token_dim), dtype=torch.uint8)
    assert ck.model.forward_tokens(tokens, budget=0.3).shape == (2, 2)


# --------------------------------------------------------------------------- the GPU smoke test, here


def test_gpu_smoke_skips_in_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the smoke test would run")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["skipped"] is True


def test_submit_smoke_runs_the_script_with_a_gpu_for_its_driver():
    from jobs import submit

    assert submit.build_entrypoint("smoke", ["--quick", "--out", "/mnt/shared/s"]) == \
        "python -u benchmarks/gpu_smoke.py --quick --out /mnt/shared/s"
    assert (ROOT / submit.SCRIPT_COMMANDS["smoke"]).is_file()
