"""flash-attn's own backward test cases, through our functions (issue 18, item 3).

Source: Dao-AILab/flash-attention, tests/test_flash_attn.py (read at commit 0251105a). Its backward tests build
inputs, run `(dq, dk, dv) = torch.autograd.grad(out, (q, k, v), g)` through flash-attn, through `attention_ref` in
fp32 ("ref") and through `attention_ref` in the inputs' dtype ("pt"), and assert per gradient

    (dq - dq_ref).abs().max().item() <= FACTOR * (dq_pt - dq_ref).abs().max().item() + ATOL

with FACTOR, ATOL = 2, 0 in test_flash_attn_qkvpacked / test_flash_attn_varlen_qkvpacked (on the packed dqkv) and
test_flash_attn_bwd_transpose; 3, 0 in test_flash_attn_output / test_flash_attn_varlen_output; 2, 1e-5 in
test_flash_attn_causal / test_flash_attn_varlen_causal; 5, 1e-3 in test_flash_attn_bwd_overflow; and the forward
output within 2x (+ the same small atol in the causal tests). This module rebuilds those families -- their
seqlen pairs, head dims, causal / local (random window in [0, seqlen_k)) / ALiBi (slopes rand * 0.3) / softcap 50
(q scaled by the softcap) / MHA-MQA-GQA / kv- and qkv-packed layouts (strided views of the packed tensor) /
varlen with random padding (each length in [max(1, s - 20), s]) / non-contiguous dout / batch sizes and head
counts / fp16 and bf16 -- and applies the same rule with our float64 reference (tests/reference.py) as "ref"
and the same reference run in the inputs' dtype as "pt".

Left out, because the package does not have them: dropout (rejected with an error), head dims outside
SUPPORTED_HEAD_DIMS (40, 59, 111, 160, 224 and bwd_overflow's 16), paged KV in the backward (flash-attn skips its
backward there too). `deterministic` is passed through as flash-attn does; our kernel is always deterministic,
so the flag changes nothing (tests/test_backward.py checks bitwise determinism).

The full grid (tens of thousands of cases, hours in the simulator) is marked slow; CI runs a fixed-seed sample
of small cases, one per family.
"""
import itertools
import random
from dataclasses import dataclass

import pytest
import torch

from tests.helpers import DEVICE, HEAD_DIMS
from tests.reference import attention_reference

LOW_PRECISION = [torch.float16, torch.bfloat16]
MASKS = ["full", "causal", "local", "causal+local"]


@dataclass(frozen=True)
class Case:
    family: str          # the flash-attn test it comes from
    seqlen_q: int
    seqlen_k: int
    d: int
    dtype: torch.dtype
    mask: str = "full"
    alibi: bool = False
    softcap: float = 0.0
    heads: tuple = (6, 6)           # (H, Hkv)
    batch: int = 4
    packing: str = ""               # "", "kv" or "qkv": q/k/v are strided views of one packed leaf
    varlen: bool = False            # random padding, through flash_attn_varlen_func
    deterministic: bool = False
    input_scale: tuple = (1.0, 1.0)  # (q, k and v) multipliers
    strided_dout: bool = False
    rule: tuple = (2.0, 0.0)        # the gradients' (FACTOR, ATOL)
    out_atol: float = 0.0

    def __str__(self):
        H, Hkv = self.heads
        flags = [self.mask, self.packing and f"{self.packing}packed", self.alibi and "alibi",
                 self.softcap and f"softcap{self.softcap:g}", self.deterministic and "det",
                 self.strided_dout and "strided_dout"]
        return "-".join([self.family, f"{self.seqlen_q}x{self.seqlen_k}", f"d{self.d}", f"H{H}kv{Hkv}",
                         str(self.dtype).removeprefix("torch."), *filter(None, flags)])


def head_dims(theirs):
    return [d for d in theirs if d in HEAD_DIMS]


def grid(**axes):
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


MHA_TYPES = {"mha": lambda H: (H, H), "mqa": lambda H: (H, 1), "gqa": lambda H: (H, 2)}
OUTPUT_PAIRS = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1024, 1024),
                (1023, 1024), (1024, 1023), (2048, 2048)]
CAUSAL_PAIRS = [(1, 239), (3, 799), (127, 512), (127, 513), (113, 203), (128, 217), (113, 211), (108, 256),
                (256, 512), (1023, 1024)]


def qkvpacked_cases(varlen):
    seqlens = [97, 128, 200, 257, 384, 512, 768, 1025, 2048] if varlen else [97, 128, 200, 384, 768, 1024, 1025, 2048]
    H, batch = (6, 5) if varlen else (9, 4)
    return [Case("varlen_qkvpacked" if varlen else "qkvpacked", s, s, d, dtype, mask, alibi, heads=(H, H),
                 batch=batch, packing="qkv", varlen=varlen, deterministic=det)
            for s, d, mask, alibi, det, dtype in itertools.product(
                seqlens, head_dims([32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]), MASKS,
                [False, True], [False, True], LOW_PRECISION)]


