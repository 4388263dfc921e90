import pytest
import torch

from lit_flash.optim import clip_grad_norm


def _params_with_grads(scale: float, dtypes: tuple[torch.dtype, ...]) -> list[torch.nn.Parameter]:
    shapes = [(50, 30), (30,), (7, 7, 3), (4,)]
    params = [torch.nn.Parameter(torch.randn(s).to(dtypes[i % len(dtypes)])) for i, s in enumerate(shapes)]
    for p in params[:-1]:  # the last has no gradient (a frozen or unused parameter)
        p.grad = torch.randn_like(p) * scale
    return params


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64)])
def test_clip_grad_norm_equals_torch(scale, dtypes):
    torch.manual_seed(0)
    ours = _params_with_grads(scale, dtypes)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, theirs, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    norm = clip_grad_norm(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
    assert torch.equal(norm.double(), expected.double())
    for p, q in zip(ours, theirs, strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ours if p.grad is not None]))
    assert float(clipped) == pytest.approx(min(1.0, float(expected)), rel=1e-5)
