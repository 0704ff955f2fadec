"""On a CUDA GPU: training against the CPU's values and gradients, routed evaluation against the
reference, where the host waits for the GPU, and a training run end to end. Skipped where no
GPU is present (CI has none).

    pytest tests/test_cuda.py        # on a machine with a GPU
"""

import copy
import traceback
import warnings

import pytest
import torch

import instaquant as iq
from helpers import dynamic_resnet20, seeded_train_step, varied_images
from instaquant import config as C
from instaquant.builder import load_for_eval
from instaquant.engine import fit
from instaquant.evaluation import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_cuda_math():
    """No TF32 and deterministic cuDNN kernels: float64 paths compare to float64 rounding."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("method, separate", [("pact", False), ("lsq", True)])
def test_training_step_on_cuda_matches_the_cpu(method, separate):
    """The CUDA training path (the mixture) against the CPU's row-split path: same output, same
    gradient on every parameter. Eval mode, so no Gumbel noise differs between the devices."""
    cpu = dynamic_resnet20(method, separate=separate)
    x, y = varied_images(8), torch.arange(8)
    seeded_train_step(cpu, x, y)  # batch norms and quantizer ranges
    cpu.zero_grad()
    gpu = copy.deepcopy(cpu).to(CUDA)
    cpu.eval(), gpu.eval()
    out_c = seeded_train_step(cpu, x, y)
    out_g = seeded_train_step(gpu, x.to(CUDA), y.to(CUDA))
    torch.testing.assert_close(out_g.cpu(), out_c, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gpu.last.bits_w.cpu(), cpu.last.bits_w, atol=0, rtol=0)
    assert len(torch.unique(cpu.last.bits_w)) > 1, "samples should choose differently"
    grads = {n: p.grad for n, p in gpu.named_parameters() if p.grad is not None}
    for name, p in cpu.named_parameters():
        assert (p.grad is None) == (name not in grads), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name].cpu(), p.grad, atol=1e-10, rtol=1e-8, msg=name)
    assert len(grads) > 50


@pytest.mark.parametrize("batch", [1, 7])
def test_routed_eval_matches_reference_on_cuda(batch):
    fast = dynamic_resnet20("pact", device=CUDA)
    fast(varied_images(8, device=CUDA))  # training-mode pass: batch norms and quantizer ranges
    ref = copy.deepcopy(fast)
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    fast.eval(), ref.eval()
    x = varied_images(batch, seed=3, device=CUDA)
    with torch.no_grad():
        out_f, out_r = fast(x), ref(x)
    torch.testing.assert_close(out_f, out_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast.last.bits_w, ref.last.bits_w, atol=0, rtol=0)
    if batch > 1:
        assert len(torch.unique(fast.last.bits_w)) > 1, "the batch must be split to test routing"


def _host_waits(fn) -> list[str]:
    """Where ``fn`` makes the host wait for the GPU (CUDA's sync debug mode): one short stack
    per wait."""
    torch.cuda.synchronize()
    waits: list[str] = []

    def record(message, *args, **kwargs):
        if "called a synchronizing CUDA operation" in str(message):
            frames = traceback.format_stack()[:-1]
            waits.append("".join(f for f in frames if "site-packages" not in f)[-1200:])

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return waits


def test_routed_eval_waits_for_the_host_once_per_forward():
    model = dynamic_resnet20("pact", device=CUDA).float()
    x = varied_images(32, device=CUDA).float()
    seeded_train_step(model, x, torch.arange(32, device=CUDA) % 10)
    model.eval()
    with torch.no_grad():
        model(x)  # first call: lazy state settles
        waits = _host_waits(lambda: model(x))
        assert len(torch.unique(model.last.bits_w)) > 1
    # One wait to learn every layer's group sizes (instaquant.nn.routing.plan_layers), not one
    # per dynamic layer.
    assert len(waits) == 1, "\n----\n".join(waits)
    fp = iq.models.resnet20(num_classes=10)
    static = iq.static(fp, "pact", 4, example_input=torch.randn(1, 3, 16, 16))
    static = static.to(CUDA).eval()
    with torch.no_grad():
        static(x)
        waits = _host_waits(lambda: static(x))
    assert not waits, "\n----\n".join(waits)


def test_training_step_on_cuda_does_not_wait_for_the_host():
    model = dynamic_resnet20("pact", device=CUDA).float()
    x, y = varied_images(32, device=CUDA).float(), torch.arange(32, device=CUDA) % 10
    seeded_train_step(model, x, y)  # first call: lazy quantizer ranges
    waits = _host_waits(lambda: seeded_train_step(model, x, y))
    assert len(torch.unique(model.last.bits_w)) > 1
    assert not waits, "\n----\n".join(waits)


def test_training_run_on_cuda_and_its_checkpoint_on_cpu(tmp_path):
    tiny = ["data.name=digits", "data.limit=192", "data.batch_size=32", "model.name=digits_net"]
    cfg = C.from_dict(
        {"name": "dq", "out": str(tmp_path / "dq")},
        [*tiny, "recipe=dynamic", "quant.bits=[2, 3, 4]", "epochs=2", "device=cuda"],
    )
    entry = fit(cfg, progress=False)
    assert entry["bitops_rel"] > 0
    ckpt = tmp_path / "dq" / "best.pt"
    ckpt_cfg, model, extra = load_for_eval(ckpt)
    assert next(model.parameters()).is_cuda
    on_gpu = evaluate(model, extra["test_loader"], ckpt_cfg.ref_bits).metrics
    assert on_gpu["top1"] == extra["ckpt"]["metrics"]["test_top1"]
    cpu_cfg, cpu_model, cpu_extra = load_for_eval(ckpt, ["device=cpu"])
    assert not next(cpu_model.parameters()).is_cuda
    on_cpu = evaluate(cpu_model, cpu_extra["test_loader"], cpu_cfg.ref_bits).metrics
    # Different convolution kernels: a value on a quantizer's rounding boundary may move one
    # step, so a few predictions may differ, not the accuracy as a whole.
    assert abs(on_cpu["top1"] - on_gpu["top1"]) <= 3.0  # percent


def test_a_layer_policy_found_on_cuda_exports_from_the_cpu(tmp_path):
    # instaquant export --bits policy: the policy is measured where the model runs, then the
    # model moves to the CPU inside forced_bits for the export.
    from instaquant.export import export
    from instaquant.policy import layer_policy

    model = dynamic_resnet20("pact", candidate_bn=True, device=CUDA).float()
    model.train()
    model(varied_images(12, device=CUDA).float())
    model.eval()
    x = varied_images(8, seed=2, device=CUDA).float()
    bits = layer_policy(model, [(x, None)])
    with torch.no_grad(), model.forced_bits(*bits):
        expected = model(x).cpu()
        model.cpu()
        path = export(model, x.cpu(), tmp_path / "policy.pt2", "pt2")
    logits = torch.export.load(path).module()(x.cpu())[0]
    assert torch.equal(logits.argmax(1), expected.argmax(1))
