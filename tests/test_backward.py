"""The fused backward (backward.metal) through autograd on the public wrappers: dq, dk, dv and d s_aux against
float64 autograd through the reference, with flash-attn's tolerance rule (the kernel's error is within 2x of the
error of the same computation in plain PyTorch at the inputs' dtype, plus a small atol); gradcheck; determinism;
the band proof from the work counters; O(n) memory on meta tensors."""
import pytest
import torch

from tests.helpers import DEVICE, DTYPES, HEAD_DIMS
from tests.reference import attention_reference, visible_keys

GRADS = ["dq", "dk", "dv", "ds_aux"]


def make_inputs(seqlens_q, seqlens_k, H, Hkv, D, dtype, seed=0, sinks=False):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), H, D, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    dout = torch.randn(q.shape, generator=g).to(dtype)
    s_aux = torch.randn(H, generator=g) if sinks else None
    return q, k, v, dout, cu_q, cu_k, s_aux


def reference_grads(q, k, v, dout, cu_q, cu_k, s_aux, dtype, dlse=None, **kw):
    """Gradients of sum(out * dout) (+ sum(lse * dlse)) through the reference computed in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    sinks = s_aux.detach().to(dtype).requires_grad_(True) if s_aux is not None else None
    out, lse = attention_reference(*leaves, cu_q, cu_k, sinks=sinks, dtype=dtype, **kw)
    loss = (out * dout.to(dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([sinks] if sinks is not None else []))
    return dict(zip(GRADS, [g.double() for g in grads]))


def kernel_grads(fa, q, k, v, dout, cu_q, cu_k, s_aux, dlse=None, **kw):
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    sinks = s_aux.to(DEVICE).requires_grad_(True) if s_aux is not None else None
    lengths_q, lengths_k = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
    out, lse, _ = fa.flash_attn_varlen_func(*leaves, cu_q.to(DEVICE), cu_k.to(DEVICE), int(lengths_q.max()),
                                            int(lengths_k.max()), s_aux=sinks, return_attn_probs=True, **kw)
    loss = (out * dout.to(DEVICE)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, leaves + ([sinks] if sinks is not None else []))
    return dict(zip(GRADS, [g.cpu() for g in grads]))


def reference_kwargs(kw):
    alibi = kw.get("alibi_slopes")
    return dict(scale=kw.get("softmax_scale"), causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                softcap=kw.get("softcap", 0.0), alibi_slopes=alibi.cpu() if alibi is not None else None)


def check_grads(fa, seqlens_q, seqlens_k, H, Hkv, D, dtype, seed=0, sinks=False, with_dlse=False, **kw):
    """flash-attn's rule on every gradient: error <= 2 x plain PyTorch's error at dtype + 1e-5 (fp32: + 1e-4 rel)."""
    q, k, v, dout, cu_q, cu_k, s_aux = make_inputs(seqlens_q, seqlens_k, H, Hkv, D, dtype, seed, sinks)
    dlse = torch.randn(H, q.shape[0], generator=torch.Generator().manual_seed(seed + 1)) if with_dlse else None
    ours = kernel_grads(fa, q, k, v, dout, cu_q, cu_k, s_aux, dlse, **kw)
    ref = reference_grads(q, k, v, dout, cu_q, cu_k, s_aux, torch.float64, dlse, **reference_kwargs(kw))
    plain = reference_grads(q, k, v, dout, cu_q, cu_k, s_aux, dtype, dlse, **reference_kwargs(kw))
    report = {}
    for name, expected in ref.items():
        got = ours[name]
        assert got.shape == expected.shape and not torch.isnan(got).any(), name
        assert got.dtype == (q.dtype if name != "ds_aux" else s_aux.dtype), name
        err = (got.double() - expected).abs().max().item() if got.numel() else 0.0
        baseline = (plain[name] - expected).abs().max().item() if got.numel() else 0.0
        scale = expected.abs().max().item() if got.numel() else 0.0
        allowed = 2 * baseline + 1e-5 + (1e-4 * scale if dtype == torch.float32 else 0.0)
        assert err <= allowed, f"{name}: kernel error {err:.3g} vs plain PyTorch {baseline:.3g} (|grad| {scale:.3g})"
        report[name] = (err, baseline)
    return report


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(fa, dtype):
    check_grads(fa, [5, 40], [9, 40], 4, 2, 64, dtype, causal=True)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(fa, D):
    check_grads(fa, [37], [45], 2, 1, D, torch.float16, causal=True)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (7, 0)), (False, (5, 3)),
                                            (False, (-1, 2)), (True, (12, -1))], ids=str)
def test_masks_on_a_ragged_batch(fa, causal, window):
    """Empty and one-token sequences, queries without keys and keys without queries, Sq > Sk and Sq < Sk."""
    check_grads(fa, [0, 1, 17, 3, 50, 2], [3, 1, 30, 0, 41, 0], 2, 1, 32, torch.float32, causal=causal,
                window_size=window)


@pytest.mark.parametrize("feature", ["sinks", "softcap", "alibi", "alibi_per_seq", "sinks+softcap+window"])
def test_score_options(fa, feature):
    kw = dict(causal=True)
    g = torch.Generator().manual_seed(5)
    if "softcap" in feature:
        kw["softcap"] = 2.0
    if feature == "alibi":
        kw["alibi_slopes"] = torch.rand(4, generator=g).to(DEVICE)
    if feature == "alibi_per_seq":
        kw["alibi_slopes"] = torch.rand(2, 4, generator=g).to(DEVICE)
    if "window" in feature:
        kw["window_size"] = (9, 0)
    check_grads(fa, [23, 35], [23, 40], 4, 2, 32, torch.float32, sinks="sinks" in feature, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sinks_in_low_precision(fa, dtype):
    check_grads(fa, [33, 20], [33, 20], 4, 1, 64, dtype, sinks=True, causal=True, window_size=(15, 0))


@pytest.mark.parametrize("H, Hkv", [(6, 1), (4, 4), (8, 2)])
def test_gqa_and_mqa(fa, H, Hkv):
    """dK/dV sum over the query heads of their KV head."""
    check_grads(fa, [29], [29], H, Hkv, 32, torch.float32, causal=True)


def test_lse_gradient(fa):
    """The LSE is an output too: its gradient flows into dq, dk and d s_aux."""
    check_grads(fa, [21, 34], [21, 34], 2, 1, 32, torch.float32, sinks=True, with_dlse=True, causal=True)


@pytest.mark.parametrize("Sq, Sk", [(40, 40), (3, 50), (50, 19)])
def test_flash_attn_func_on_strided_views(fa, Sq, Sk):
    """Batched layout, transposed views in and out (Sq <= 4 takes the decode kernel forward, same backward)."""
    B, H, Hkv, D = 2, 4, 2, 32
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, Sq, D, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).transpose(1, 2) for _ in range(2))
    dout = torch.randn(B, Sq, H, D, generator=g)
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    out = fa.flash_attn_func(*leaves, causal=True, window_size=(20, 0))
    grads = torch.autograd.grad((out * dout.to(DEVICE)).sum(), leaves)
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    cu_q = torch.arange(B + 1, dtype=torch.int32) * Sq
    cu_k = torch.arange(B + 1, dtype=torch.int32) * Sk
    ref_out, _ = attention_reference(refs[0].reshape(B * Sq, H, D), refs[1].reshape(B * Sk, Hkv, D),
                                     refs[2].reshape(B * Sk, Hkv, D), cu_q, cu_k, causal=True, window=(20, 0))
    ref_grads = torch.autograd.grad((ref_out * dout.reshape(B * Sq, H, D).double()).sum(), refs)
    for got, expected in zip(grads, ref_grads):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.cpu().double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")   # fp32 on purpose: the kernels have no fp64
def test_gradcheck(fa):
    """torch.autograd.gradcheck at tiny fp32 shapes (finite differences in fp32: loose tolerances)."""
    q, k, v, _, cu_q, cu_k, s_aux = make_inputs([3, 5], [4, 6], 2, 1, 32, torch.float32, seed=4, sinks=True)
    inputs = [t.to(DEVICE).requires_grad_(True) for t in (q, k, v, s_aux)]
    cu_q, cu_k = cu_q.to(DEVICE), cu_k.to(DEVICE)

    def attend(q, k, v, s_aux):
        return fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True, softcap=3.0, s_aux=s_aux)

    assert torch.autograd.gradcheck(attend, inputs, eps=1e-2, atol=5e-3, rtol=1e-2, fast_mode=True)


def test_deterministic(fa):
    """No atomics: two backward passes are bitwise equal."""
    q, k, v, dout, cu_q, cu_k, s_aux = make_inputs([30, 50], [30, 61], 4, 2, 64, torch.float16, sinks=True)
    first = kernel_grads(fa, q, k, v, dout, cu_q, cu_k, s_aux, causal=True)
    second = kernel_grads(fa, q, k, v, dout, cu_q, cu_k, s_aux, causal=True)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_chunk_counts(fa):
    """Every chunk count (dQ partials summed in chunk order) gives the reference's gradients; the heuristic picks at
    most one chunk per key block; a negative count is refused."""
    q, k, v, dout, cu_q, cu_k, _ = make_inputs([70, 33], [70, 40], 4, 2, 64, torch.float32, seed=5)
    ref = reference_grads(q, k, v, dout, cu_q, cu_k, None, torch.float64, causal=True, window=(40, -1))
    ops = fa._ops.ops
    out, lse = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, 70, 70, None, True, 40, -1, 0.0, None, None)
    for chunks in (1, 2, 3, 100):
        grads = ops.flash_attn_varlen_backward(dout, q, k, v, out, lse, None, cu_q, cu_k, 70, 70, None, True, 40, -1,
                                               0.0, None, None, chunks)
        for name, got in zip(GRADS, grads[:3]):
            torch.testing.assert_close(got.double(), ref[name], atol=1e-4, rtol=1e-4, msg=f"{name}, {chunks} chunks")
    assert ops.backward_chunks(1, 1, 64, 4, 70, 0, 40) == 3   # 3 key blocks: one chunk each
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        ops.flash_attn_varlen_backward(dout, q, k, v, out, lse, None, cu_q, cu_k, 70, 70, None, True, 40, -1, 0.0,
                                       None, None, -1)


@pytest.mark.parametrize("wanted", ["k", "q", "v+sinks", "q+k+v+sinks"])
def test_inputs_that_need_no_grad(fa, counters, wanted):
    """Only the inputs that require grad get one, bitwise the all-inputs run's; an unwanted dq / dk / dv is never
    written (without dq: no dQ partials and no reduce launch); without any, the forward records nothing for backward."""
    q, k, v, dout, cu_q, cu_k, s_aux = make_inputs([9, 20], [9, 20], 4, 2, 32, torch.float32, sinks=True)
    tensors = dict(zip(["q", "k", "v", "sinks"], (t.to(DEVICE) for t in (q, k, v, s_aux))))
    dout, cu_q, cu_k = dout.to(DEVICE), cu_q.to(DEVICE), cu_k.to(DEVICE)

    def run(leaves):
        x = {name: t.detach().requires_grad_(name in leaves) for name, t in tensors.items()}
        out = fa.flash_attn_varlen_func(x["q"], x["k"], x["v"], cu_q, cu_k, 20, 20, causal=True, s_aux=x["sinks"])
        if not leaves:
            return out
        counters(reset=True)   # the backward's launches only
        grads = torch.autograd.grad((out * dout).sum(), [x[name] for name in leaves])
        return dict(zip(leaves, grads)), counters()

    assert run([]).grad_fn is None
    everything, _ = run(list(tensors))
    some = wanted.split("+")
    got, c = run(some)
    assert all(torch.equal(got[name], everything[name]) for name in some)
    # params.h BACKWARD_BUFFER_DQ 8, _DK 9, _DV 10, _DQ_PARTIAL 15
    for name, buffers in (("q", (8, 15)), ("k", (9,)), ("v", (10,))):
        assert all((c.get(f"device_bytes_written[{b}]", 0) > 0) == (name in some) for b in buffers), name
    assert c["launches"] == (3 if "q" in some else 2)


def test_tokens_in_no_sequence_get_zero_gradients(fa, monkeypatch):
    """Unchecked cu_seqlens leaving tokens before the first entry and past the last: those tokens' dq / dk / dv rows
    are exactly zero (written by the delta kernel, no zero-fill pass), the sequences' rows are the reference's."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    q, k, v, dout, _, _, s_aux = make_inputs([25], [26], 4, 2, 32, torch.float32, seed=3, sinks=True)
    cu_q, cu_k = torch.tensor([3, 10, 20], dtype=torch.int32), torch.tensor([2, 12, 22], dtype=torch.int32)
    for _ in range(2):   # the second call may get the first's freed memory: stale rows would show
        got = kernel_grads(fa, q, k, v, dout, cu_q, cu_k, s_aux, causal=True)
    ref = reference_grads(q[3:20], k[2:22], v[2:22], dout[3:20], cu_q - 3, cu_k - 2, s_aux, torch.float64, causal=True)
    for name, (lo, hi) in (("dq", (3, 20)), ("dk", (2, 22)), ("dv", (2, 22))):
        outside = torch.cat([got[name][:lo], got[name][hi:]])
        assert outside.shape[0] > 0 and torch.equal(outside, torch.zeros_like(outside)), name
        torch.testing.assert_close(got[name][lo:hi].double(), ref[name], atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(got["ds_aux"].double(), ref["ds_aux"], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- torch.library
def test_opcheck_with_gradients(fa):
    """Schema, fake kernels, autograd registration and AOT dispatch (forward and backward) of both ops."""
    q, k, v, dout, cu_q, cu_k, s_aux = make_inputs([7, 12], [10, 13], 4, 2, 64, torch.float32, sinks=True)
    q, k, v, s_aux = (t.to(DEVICE).requires_grad_(True) for t in (q, k, v, s_aux))
    args = (q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE), 12, 13, 0.125, True, 5, -1, 0.0, None, s_aux)
    torch.library.opcheck(fa._ops.ops.flash_attn_varlen.default, args)
    out, lse = fa._ops.ops.flash_attn_varlen(*args)
    detached = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(fa._ops.ops.flash_attn_varlen_backward.default,
                          (dout.to(DEVICE), *detached, out.detach(), lse.detach(), None, *args[3:12], None, s_aux.detach()))


def test_compiled_training_step(fa):
    """torch.compile of a layer's forward + backward (AOT autograd traces the backward op's fake kernel)."""
    x = torch.randn(2, 16, 4, 32, device=DEVICE)
    sinks = torch.randn(4, device=DEVICE)

    def step(x, sinks):
        out = fa.flash_attn_func(x, x[:, :, :2], x[:, :, 2:], causal=True, window_size=(5, 0), s_aux=sinks)
        return torch.autograd.grad(out.square().sum(), [x, sinks])

    def eager(x, sinks):
        return step(x.clone().requires_grad_(True), sinks.clone().requires_grad_(True))

    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s: step(x.requires_grad_(True), s.requires_grad_(True)), backend="aot_eager")
    for got, expected in zip(compiled(x.clone(), sinks.clone()), eager(x, sinks)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- band proof
def tiles_with_a_visible_pair(n, causal, window, block_q, block_k):
    """(query block, key block) pairs holding a visible pair, from the explicit mask."""
    visible, _ = visible_keys(n, n, causal, window)
    return int(visible.reshape(n // block_q, block_q, n // block_k, block_k).any(3).any(1).sum())


@pytest.mark.parametrize("causal, window", [(True, (127, 0)), (False, (64, 64)),
                                            pytest.param(True, (-1, -1), marks=pytest.mark.slow)], ids=str)
def test_band_limited_backward_at_2048(fa, counters, causal, window):
    n, H, Hkv, D = 2048, 2, 1, 32
    q, k, v, dout, cu_q, cu_k, _ = make_inputs([n], [n], H, Hkv, D, torch.float16, seed=11)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = fa.flash_attn_varlen_func(*leaves, cu_q, cu_k, n, n, causal=causal, window_size=window)
    counters(reset=True)   # count the backward only
    (out * dout).sum().backward()
    c = counters()
    tile_q = fa.BACKWARD_TILE_QUERIES[torch.float16][D]
    ideal_kv = H * tiles_with_a_visible_pair(n, causal, window, tile_q, fa.BACKWARD_BLOCK_K)
    assert c["backward_kv_tiles"] == ideal_kv
    if window[0] >= 0:
        assert ideal_kv < H * (n // tile_q) * (n // fa.BACKWARD_BLOCK_K) / 4   # O(n * window), not n^2


# ---------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("n", [4096, 131072])
def test_training_memory_is_linear_on_meta_tensors(fa, n):
    """Forward + backward on meta tensors to 131k tokens: every tensor allocated is O(n) (no n x n buffer)."""
    from benchmarks.run import allocated_bytes
    H, Hkv, D = 8, 1, 64
    q = torch.empty(n, H, D, dtype=torch.float16, device="meta", requires_grad=True)
    k, v = (torch.empty(n, Hkv, D, dtype=torch.float16, device="meta", requires_grad=True) for _ in range(2))
    sinks = torch.empty(H, device="meta", requires_grad=True)
    cu = torch.empty(2, dtype=torch.int32, device="meta")

    def train():
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True, window_size=(127, 0), s_aux=sinks)
        torch.autograd.grad(out.sum(), [q, k, v, sinks])

    inputs = (q.numel() + 2 * k.numel()) * 2
    # The fake kernel allocates the outputs only; the real op adds its fp32 dQ partials, one copy of dq per chunk
    # (backward_chunks: at most 8, here 8 -- up to 16x the fp16 q bytes, O(n) with a large constant).
    chunks = fa._ops.ops.backward_chunks(1, Hkv, D, 2, n, 0, 0)
    partials = chunks * q.numel() * 4
    assert 1 <= chunks <= 8
    # out, dout, dq, dk, dv, lse, delta: a few times the inputs, plus the partials
    assert allocated_bytes(train) + partials <= 8 * inputs + 8 * q.numel() * 4
