"""The torch custom ops: schema, fake (meta) kernels and AOT dispatch (torch.library.opcheck), and the
public wrappers under torch.compile(fullgraph=True)."""
import pytest
import torch

from tests.helpers import DEVICE


def varlen_args(dtype=torch.float16, sinks=True, alibi=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(19, 4, 64, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(23, 2, 64, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(23, 2, 64, generator=g).to(dtype).to(DEVICE)
    cu_q = torch.tensor([0, 7, 19], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 10, 23], dtype=torch.int32, device=DEVICE)
    s_aux = torch.randn(4, generator=g).to(DEVICE) if sinks else None
    slopes = torch.rand(4, generator=g).to(DEVICE) if alibi else None
    return (q, k, v, cu_q, cu_k, 12, 13, 0.125, True, 5, -1, 0.0, slopes, s_aux)


@pytest.mark.parametrize("case", ["varlen+sinks", "varlen+alibi", "batched"])
def test_opcheck(fa, case):
    op = fa._ops.ops.flash_attn_varlen.default
    if case == "batched":
        q = torch.randn(2, 9, 4, 64, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
        args = (q, q[:, :, :2], q[:, :, :2], None, None, -1, -1, 0.125, False, -1, -1, 30.0, None, None)
    else:
        args = varlen_args(sinks=case == "varlen+sinks", alibi=case == "varlen+alibi")
    torch.library.opcheck(op, args)


def test_op_namespace_comes_from_the_build(fa):
    """Ops live in the namespace the builder generated (never a hard-coded one)."""
    namespace = fa._ops.add_op_namespace_prefix("flash_attn_varlen").split("::")[0]
    assert namespace.startswith("_metal_flash_sdpa_")
    assert getattr(torch.ops, namespace).flash_attn_varlen is fa._ops.ops.flash_attn_varlen


def test_compiled_varlen_matches_eager(fa):
    q, k, v, cu_q, cu_k, *_ = varlen_args()
    s_aux = torch.randn(4, device=DEVICE)

    def attend(q, k, v, cu_q, cu_k, s_aux, max_q, max_k):
        return fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(5, 5),
                                         s_aux=s_aux)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    expected = attend(q, k, v, cu_q, cu_k, s_aux, 12, 13)
    assert torch.equal(compiled(q, k, v, cu_q, cu_k, s_aux, 12, 13), expected)
    # transformers' packed path hands max_seqlen over as 0-d tensors
    assert torch.equal(compiled(q, k, v, cu_q, cu_k, s_aux, torch.tensor(12), torch.tensor(13)), expected)


def test_compiled_batched_on_transposed_views(fa):
    """flash_attn_func on transposed views inside a compiled function, as a model's attention layer."""
    x = torch.randn(2, 4, 16, 64, device=DEVICE)

    def layer(x):
        q = x * 0.5
        return fa.flash_attn_func(q.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2), causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))