def output_cases(varlen):
    pairs = ([(1, 147)] if varlen else []) + OUTPUT_PAIRS
    cases = []
    for (sq, sk), d, mask, alibi, det, mha, dtype, packing, softcap in itertools.product(
            pairs, head_dims([32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]), MASKS, [False, True],
            [False, True], MHA_TYPES, LOW_PRECISION, ["kv", ""], [0.0, 50.0]):
        H = 6 if softcap == 0.0 else 4   # as theirs: the softcap reference takes more memory
        cases.append(Case("varlen_output" if varlen else "output", sq, sk, d, dtype, mask, alibi, softcap,
                          MHA_TYPES[mha](H), packing=packing, varlen=varlen, deterministic=det,
                          input_scale=(softcap or 1.0, 1.0), rule=(3.0, 0.0)))
    return cases


def causal_cases(varlen):
    return [Case("varlen_causal" if varlen else "causal", *(pair[::-1] if swap else pair), d, dtype, mask,
                 heads=(9, 9), batch=8, varlen=varlen, rule=(2.0, 1e-5), out_atol=1e-5)
            for pair, swap, d, mask, dtype in itertools.product(
                CAUSAL_PAIRS, [False, True], head_dims([32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]),
                ["causal", "causal+local"], LOW_PRECISION)]


def overflow_cases():
    """Large logits (q * 5, k and v * 3) with seqlen not a multiple of the tile: masked keys must not reach dQ."""
    return [Case("bwd_overflow", s, s, d, torch.float16, mask, heads=(5, 5), batch=2, input_scale=(5.0, 3.0),
                 rule=(5.0, 1e-3))
            for s, d, mask in itertools.product([1, 2, 5, 17, 128], head_dims([16, 32, 64]), ["full", "causal"])]


def transpose_cases():
    """dout not contiguous (every other batch row of a larger tensor)."""
    return [Case("bwd_transpose", s, s, d, dtype, mask, heads=(2, 2), batch=5, strided_dout=True)
            for s, d, mask, dtype in itertools.product([97, 128, 200, 256], head_dims([64, 128]),
                                                       ["full", "causal"], LOW_PRECISION)]


FAMILIES = [qkvpacked_cases(False), qkvpacked_cases(True), output_cases(False), output_cases(True),
            causal_cases(False), causal_cases(True), overflow_cases(), transpose_cases()]
FULL_GRID = [case for family in FAMILIES for case in family]


def ci_sample(max_seqlen=256, max_head_dim=64, seed=18):
    """One small case per family (seqlens <= 256, D <= 64: the simulator's time), drawn with a fixed seed."""
    rng = random.Random(seed)
    return [rng.choice([c for c in family if max(c.seqlen_q, c.seqlen_k) <= max_seqlen and c.d <= max_head_dim])
            for family in FAMILIES]


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    leaves: dict          # name -> packed or plain tensor (batched [B, S, ...] or varlen [total, ...])
    dout: torch.Tensor
    lengths_q: torch.Tensor
    lengths_k: torch.Tensor
    options: dict         # causal, window_size, softcap, alibi_slopes, deterministic


def random_lengths(seqlen, batch, g):
    """flash-attn's generate_random_padding_mask(mode="random"): each length in [max(1, s - 20), s]."""
    return torch.randint(max(1, seqlen - 20), seqlen + 1, (batch,), generator=g)


def unpad(t, lengths):
    return torch.cat([t[b, :n] for b, n in enumerate(lengths.tolist())])


