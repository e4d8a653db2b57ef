"""The eager fast path of SparseLinear.forward / sparsekit.linear (ops.fast_launcher and the
BoundMatrix runner): it serves the common call, gives bit for bit what the general path gives,
steps aside for everything else (so checks and messages stay the general path's) and notices
replaced or edited buffers."""

from __future__ import annotations

import copy
import io

import pytest

C = pytest.importorskip("sparsekit._C")
torch = pytest.importorskip("torch")

from reference import assert_close_to_reference, random_pruned, random_x  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit import ops  # noqa: E402
from sparsekit.nn import SparseLinear  # noqa: E402


def _layer(m=33, k=70, seed=3, bias=True):
    lin = torch.nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(random_pruned(m, k, 0.8, seed=seed))
    return SparseLinear.from_dense(lin)


def _general(x, mat, bias):
    """The general path, bypassing the launcher."""
    M, K = mat.shape
    cdt, b = ops.plan_linear(x, K, M, mat.values, bias)
    return ops.launch_linear(x, mat, b, "auto", cdt)


def _no_general_path(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("general path taken")

    monkeypatch.setattr(ops, "linear_matrix", fail)
    monkeypatch.setattr(ops, "launch_linear", fail)


def test_runner_matches_run_and_checks_arguments():
    sl = _layer()
    mat = sl.matrix
    with torch.no_grad():
        sl(random_x((1, 70), seed=0))
    from sparsekit.kernels.cpp import bound_matrix

    bm = bound_matrix(mat)
    run = bm.runner()
    del bm  # the runner keeps the bound matrix alive
    x = random_x((1, 70), seed=1)
    out = torch.empty(1, 33)
    assert run(x.data_ptr(), out.data_ptr(), 1, 0, 0, 1) is True
    assert_close_to_reference(out, x, mat.to_dense())
    assert torch.equal(out, _general(x, mat, None))
    with pytest.raises(TypeError, match="run: expected 6 or 7 positional arguments"):
        run(x.data_ptr(), out.data_ptr(), 1, 0, 0)
    with pytest.raises(TypeError):
        run(x.data_ptr(), out.data_ptr(), "1", 0, 0, 1)
    with pytest.raises(ValueError, match="x_dtype: expected code 0"):
        run(x.data_ptr(), out.data_ptr(), 1, 5, 0, 1)
    with pytest.raises(ValueError, match="n: expected a non-negative batch size, got -1"):
        run(x.data_ptr(), out.data_ptr(), -1, 0, 0, 1)
    with pytest.raises(ValueError, match="x / out: expected non-null"):
        run(0, out.data_ptr(), 1, 0, 0, 1)
    with pytest.raises(ValueError, match="num_threads"):
        run(x.data_ptr(), out.data_ptr(), 1, 0, 0, 0)
    with pytest.raises(OverflowError):
        run(-1, out.data_ptr(), 1, 0, 0, 1)


@pytest.mark.parametrize("shape", [(1, 70), (7, 70), (70,), (2, 3, 70), (1, 1, 70)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_linear_fast_path_bit_identical(shape, with_bias, monkeypatch):
    sl = _layer(bias=with_bias)
    with torch.no_grad():
        for i in range(3):  # bind, build the launcher, enable the fast path
            sl(random_x(shape, seed=10 + i))
    assert sl._fast is not None
    x = random_x(shape, seed=1)
    mat = sl.matrix
    bias = None if sl.bias is None else sl.bias.detach()
    want = _general(x, mat, bias)
    _no_general_path(monkeypatch)
    with torch.inference_mode():
        y = sl(x)
    assert y.shape == (*shape[:-1], 33) and y.dtype == torch.float32
    assert torch.equal(y, want)
    assert_close_to_reference(y, x, mat.to_dense(), bias)
    with torch.no_grad():
        assert torch.equal(sl(x), want)
        assert torch.equal(sparsekit.linear(x, mat, bias), want)


def test_fast_path_steps_aside_with_the_general_messages():
    sl = _layer()
    with torch.no_grad():
        for i in range(3):
            sl(random_x((1, 70), seed=i))
        assert sl._fast is not None
        with pytest.raises(ValueError, match=r"x: expected last dimension == weight "
                                             r"in_features = 70, got shape \(1, 69\)"):
            sl(torch.zeros(1, 69))
        with pytest.raises(TypeError, match="x: expected dtype float32, bfloat16 or float16, "
                                            "got torch.float64"):
            sl(torch.zeros(1, 70, dtype=torch.float64))
        with pytest.raises(TypeError, match="x: expected dtype"):
            sparsekit.linear(torch.zeros(1, 70, dtype=torch.int32), sl.matrix)
        with pytest.raises(TypeError, match="bias: expected a torch.Tensor or None, got list"):
            sparsekit.linear(torch.zeros(1, 70), sl.matrix, [0.0] * 33)
        with pytest.raises(ValueError, match=r"bias: expected shape \(33,\), got \(3,\)"):
            sparsekit.linear(torch.zeros(1, 70), sl.matrix, torch.zeros(3))
        sl.bias.data = torch.zeros(3)
        with pytest.raises(ValueError, match=r"bias: expected shape \(33,\), got \(3,\)"):
            sl(torch.zeros(1, 70))
        # general-path cases the launcher does not take: still right
        sl.bias.data = random_x((33,), seed=4).half()
        for x in (random_x((70, 4), seed=5).t(), random_x((2, 70), seed=6, dtype=torch.bfloat16),
                  torch.zeros(0, 70)):
            y = sl(x)
            b = sl.bias.detach()
            assert torch.equal(y, _general(x, sl.matrix, b))
            assert_close_to_reference(y, x, sl.matrix.to_dense(), b.float())


def test_fast_path_notices_edited_and_replaced_buffers():
    sl = _layer()
    x = random_x((1, 70), seed=2)
    with torch.no_grad():
        for _ in range(3):
            sl(x)
        assert sl._fast is not None
        sl.weight_values.mul_(2.0)  # in place: version counter
        y = sl(x)
        assert_close_to_reference(y, x, sl.matrix.to_dense(), sl.bias)
        for _ in range(3):
            assert torch.equal(sl(x), y)
        other = _layer(seed=9)
        sl.load_state_dict(other.state_dict())  # new buffers
        y = sl(x)
        assert torch.equal(y, other(x))
        assert_close_to_reference(y, x, other.matrix.to_dense(), other.bias)
        sl.to(torch.bfloat16)  # replaced buffers of another dtype
        xb = x.bfloat16()
        for _ in range(3):
            y = sl(xb)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, _general(xb, sl.matrix, sl.bias.detach()))


def test_fast_path_autograd_still_goes_through_the_op():
    sl = _layer()
    with torch.no_grad():
        for i in range(3):
            sl(random_x((1, 70), seed=i))
    x = random_x((2, 70), seed=3).requires_grad_()
    y = sl(x)
    assert y.requires_grad
    y.sum().backward()
    dense = sl.matrix.to_dense()
    torch.testing.assert_close(x.grad, dense.sum(0).expand(2, 70), rtol=1e-5, atol=1e-5)
    assert sl.bias.grad is not None


def test_warm_module_pickles_and_copies():
    sl = _layer()
    x = random_x((1, 70), seed=7)
    with torch.no_grad():
        for _ in range(3):
            y = sl(x)
        assert sl._fast is not None
        buf = io.BytesIO()
        torch.save(sl, buf)
        buf.seek(0)
        for clone in (copy.deepcopy(sl), torch.load(buf, weights_only=False)):
            assert clone._fast is None
            for _ in range(3):
                assert torch.equal(clone(x), y)


def test_module_built_in_inference_mode():
    with torch.inference_mode():
        sl = _layer()
        x = random_x((1, 70), seed=8)
        for _ in range(3):
            y = sl(x)
        assert sl._fast is not None and sl._fast[3] is None
        assert torch.equal(y, _general(x, sl.matrix, sl.bias))
        assert_close_to_reference(y, x, sl.matrix.to_dense(), sl.bias)
        sl.weight_values.mul_(-1.0)  # no version counter: invalidate explicitly
        sl.matrix.cache_invalidate()
        y2 = sl(x)
        assert_close_to_reference(y2, x, sl.matrix.to_dense(), sl.bias)
        assert not torch.equal(y2, y)
