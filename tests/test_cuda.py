"""What only a GPU can check (``pytest -m cuda tests``; skipped on a machine without CUDA):
fp16 autocast with the GradScaler and bf16 training iterations of the Trainer, checkpoints
written from GPU tensors read on the CPU and back, the pinned-memory loader's transfer, the old
model's side thread (its own CUDA stream) against ``--sequential_old_model``, POD's hand-written
backward on the GPU. Models are built as ``scripts/benchmark.py`` builds them (random weights)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def bench_args(opt_level):
    import benchmark

    return benchmark.get_args(["--model", "segformer_b0", "--crop_size", "64", "--batch_size", "2",
                               "--opt_level", opt_level, "--device", "cuda"])


def step1(method, opt_level, seed=0):
    """``(opts, model, old, trainer, optim, batches)``: a step-1 trainer on CUDA, 4 batches."""
    import benchmark

    torch.manual_seed(seed)
    opts, model, old, trainer, optim = benchmark.build_step1(bench_args(opt_level), method, CUDA)
    batches = benchmark.synthetic_batches(4, opts, trainer.nb_current, CUDA, seed=seed)
    benchmark.prepare_targets(trainer, batches, opts)
    model.train()
    return opts, model, old, trainer, optim, batches


def first_conv_output_dtypes(model):
    """Records the dtype of the first convolution's output at each forward."""
    dtypes = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    return dtypes


def trainable(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def train(trainer, optim, batches):
    try:
        return [trainer.train_iteration(batch, optim) for batch in batches]
    finally:
        trainer.close()


@pytest.mark.parametrize("method", ["FT", "SATS", "PLOP"])
def test_fp16_autocast_with_grad_scaler_updates_the_weights(method):
    opts, model, old, trainer, optim, batches = step1(method, "O1")
    assert trainer.amp_dtype == torch.float16
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()
    dtypes = first_conv_output_dtypes(model)
    before = trainable(model)
    history = train(trainer, optim, batches)

    assert dtypes and set(dtypes) == {torch.float16}  # the new model ran under fp16 autocast
    final = history[-1]
    assert final and all(torch.isfinite(torch.tensor(v)) for v in final.values())
    assert 0 < trainer.scaler.get_scale() <= 65536.0
    # at least one update went through the scaler (an overflow halves the scale and skips it)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable(model)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["FT", "SATS"])
def test_bf16_autocast_trains_without_a_scaler(method):
    opts, model, old, trainer, optim, batches = step1(method, "O2")
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None
    dtypes = first_conv_output_dtypes(model)
    before = trainable(model)
    history = train(trainer, optim, batches)

    assert set(dtypes) == {torch.bfloat16}
    assert all(h and all(torch.isfinite(torch.tensor(v)) for v in h.values()) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable(model)))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights under autocast


def test_checkpoint_from_gpu_tensors_loads_on_cpu_and_back(tmp_path):
    import benchmark
    from segmentation_module import make_model
    from utils.checkpoint import load_checkpoint, save_atomic

    opts, model, old, trainer, optim, batches = step1("FT", "O0")
    train(trainer, optim, batches[:2])  # momentum buffers on the GPU
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(torch.ones((), device=CUDA))  # creates its scale tensor on the GPU
    scaler.update(new_scale=1024.0)
    path = tmp_path / "step.pth"
    save_atomic({"model_state": model.state_dict(), "optimizer_state": optim.state_dict(),
                 "scaler_state": scaler.state_dict()}, path)

    on_cpu = load_checkpoint(path)  # map_location="cpu"
    tensors = list(on_cpu["model_state"].values())
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    momentum = [s["momentum_buffer"] for s in on_cpu["optimizer_state"]["state"].values()]
    assert momentum and all(m.device.type == "cpu" for m in momentum)
    cpu_model = make_model(opts, trainer.classes)
    cpu_model.load_state_dict(on_cpu["model_state"])
    for key, value in model.state_dict().items():
        assert torch.equal(cpu_model.state_dict()[key], value.cpu()), key

    # back onto the GPU: a fresh model, optimiser and scaler take the CPU-loaded state
    torch.manual_seed(1)
    _, gpu_model, gpu_old, classes = benchmark.build_models(bench_args("O0"), "FT", CUDA)
    _, gpu_optim = benchmark.build_trainer(opts, gpu_model, gpu_old, CUDA, classes)
    gpu_model.load_state_dict(on_cpu["model_state"])
    gpu_optim.load_state_dict(on_cpu["optimizer_state"])
    gpu_scaler = torch.amp.GradScaler("cuda")
    gpu_scaler.load_state_dict(on_cpu["scaler_state"])
    for key, value in model.state_dict().items():
        restored = gpu_model.state_dict()[key]
        assert restored.device.type == "cuda" and torch.equal(restored, value), key
    restored_momentum = [s["momentum_buffer"] for s in gpu_optim.state_dict()["state"].values()]
    assert len(restored_momentum) == len(momentum)
    for a, b in zip(restored_momentum, momentum):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b)
    assert gpu_scaler.get_scale() == 1024.0
    # loading straight onto the GPU gives the same tensors
    direct = load_checkpoint(path, map_location="cuda")
    assert all(v.device.type == "cuda" and torch.equal(v, model.state_dict()[k])
               for k, v in direct["model_state"].items())


