"""On a CUDA GPU: the fast execution against the reference, routed evaluation's host waits, and
a training run end to end. Skipped where no GPU is present (CI has none).

    pytest tests/test_cuda.py        # on a machine with a GPU
"""

import copy
import warnings

import pytest
import torch

import instaquant as iq
from helpers import assert_models_match, dynamic_resnet20, seeded_train_step, varied_images
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


def test_train_step_matches_reference_on_cuda():
    fast = dynamic_resnet20("pact", device=CUDA)
    x, y = varied_images(8, device=CUDA), torch.arange(8, device=CUDA)
    rec = assert_models_match(fast, copy.deepcopy(fast), x, y, out_tol=dict(atol=1e-12, rtol=0))
    assert torch.unique(rec.bits_w, dim=0).shape[0] > 1, "samples should choose differently"
    assert fast.controller.fc2.weight.grad.abs().sum() > 0


def test_separate_choice_matches_reference_on_cuda():
    fast = dynamic_resnet20("lsq", separate=True, device=CUDA)
    x, y = varied_images(6, device=CUDA), torch.arange(6, device=CUDA)
    assert_models_match(fast, copy.deepcopy(fast), x, y, out_tol=dict(atol=1e-12, rtol=0))


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


def _host_waits(fn) -> int:
    """How many times ``fn`` makes the host wait for the GPU (CUDA's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_routed_eval_waits_for_the_host_once_per_forward():
    model = dynamic_resnet20("pact", device=CUDA).float()
    x = varied_images(32, device=CUDA).float()
    seeded_train_step(model, x, torch.arange(32, device=CUDA) % 10)
    model.eval()
    with torch.no_grad():
        model(x)  # first call: lazy state settles
        waits = _host_waits(lambda: model(x))
        assert len(torch.unique(model.last.bits_w)) > 1
    # One wait to learn every layer's group sizes (instaquant.routing.plan_layers), not one
    # per dynamic layer.
    assert waits == 1, waits
    fp = iq.models.resnet20(num_classes=10)
    static = iq.static(fp, "pact", 4, example_input=torch.randn(1, 3, 16, 16))
    static = static.to(CUDA).eval()
    with torch.no_grad():
        static(x)
        assert _host_waits(lambda: static(x)) == 0


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
