"""Every input a user can get wrong gets a clear Python error naming the argument (DESIGN.md section 4),
never a crash, an out-of-bounds access or a silently wrong answer."""
import pytest
import torch

from tests.helpers import DEVICE, HEAD_DIMS, SIMULATED


def inputs(total_q=10, total_k=12, H=4, Hkv=2, D=64, dtype=torch.float16, seqlens=((4, 6), (5, 7))):
    q = torch.randn(total_q, H, D, dtype=dtype, device=DEVICE)
    k = torch.randn(total_k, Hkv, D, dtype=dtype, device=DEVICE)
    v = torch.randn(total_k, Hkv, D, dtype=dtype, device=DEVICE)
    cu_q = torch.tensor([0, *torch.tensor(seqlens[0]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(seqlens[1]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=7)


def call(fa, **changes):
    args = inputs()
    args.update(changes)
    return fa.flash_attn_varlen_func(**args)


def test_good_call_works(fa):
    assert call(fa).shape == (10, 4, 64)


CASES = {
    # name: (changes, exception, words the message must contain)
    "int dtype": (lambda a: dict(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, ["q", "dtype"]),
    "float64": (lambda a: dict(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, ["torch.float16"]),
    "mixed dtypes": (lambda a: dict(k=a["k"].float()), TypeError, ["same dtype"]),
    "wrong device": (lambda a: dict(k=a["k"].to("meta")), ValueError, ["k is on meta"]),
    "q rank": (lambda a: dict(q=a["q"][None]), ValueError, ["q must be [total_tokens, heads, head_dim]"]),
    "v shape": (lambda a: dict(v=a["v"][:, :1]), ValueError, ["v must have the shape of k"]),
    "head dim mismatch": (lambda a: dict(k=a["k"][..., :32], v=a["v"][..., :32]), ValueError, ["head_dim"]),
    "unsupported head dim": (lambda a: dict(q=a["q"][..., :48], k=a["k"][..., :48], v=a["v"][..., :48]),
                             NotImplementedError, ["head_dim 48", ", ".join(map(str, HEAD_DIMS))]),
    "H % Hkv": (lambda a: dict(q=a["q"][:, :3]), ValueError, ["multiple of the number of key/value heads"]),
    "cu_seqlens int64": (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, ["cu_seqlens_q", "int32"]),
    "cu_seqlens 2-D": (lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][None]), ValueError, ["cu_seqlens_k", "1-D"]),
    "cu_seqlens lengths differ": (lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][:2]), ValueError, ["[batch + 1]"]),
    "cu_seqlens decreasing": (lambda a: dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32, device=DEVICE)),
                              ValueError, ["non-decreasing"]),
    "cu_seqlens last != total": (lambda a: dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32,
                                                                         device=DEVICE)),
                                 ValueError, ["cu_seqlens_q[-1] = 9", "number of tokens (10)"]),
    "cu_seqlens first != 0": (lambda a: dict(cu_seqlens_k=torch.tensor([1, 5, 12], dtype=torch.int32, device=DEVICE)),
                              ValueError, ["cu_seqlens_k[0] must be 0"]),
    "cu_seqlens not a tensor": (lambda a: dict(cu_seqlens_q=[0, 4, 10]), TypeError, ["cu_seqlens_q"]),
    "max_seqlen_q too small": (lambda a: dict(max_seqlen_q=5), ValueError, ["max_seqlen_q = 5", "longest", "(6)"]),
    "max_seqlen_k too small": (lambda a: dict(max_seqlen_k=3), ValueError, ["max_seqlen_k = 3"]),
    "max_seqlen float": (lambda a: dict(max_seqlen_q=6.0), TypeError, ["max_seqlen_q"]),
    "max_seqlen past int64": (lambda a: dict(max_seqlen_k=2**70), ValueError, ["max_seqlen_k", "64-bit"]),
    "q not a tensor": (lambda a: dict(q=a["q"].tolist()), TypeError, ["q must be a torch.Tensor"]),
    "window < -1": (lambda a: dict(window_size=(-2, 0)), ValueError, ["window_size", ">= -1"]),
    "window length": (lambda a: dict(window_size=(3,)), ValueError, ["window_size must be (left, right)"]),
    "s_aux shape": (lambda a: dict(s_aux=torch.zeros(3, device=DEVICE)), ValueError, ["s_aux", "[num_heads] = [4]"]),
    "s_aux int": (lambda a: dict(s_aux=torch.zeros(4, dtype=torch.int32, device=DEVICE)), TypeError, ["s_aux"]),
    "alibi shape": (lambda a: dict(alibi_slopes=torch.zeros(3, 4, device=DEVICE)), ValueError, ["alibi_slopes"]),
    "alibi dtype": (lambda a: dict(alibi_slopes=torch.zeros(4, dtype=torch.float16, device=DEVICE)), TypeError,
                    ["alibi_slopes", "float32"]),
    "dropout": (lambda a: dict(dropout_p=0.1), NotImplementedError, ["dropout_p"]),
    "negative softcap": (lambda a: dict(softcap=-1.0), ValueError, ["softcap"]),
    "block_table with packed k/v": (lambda a: dict(block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)),
                                    ValueError, ["with block_table, k and v must be paged caches"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_a_clear_error(fa, case):
    make_changes, exception, words = CASES[case]
    with pytest.raises(exception) as info:
        call(fa, **make_changes(inputs()))
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_flash_attn_func_bad_input(fa):
    q = torch.randn(2, 8, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="batch size"):
        fa.flash_attn_func(q, q[:1], q[:1])
    with pytest.raises(ValueError, match=r"q must be \[batch, seqlen, heads, head_dim\]"):
        fa.flash_attn_func(q[0], q[0], q[0])
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa.flash_attn_func(q, q, q, dropout_p=0.5)


def test_understated_max_seqlen_never_drops_rows(fa):
    """The op itself (below the wrapper) given max_seqlen_q = -1 ("unknown", as under torch.compile) still
    covers every row: the grid comes from the real lengths."""
    a = inputs(seqlens=((1, 9), (5, 7)))
    ops = fa._ops.ops
    out, _ = ops.flash_attn_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], -1, -1, 0.125, True,
                                   -1, -1, 0.0, None, None)
    ref = fa.flash_attn_varlen_func(**{**a, "max_seqlen_q": 9}, softmax_scale=0.125, causal=True)
    assert torch.equal(out, ref)


