"""Quantizers against their closed forms (exact), levels, STE and learned-parameter gradients."""

import pytest
import torch

from instaquant.quant import functional as Fq
from instaquant.quant import inference as Iq
from instaquant.quant.methods import (
    LSQActivation,
    LSQWeight,
    PACTActivation,
    make_activation_quantizer,
)

EXACT = dict(atol=0, rtol=0)
ALL_BITS = range(1, 9)


def _randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("bits", ALL_BITS)
def test_dorefa_weight_closed_form(bits):
    w = _randn(64, 32, 3, 3, seed=bits, scale=0.3)
    got = Fq.dorefa_weight(w, bits)
    if bits == 1:
        sign = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
        expected = sign * w.abs().mean()
    else:
        t = torch.tanh(w)
        unit = t / (2 * t.abs().max()) + 0.5
        n = 2**bits - 1
        expected = 2 * (torch.round(n * unit) / n) - 1
    torch.testing.assert_close(got, expected, **EXACT)
    assert got.unique().numel() <= 2**bits


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_dorefa_activation_closed_form(bits, signed):
    x = _randn(8, 16, 5, 5, seed=bits, scale=1.5)
    n = 2**bits - 1
    if signed:
        expected = 2 * (torch.round(n * ((torch.clamp(x, -1, 1) + 1) / 2)) / n) - 1
    else:
        expected = torch.round(n * torch.clamp(x, 0, 1)) / n
    got = Fq.dorefa_activation(x, bits, signed)
    torch.testing.assert_close(got, expected, **EXACT)
    assert got.unique().numel() <= 2**bits
    if signed:
        assert (got < 0).any(), "a signed quantizer must keep negative inputs"


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_pact_closed_form(bits, signed):
    x = _randn(8, 16, 5, 5, seed=bits, scale=3.0)
    alpha = torch.tensor(2.5)
    n = 2**bits - 1
    if signed:
        step = 2 * alpha / n
        expected = torch.round((torch.clamp(x, -alpha, alpha) + alpha) / step) * step - alpha
    else:
        step = alpha / n
        expected = torch.round(torch.clamp(x, 0, alpha) / step) * step
    got = Fq.pact_activation(x, alpha, bits, signed)
    torch.testing.assert_close(got, expected, **EXACT)
    assert got.unique().numel() <= 2**bits


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_closed_form(bits, signed):
    if signed and bits == 1:
        with pytest.raises(ValueError, match="signed LSQ needs bits >= 2"):
            Fq.lsq_bounds(bits, signed)
        return
    v = _randn(8, 16, 5, 5, seed=bits, scale=2.0)
    if not signed:
        v = v.relu()
    step = torch.tensor(0.37)
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    expected = torch.round(torch.clamp(v / step, -q_n, q_p)) * step
    got = Fq.lsq(v, step, bits, signed)
    torch.testing.assert_close(got, expected, **EXACT)
    assert got.unique().numel() <= 2**bits


def test_ste_gradients_pass_inside_and_stop_outside_the_range():
    x = torch.linspace(-1.7, 1.7, 101, dtype=torch.float64).requires_grad_()
    Fq.dorefa_activation(x, 3).sum().backward()
    torch.testing.assert_close(x.grad, ((x >= 0) & (x <= 1)).double(), **EXACT)

    x.grad = None
    Fq.dorefa_activation(x, 3, signed=True).sum().backward()
    torch.testing.assert_close(x.grad, ((x >= -1) & (x <= 1)).double(), **EXACT)

    r = torch.randn(50).requires_grad_()
    Fq.round_ste(r).sum().backward()
    torch.testing.assert_close(r.grad, torch.ones(50), **EXACT)


def test_dorefa_weight_gradient_is_ste_through_tanh():
    w = _randn(100, seed=3).double().requires_grad_()
    Fq.dorefa_weight(w, 4).sum().backward()
    t = torch.tanh(w.detach())
    expected = (1 - t * t) / t.abs().max()  # d/dw [2 (tanh w / (2M) + 1/2) - 1], M held fixed
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_alpha_gradient_matches_paper(signed):
    # PACT: d y_q / d alpha = 1 where x >= alpha (and -1 where x <= -alpha when signed), else 0.
    x = _randn(1000, seed=7, scale=3.0).double()
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    upstream = _randn(1000, seed=8).double()
    (Fq.pact_activation(x, alpha, 4, signed) * upstream).sum().backward()
    expected = upstream[x >= 1.3].sum()
    if signed:
        expected = expected - upstream[x <= -1.3].sum()
    torch.testing.assert_close(alpha.grad, expected)


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_step_gradient_matches_paper(signed):
    bits = 3
    v = _randn(2000, seed=9, scale=2.0).double()
    step = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    upstream = _randn(2000, seed=10).double()
    (Fq.lsq(v, step, bits, signed) * upstream).sum().backward()
    q_n, q_p = (4, 3) if signed else (0, 7)
    r = v / 0.4
    per_element = torch.where(
        r <= -q_n,
        torch.full_like(r, -q_n),
        torch.where(r >= q_p, torch.full_like(r, q_p), -r + torch.round(r)),
    )
    g = 1 / (v.numel() * q_p) ** 0.5
    torch.testing.assert_close(step.grad, g * (upstream * per_element).sum())


