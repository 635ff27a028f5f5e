import pytest
import torch
from reference import naive_block

from models.nested import ExpertRows, NestedBlock, nested_in, nested_out_residual

BOUNDS = [
    ((0, 3, 2), (3, 7, 4), (7, 9, 8), (9, 12, 16)),  # every expert present
    ((0, 5, 4), (5, 12, 8)),  # some experts empty, no full expert
    ((0, 12, 16),),  # dense
]


@pytest.mark.parametrize("bounds", BOUNDS)
def test_nested_in_gradcheck(bounds):
    torch.manual_seed(0)
    args = [torch.randn(s, dtype=torch.double, requires_grad=True) for s in ((12, 16), (24, 16), (24,))]
    assert torch.autograd.gradcheck(lambda x, w, b: nested_in(x, w, b, bounds), args, fast_mode=True)


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("scaled", [False, True])
def test_nested_out_residual_gradcheck(bounds, scaled):
    torch.manual_seed(0)
    shapes = [(12, 16), (12, 24), (16, 24), (16,)] + ([(12,)] if scaled else [])
    args = [torch.randn(s, dtype=torch.double, requires_grad=True) for s in shapes]

    def f(x, h, w, b, s=None):
        return nested_out_residual(x, h, w, b, bounds, s)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_nested_in_matches_sliced_linear():
    torch.manual_seed(0)
    x, w, b = torch.randn(12, 16), torch.randn(24, 16), torch.randn(24)
    y = nested_in(x, w, b, BOUNDS[0])
    for a, e, d in BOUNDS[0]:
        torch.testing.assert_close(y[a:e], x[a:e, :d] @ w[:, :d].T + b)


def _grouped_block_case(seed=0, S=10, G=3, D=32, heads=4):
    torch.manual_seed(seed)
    blk = NestedBlock(D, heads).double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    counts = (4, 3, 2, 1)  # rows per group for each expert (sequence-first, grouped)
    widths = (D // 8, D // 4, D // 2, D)
    bounds, start = [], 0
    for k, d in zip(counts, widths, strict=True):
        bounds.append((start * G, (start + k) * G, d))
        start += k
    row_width = torch.tensor([d for k, d in zip(counts, widths, strict=True) for _ in range(k)])  # (S,)
    gate = 1 + 0.5 * torch.rand(S, G, dtype=torch.double)
    x = torch.randn(S, G, D, dtype=torch.double)
    return blk, x, ExpertRows(tuple(bounds), gate, batch=G), row_width


def test_block_matches_naive_masked_reference():
    blk, x, rows, row_width = _grouped_block_case()
    out = blk(x, rows)  # (S, G, D)
    S, G, _ = x.shape
    ref = naive_block(blk, x.transpose(0, 1), row_width.expand(G, S), rows.gate.t())  # (G, S, D)
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-10, atol=1e-10)


def test_token_on_expert_i_changes_only_first_d_i_channels():
    blk, x, rows, row_width = _grouped_block_case(seed=1)
    delta = blk(x, rows) - x  # (S, G, D)
    for s, d in enumerate(row_width.tolist()):
        assert torch.all(delta[s, :, d:] == 0)
        assert torch.all(delta[s, :, :d].abs().sum(-1) > 0)


def test_block_backward_matches_reference():
    blk, x, rows, row_width = _grouped_block_case(seed=2)
    x.requires_grad_(True)
    S, G, _ = x.shape
    blk(x, rows).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in blk.parameters()]
    x.grad = None
    blk.zero_grad()
    naive_block(blk, x.transpose(0, 1), row_width.expand(G, S), rows.gate.t()).square().sum().backward()
    want = [x.grad] + [p.grad for p in blk.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_drop_path_drops_whole_samples():
    blk, x, rows, _ = _grouped_block_case(seed=3, G=4)
    blk.drop_path = 0.5
    blk.train()
    torch.manual_seed(0)
    delta = (blk(x, ExpertRows(rows.bounds, rows.gate, batch=2)) - x).abs().sum((0, 2))  # (G,)
    # frames of one sample (G = 2 samples x 2 frames) are kept or dropped together
    assert (delta[0] == 0) == (delta[1] == 0) and (delta[2] == 0) == (delta[3] == 0)
    blk.eval()
    assert torch.equal(blk(x, rows), blk(x, rows))


def test_inference_path_equals_autograd_path_and_leaves_input():
    blk, x, rows, _ = _grouped_block_case(seed=4)
    want = blk(x, rows)  # parameters require grad: the autograd Functions
    with torch.no_grad():
        x0 = x.clone()
        got = blk(x, rows)  # in-place residual on a private copy
        assert torch.equal(x, x0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        buf = x.clone()
        out = blk(buf, rows, inplace=True)
        assert out.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