def make_inputs(case: Case) -> Inputs:
    g = torch.Generator().manual_seed(0)
    (H, Hkv), B, sq, sk, D = case.heads, case.batch, case.seqlen_q, case.seqlen_k, case.d
    local = "local" in case.mask
    window = tuple(int(w) for w in torch.randint(0, sk, (2,), generator=g)) if local else (-1, -1)
    q = torch.randn(B, sq, H, D, generator=g) * case.input_scale[0]
    k, v = (torch.randn(B, sk, Hkv, D, generator=g) * case.input_scale[1] for _ in range(2))
    if case.packing == "qkv":
        leaves = {"qkv": torch.stack([q, k, v], dim=2)}
    elif case.packing == "kv":
        leaves = {"q": q, "kv": torch.stack([k, v], dim=2)}
    else:
        leaves = {"q": q, "k": k, "v": v}
    lengths_q = random_lengths(sq, B, g) if case.varlen else torch.full((B,), sq)
    lengths_k = lengths_q if case.varlen and case.packing == "qkv" else (
        random_lengths(sk, B, g) if case.varlen else torch.full((B,), sk))
    if case.varlen:
        leaves = {name: unpad(t, lengths_q if name in ("q", "qkv") else lengths_k) for name, t in leaves.items()}
    leaves = {name: t.to(case.dtype) for name, t in leaves.items()}
    out_shape = (int(lengths_q.sum()), H, D) if case.varlen else (B, sq, H, D)
    dout = torch.randn(out_shape, generator=g).to(case.dtype)
    if case.strided_dout:
        wide = torch.zeros(out_shape[0], 2, *out_shape[1:], dtype=case.dtype)
        wide[:, 0] = dout
        dout = wide[:, 0]
        assert not dout.is_contiguous()
    alibi = torch.rand(B, H, generator=g) * 0.3 if case.alibi else None
    options = dict(causal="causal" in case.mask, window_size=window, softcap=case.softcap, alibi_slopes=alibi,
                   deterministic=case.deterministic)
    return Inputs(leaves, dout, lengths_q, lengths_k, options)


def q_k_v(leaves):
    """q, k, v from the leaves: strided views into a packed tensor (dim -3 holds q/k/v) or the plain tensors."""
    if "qkv" in leaves:
        return leaves["qkv"].unbind(-3)
    if "kv" in leaves:
        return (leaves["q"], *leaves["kv"].unbind(-3))
    return leaves["q"], leaves["k"], leaves["v"]


def cu_seqlens(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])


# ---------------------------------------------------------------------------------------- the three runs
def ours(fa, case, inputs):
    """out and the leaves' gradients through our public functions (flash_attn_func or flash_attn_varlen_func)."""
    leaves = {name: t.to(DEVICE).requires_grad_(True) for name, t in inputs.leaves.items()}
    options = dict(inputs.options)
    if options["alibi_slopes"] is not None:
        options["alibi_slopes"] = options["alibi_slopes"].to(DEVICE)
    q, k, v = q_k_v(leaves)
    if case.varlen:
        out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens(inputs.lengths_q).to(DEVICE),
                                        cu_seqlens(inputs.lengths_k).to(DEVICE), int(inputs.lengths_q.max()),
                                        int(inputs.lengths_k.max()), **options)
    else:
        out = fa.flash_attn_func(q, k, v, **options)
    grads = torch.autograd.grad(out, list(leaves.values()), inputs.dout.to(DEVICE))
    return out.cpu(), dict(zip(leaves, (grad.cpu() for grad in grads)))


def reference(case, inputs, dtype):
    """The same through tests/reference.py computed in `dtype` (float64: "ref"; the inputs' dtype: "pt")."""
    leaves = {name: t.detach().to(dtype).requires_grad_(True) for name, t in inputs.leaves.items()}
    q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in q_k_v(leaves))   # the varlen layout
    options = inputs.options
    out, _ = attention_reference(q, k, v, cu_seqlens(inputs.lengths_q), cu_seqlens(inputs.lengths_k),
                                 causal=options["causal"], window=options["window_size"],
                                 softcap=options["softcap"], alibi_slopes=options["alibi_slopes"], dtype=dtype)
    out = out.reshape(inputs.dout.shape)
    grads = torch.autograd.grad(out, list(leaves.values()), inputs.dout.to(dtype))
    return out, dict(zip(leaves, grads))


def max_error(got, expected):
    return (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0


def check(fa, case: Case):
    inputs = make_inputs(case)
    out, grads = ours(fa, case, inputs)
    out_ref, grads_ref = reference(case, inputs, torch.float64)
    out_pt, grads_pt = reference(case, inputs, case.dtype)
    assert out.dtype == case.dtype and not torch.isnan(out).any()
    err, baseline = max_error(out, out_ref), max_error(out_pt, out_ref)
    assert err <= 2 * baseline + case.out_atol, f"out: error {err:.3g} vs PyTorch {baseline:.3g}"
    factor, atol = case.rule
    for name, grad in grads.items():
        assert grad.shape == grads_ref[name].shape and grad.dtype == case.dtype, name
        assert not torch.isnan(grad).any(), name
        err, baseline = max_error(grad, grads_ref[name]), max_error(grads_pt[name], grads_ref[name])
        assert err <= factor * baseline + atol, f"d{name}: error {err:.3g} vs PyTorch {baseline:.3g} ({factor}x + {atol})"


@pytest.mark.parametrize("case", ci_sample(), ids=str)
def test_flash_attn_backward_case(fa, case):
    check(fa, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_GRID, ids=str)
def test_flash_attn_backward_full_grid(fa, case):
    check(fa, case)