def test_lsq_activation_step_gradient_counts_one_samples_features():
    # N_F of the LSQ paper: the step's gradient scale is 1/sqrt(C*H*W*Q_P) whatever the batch,
    # so a batch of two identical halves gives exactly twice one half's gradient.
    from instaquant.quant.methods import LSQActivation, LSQWeight

    half = _randn(3 * 4 * 5, seed=11, scale=2.0).double().view(1, 3, 4, 5).abs()
    grads = []
    for batch in (half, torch.cat([half, half])):
        q = LSQActivation((3,)).double()
        q.step.data.fill_(0.4)
        q.set_initialized(True)
        q(batch, 0).sum().backward()
        grads.append(q.step.grad.clone())
    torch.testing.assert_close(grads[1], 2 * grads[0], atol=1e-12, rtol=0)
    step = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    Fq.lsq(half, step, 3, False, features=60).sum().backward()
    torch.testing.assert_close(grads[0], step.grad.view(1), atol=0, rtol=0)
    # Weights keep N = every element of the tensor.
    w = LSQWeight((3,)).double()
    w.step.data.fill_(0.4)
    w.set_initialized(True)
    w(half, 0).sum().backward()
    step = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    Fq.lsq(half, step, 3, True).sum().backward()
    torch.testing.assert_close(w.step.grad, step.grad.view(1), atol=0, rtol=0)


def test_lsq_gradient_wrt_input_is_clipped_ste():
    v = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_()
    step = torch.tensor(0.5, dtype=torch.float64)
    Fq.lsq(v, step, 2, signed=True).sum().backward()  # range [-2, 1] steps of 0.5 → [-1, 0.5]
    torch.testing.assert_close(v.grad, ((v >= -1.0) & (v <= 0.5)).double(), **EXACT)


def test_lsq_init_from_first_tensor_per_candidate():
    bits = (2, 3, 4)
    v = _randn(4, 8, 6, 6, seed=11).relu()
    q = LSQActivation(bits, signed=False)
    q(v, 1)
    for k, b in enumerate(bits):
        expected = 2 * v.abs().mean() / (2**b - 1) ** 0.5
        torch.testing.assert_close(q.step[k], expected, **EXACT)
    w = _randn(16, 8, 3, 3, seed=12)
    qw = LSQWeight(bits)
    qw(w, 0)
    torch.testing.assert_close(qw.step[2], 2 * w.abs().mean() / (2**3 - 1) ** 0.5, **EXACT)


def test_per_candidate_and_shared_parameters():
    assert PACTActivation((3, 4, 5)).alpha.shape == (3,)
    assert PACTActivation((3, 4, 5), share=True).alpha.shape == (1,)
    q = PACTActivation((3, 4, 5), alpha_init=2.0)
    x = _randn(100, seed=1, scale=4).requires_grad_()
    q(x, 2).sum().backward()
    assert q.alpha.grad[2] != 0 and q.alpha.grad[0] == 0 and q.alpha.grad[1] == 0


def test_lsq_init_is_finite_on_zeros():
    q = LSQActivation((2, 4))
    out = q(torch.zeros(10), 0)
    assert torch.isfinite(q.step).all() and torch.isfinite(out).all()


# --------------------------------------------------------------------------- evaluation form


def _inference_cases(bits, signed):
    """(inference function, closed form) pairs on the same arguments."""
    alpha = torch.tensor(1.3)
    step = torch.tensor(0.21)
    return {
        "dorefa": (
            lambda x, inplace: Iq.dorefa_activation(x, bits, signed, inplace),
            lambda x: Fq.dorefa_activation(x, bits, signed),
        ),
        "pact": (
            lambda x, inplace: Iq.pact_activation(x, alpha, bits, signed, inplace),
            lambda x: Fq.pact_activation(x, alpha, bits, signed),
        ),
        "lsq": (
            lambda x, inplace: Iq.lsq(x, step, bits, signed, inplace),
            lambda x: Fq.lsq(x, step, bits, signed),
        ),
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
@pytest.mark.parametrize("inplace", [False, True])
def test_inference_form_equals_the_closed_form(bits, signed, method, inplace):
    infer, closed = _inference_cases(bits, signed)[method]
    x = _randn(6, 8, 5, 5, seed=bits, scale=1.5)
    expected = closed(x)
    given = x.clone()
    got = infer(given, inplace)
    torch.testing.assert_close(got, expected, **EXACT)
    if inplace:
        assert got.data_ptr() == given.data_ptr(), "inplace must reuse the input's memory"
    else:
        torch.testing.assert_close(given, x, **EXACT)  # the input is left as it was


@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq", "lqnets"])
def test_quantizer_infer_equals_forward(method):
    q = make_activation_quantizer(method, (2, 4), signed=False)
    x = _randn(4, 3, 6, 6, seed=3, scale=2.0)
    with torch.no_grad():
        q(x, 0)  # lazy initialisation from a first batch, as in training
        q.eval()
        for k in range(2):
            torch.testing.assert_close(q.infer(x.clone(), k, inplace=True), q(x, k), **EXACT)


def test_lazy_init_check_follows_buffer_writes():
    q = PACTActivation((2, 4))
    x = _randn(64, seed=4, scale=3.0).abs()
    q(x, 0)
    assert q.all_initialized()
    with torch.no_grad():
        q.alpha.fill_(7.0)
        q.initialized.fill_(False)  # e.g. a state dict of a fresh model loaded in place
    q(x, 0)
    assert float(q.alpha.detach()[0]) != 7.0, "a reset buffer must trigger initialisation again"