def test_pinned_loader_batches_reach_the_gpu_unchanged(tmp_path):
    from dataset import SkipAwareLoader, VOCSegmentationIncremental, transform
    from dataset.synthetic import generate
    from train import _unpack

    root = generate(str(tmp_path / "PascalVOC12"), num_train=8, num_val=2, size=64, workers=1)
    data = VOCSegmentationIncremental(root, train=True, transform=transform.train_transform(32))
    loader = SkipAwareLoader(data, batch_size=4, num_workers=1, pin_memory=True, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2
    for images, labels in batches:
        assert images.is_pinned() and labels.is_pinned()
        gpu_images, gpu_labels, saliency = _unpack((images, labels), CUDA)  # non_blocking copies
        torch.cuda.synchronize()
        assert gpu_images.device.type == "cuda" and saliency is None
        assert torch.equal(gpu_images.cpu(), images) and torch.equal(gpu_labels.cpu(), labels)
        assert gpu_images.shape == (4, 3, 32, 32) and gpu_labels.dtype == torch.int64


@pytest.fixture
def fp32_without_tf32():
    """Plain fp32 matrix products and deterministic cuDNN choices for the duration of a test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic) = saved


@pytest.mark.parametrize("method", ["SATS", "PLOP"])
def test_old_model_side_thread_gives_the_sequential_losses(method, fp32_without_tf32):
    """The old model on its side thread and CUDA stream computes what it computes in line: a
    missing stream synchronisation would hand the loss half-written outputs. cuBLAS does not
    promise bit-equal products on two streams, and a pseudo-label may flip at its threshold, so
    the comparison allows float32 noise rather than asking for equality."""
    results = []
    for sequential in (False, True):
        opts, model, old, trainer, optim, batches = step1(method, "O0")
        trainer.opts.sequential_old_model = sequential
        trainer.keep_context = True
        try:
            history = [trainer.train_iteration(batches[0], optim)]
            old_logits = trainer.last_context.old_logits.detach().clone()
            history += [trainer.train_iteration(batch, optim) for batch in batches[1:]]
        finally:
            trainer.close()
        results.append((history, old_logits, trainable(model)))
    (threaded, old_threaded, w_threaded), (in_line, old_in_line, w_in_line) = results
    torch.testing.assert_close(old_threaded, old_in_line, rtol=1e-4, atol=1e-5)
    assert set(threaded[0]) == set(in_line[0]) and len(threaded[0]) >= 2
    for i, (got, expected) in enumerate(zip(threaded, in_line)):
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-3 if i == 0 else 1e-2, abs=1e-5), \
                f"iteration {i}, {key}: side thread {got[key]}, in line {expected[key]}"
    for a, b in zip(w_threaded, w_in_line):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_pod_on_the_gpu_equals_the_cpu_loss_and_gradients():
    from utils.pod import features_distillation

    torch.manual_seed(0)
    old = [torch.randn(2, 8, 16, 16), torch.randn(2, 5, 10, 13), torch.randn(2, 5, 12, 12)]
    new = [torch.randn(2, 8, 16, 16), torch.randn(2, 5, 10, 13), torch.randn(2, 7, 12, 12)]
    options = dict(collapse_channels="local", pod_factor=0.01, spp_scales=[1, 2, 4],
                   index_new_class=5, nb_current_classes=7, nb_new_classes=2,
                   pod_options={"switch": {"after": {"factor": 0.0005, "type": "local"}}})
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        maps = [m.detach().clone().to(device).requires_grad_(True) for m in new]
        loss = features_distillation([m.to(device) for m in old], maps, **options)
        loss.backward()
        losses.append(loss.item())
        grads.append([m.grad.cpu() for m in maps])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