def test_bad_input_under_the_wrapper_is_caught_by_the_op(fa):
    """Calling the op directly gets the same checks (they live in C++, shared with the meta kernel)."""
    a = inputs()
    with pytest.raises(ValueError, match="window_size entries must be >= -1"):
        fa._ops.ops.flash_attn_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 7, 0.125,
                                      False, -5, -1, 0.0, None, None)
    meta = {n: t.to("meta") for n, t in a.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(NotImplementedError, match="head_dim 48"):
        fa._ops.ops.flash_attn_varlen(meta["q"][..., :48], meta["k"][..., :48], meta["v"][..., :48],
                                      meta["cu_seqlens_q"], meta["cu_seqlens_k"], 6, 7, 0.125, False, -1, -1, 0.0,
                                      None, None)


@pytest.mark.parametrize("dims", [(512, 512), (192, 128), (576, 512)], ids=lambda d: f"{d[0]}x{d[1]}")
def test_backward_op_rejects_forward_only_head_dims(fa, dims):
    """The backward op called directly (below the autograd wrapper) refuses the forward's wide heads and (q/k, v)
    pairs with the C++ check the meta kernel shares: the message names both head dims and the backward's list; no
    kernel is launched."""
    D, DV = dims
    q, k = torch.randn(1, 6, 2, D, device=DEVICE), torch.randn(1, 6, 2, D, device=DEVICE)
    v = out = torch.randn(1, 6, 2, DV, device=DEVICE)
    lse = torch.randn(1, 2, 6, device=DEVICE)
    message = (rf"the backward has no kernel for head_dim {D} \(q, k\) and head_dim_v {DV} \(v\); its head dims "
               rf"\(q, k and v alike\): {', '.join(map(str, HEAD_DIMS))}\. Wider heads")
    args = (None, None, None, -1, -1, None, True, -1, -1, 0.0, None, None, 0, [True, True, True])
    if SIMULATED:
        fa.simulator_counters(reset=True)
    with pytest.raises(NotImplementedError, match=message):
        fa._ops.ops.flash_attn_varlen_backward(out, q, k, v, out, lse, *args)
    if SIMULATED:
        assert fa.simulator_counters().get("launches", 0) == 0   # no launch: no key
    meta = [t.to("meta") for t in (out, q, k, v, out, lse)]
    with pytest.raises(NotImplementedError, match=message):
        fa._ops.ops.flash_attn_varlen_backward(*meta, *args)
