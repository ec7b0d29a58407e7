"""Property-based fuzzing of the public entry points (issue 11): hypothesis draws shapes, strides and views,
dtypes, masks, scalars and index metadata, valid and invalid, with the host data checks on or off. For each
draw exactly one of these holds:
- the call is valid: the result matches the float64 reference (and the cache holds exactly the appended tokens);
- it is invalid: a ValueError / TypeError / NotImplementedError naming the argument, and the caches are
  byte-identical afterwards;
- only index *values* are bad and the data checks are off (they are trusted, as flash-attn trusts them): the
  call returns without NaN, and the simulator (which fails any out-of-bounds access) saw none.
Seeded and derandomized; a small budget runs by default, a larger one with `-m slow`."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import DEVICE, KERNEL as fa, strided
from tests.reference import assert_matches_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HUGE = [2**31 - 1, 2**32 + 3, 2**63 - 1]
ERRORS = (ValueError, TypeError, NotImplementedError)

windows = st.one_of(st.just(-1), st.integers(0, 40), st.sampled_from(HUGE))


def fuzz_settings(examples):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def randn(draw, shape, dtype, view):
    """A tensor of `shape` (head dim last) that is a non-contiguous view when `view` is drawn."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if view and len(shape) == 4 and draw(st.booleans()):   # [B, H, S, D].transpose(1, 2), as transformers passes
        B, S, H, D = shape
        return torch.randn(B, H, S, D, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    if view and len(shape) >= 2:   # heads spaced out in a wider buffer: head stride 2 * D
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(dtype)[..., :shape[-1]].to(DEVICE)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def index(values, as_view):
    t = torch.tensor(values, dtype=torch.int32, device=DEVICE)
    return strided(t, fill=-3) if as_view else t


def scores(draw):
    """The score and mask arguments shared by every entry point (valid values)."""
    return dict(causal=draw(st.booleans()), window_size=(draw(windows), draw(windows)),
                softcap=draw(st.sampled_from([0.0, 0.0, 20.0])), softmax_scale=draw(st.sampled_from([None, 0.3])))


# A bad argument: (what to change, argument name the message must contain, "data" when only the values of an
# index tensor are wrong, which the checks catch only when on).
SCALAR_MISTAKES = [
    ("window_size", (-2, 0), "window_size", None),
    ("window_size", (2**64, 0), "window_size", None),
    ("softcap", math.inf, "softcap", None),
    ("softcap", math.nan, "softcap", None),
    ("softmax_scale", math.nan, "softmax_scale", None),
    ("softmax_scale", -math.inf, "softmax_scale", None),
]


def pick_mistake(draw, mistakes):
    """None (a valid call) two times in three, else one mistake, uniformly (sampled_from favours the first)."""
    rng = draw(st.randoms(use_true_random=False))
    return rng.choice(mistakes) if rng.random() < 1 / 3 else None


def expect(call, mistake, check_data, caches=()):
    """Run `call` and check the outcome the docstring describes; returns the result of a successful call."""
    before = [c.clone() for c in caches]
    if mistake is None or (mistake[-1] == "data" and check_data == "0"):
        event("valid" if mistake is None else f"bad {mistake[0]} trusted (checks off)")
        result = call()
        outputs = result if isinstance(result, tuple) else (result,)
        assert not any(torch.isnan(o).any() for o in outputs if isinstance(o, torch.Tensor))
        return result
    event(f"bad {mistake[0]} rejected")
    with pytest.raises(ERRORS) as info:
        call()
    assert mistake[2] in str(info.value), f"{mistake[2]!r} not named in: {info.value}"
    for c, b in zip(caches, before):
        assert torch.equal(c.view(torch.uint8), b.view(torch.uint8)), "a rejected call changed the cache"
    return None


@st.composite
def prefill_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    D = draw(st.sampled_from([32, 64]))
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2]))
    batched = draw(st.booleans())
    B = draw(st.integers(1 if batched else 0, 3))
    if batched:
        lens_q, lens_k = [draw(st.integers(1, 40))] * B, [draw(st.integers(0, 40))] * B
    else:
        lens_q, lens_k = draw(st.lists(st.integers(0, 40), min_size=B, max_size=B)), \
            draw(st.lists(st.integers(0, 40), min_size=B, max_size=B))
    view = draw(st.booleans())
    if batched:
        q = randn(draw, (B, lens_q[0], H, D), dtype, view)
        k, v = (randn(draw, (B, lens_k[0], Hkv, D), dtype, view) for _ in range(2))
    else:
        q = randn(draw, (sum(lens_q), H, D), dtype, view)
        k, v = (randn(draw, (sum(lens_k), Hkv, D), dtype, view) for _ in range(2))
    case = dict(batched=batched, lens_q=lens_q, lens_k=lens_k, q=q, k=k, v=v, kw=scores(draw))
    if draw(st.booleans()):
        case["kw"]["s_aux"] = randn(draw, (H,), torch.float32, False)
    cu = lambda lens: [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()]
    index_views = draw(st.booleans())
    case["cu_q"], case["cu_k"] = cu(lens_q), cu(lens_k)
    longest_q, longest_k = max(lens_q, default=0), max(lens_k, default=0)
    max_q = draw(st.sampled_from([longest_q, longest_q + 7, 2**40, "tensor"]))
    case["max_q"] = torch.tensor(longest_q) if max_q == "tensor" else max_q
    case["max_k"] = longest_k

    mistakes = list(SCALAR_MISTAKES) + [
        ("q", q.double(), "q", None), ("k", k.float() if dtype != torch.float32 else k.half(), "dtype", None),
        ("s_aux", randn(draw, (H + 1,), torch.float32, False), "s_aux", None)]
    if D == 64:
        mistakes.append(("head_dim", 48, "head_dim", None))
    if H == 2 and Hkv == 2:
        mistakes.append(("heads", 1, "heads", None))
    if not batched:
        mistakes += [("cu_seqlens_q", "int64", "cu_seqlens_q", None),
                     ("cu_seqlens_k", "last", "cu_seqlens_k", "data"),
                     ("cu_seqlens_q", "first", "cu_seqlens_q", "data")]
        if B >= 2:
            mistakes.append(("cu_seqlens_q", "decreasing", "cu_seqlens_q", "data"))
        if longest_q > 1:
            mistakes.append(("max_seqlen_q", longest_q - 1, "max_seqlen_q", "data"))
    mistake = pick_mistake(draw, mistakes)
    case["mistake"] = mistake
    if mistake:
        name, value = mistake[0], mistake[1]
        if name in ("q", "k"):
            case[name] = value
        elif name == "head_dim":
            case["q"], case["k"], case["v"] = (t[..., :value] for t in (case["q"], case["k"], case["v"]))
        elif name == "heads":
            case["q"] = case["q"][..., :value, :]
        elif name == "cu_seqlens_k":   # last entry past the tokens
            case["cu_k"] = case["cu_k"][:-1] + [case["cu_k"][-1] + 5]
        elif name == "cu_seqlens_q" and value == "first":
            case["cu_q"] = [1] + case["cu_q"][1:]
        elif name == "cu_seqlens_q" and value == "decreasing":
            case["cu_q"] = [0, case["cu_q"][-1] + 1] + case["cu_q"][2:]
        elif name == "max_seqlen_q":
            case["max_q"] = value
        elif name in ("window_size", "softcap", "softmax_scale", "s_aux"):
            case["kw"][name] = value
    case["cu_q"], case["cu_k"] = index(case["cu_q"], index_views), index(case["cu_k"], index_views)
    if mistake and mistake[:2] == ("cu_seqlens_q", "int64"):
        case["cu_q"] = case["cu_q"].long()
    return case


def check_prefill(case, check_data):
    os.environ["METAL_FLASH_SDPA_CHECK_DATA"] = check_data
    q, k, v, kw = case["q"], case["k"], case["v"], dict(case["kw"])
    if case["batched"]:
        call = lambda: fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    else:
        call = lambda: fa.flash_attn_varlen_func(q, k, v, case["cu_q"], case["cu_k"], case["max_q"], case["max_k"],
                                                 return_attn_probs=True, **kw)
    result = expect(call, case["mistake"], check_data)
    if result is None or case["mistake"] is not None:
        return
    out, lse, _ = result
    ref_kw = dict(causal=kw["causal"], window=kw["window_size"], softcap=kw["softcap"], sinks=kw.get("s_aux"),
                  scale=kw["softmax_scale"])
    if case["batched"]:
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        out, lse = out.flatten(0, 1), lse.permute(1, 0, 2).flatten(1)
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        cu_q, cu_k = torch.arange(B + 1) * Sq, torch.arange(B + 1) * Sk
    else:
        cu_q, cu_k = case["cu_q"].cpu(), case["cu_k"].cpu()
    ref_kw["sinks"] = None if ref_kw["sinks"] is None else ref_kw["sinks"].cpu()
    assert_matches_reference(out, lse, q.cpu(), k.cpu(), v.cpu(), cu_q, cu_k, **ref_kw)


@st.composite
def decode_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    D = draw(st.sampled_from([32, 64]))
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    B = draw(st.integers(1, 3))
    Sq = draw(st.integers(1, 3))
    new = draw(st.sampled_from([0, 1, Sq]))
    paged = draw(st.booleans())
    write_only = paged and new > 0 and draw(st.integers(0, 3)) == 0   # kv_cache_write on its own
    if paged:
        block_size = draw(st.sampled_from([4, 8, 16]))
        max_blocks = draw(st.integers(1, 5))
        capacity = block_size * max_blocks
        num_blocks = B * max_blocks + draw(st.integers(0, 3))
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        table = order[:B * max_blocks].view(B, max_blocks).tolist()
        rows = list(range(B))
    else:
        capacity = draw(st.integers(new, 70))
        num_blocks = B + draw(st.integers(0, 2))
        rows = draw(st.permutations(range(num_blocks)))[:B]
        block_size, table = capacity, [[r] for r in rows]
    k_cache = randn(draw, (num_blocks, block_size, Hkv, D), dtype, False)
    v_cache = randn(draw, (num_blocks, block_size, Hkv, D), dtype, False)
    seqlens = [draw(st.integers(0, capacity - new)) for _ in range(B)]
    if paged and draw(st.booleans()):   # rows padded with -1 past their last block, as transformers pads them
        table = [row[:-(-(n + new) // block_size)] + [-1] * (max_blocks + (-(n + new) // block_size))
                 for row, n in zip(table, seqlens)]
    leftpad = [draw(st.integers(0, s + new)) for s in seqlens] if not paged and draw(st.booleans()) else None
    case = dict(paged=paged, write_only=write_only, block_size=block_size, table=table, rows=rows, seqlens=seqlens,
                leftpad=leftpad, k_cache=k_cache, v_cache=v_cache, q=randn(draw, (B, Sq, H, D), dtype, draw(st.booleans())),
                k=randn(draw, (B, new, Hkv, D), dtype, False) if new else None, kw=scores(draw),
                num_splits=draw(st.sampled_from([0, 1, 3, 2**63 - 1])), strided=draw(st.booleans()),
                seqlens_kind=draw(st.sampled_from(["tensor", "tensor", "int"] if len(set(seqlens)) == 1 else ["tensor"])))
    case["v"] = None if case["k"] is None else -case["k"]
    if draw(st.booleans()):
        case["kw"]["s_aux"] = randn(draw, (H,), torch.float32, False)

    mistakes = list(SCALAR_MISTAKES) + [("cache_seqlens", 2**33, "cache_seqlens", None),
                                        ("cache_seqlens", capacity - new + 1, "cache_seqlens", "data"),
                                        ("cache_seqlens", -1, "cache_seqlens", "data")]
    if paged:
        mistakes += [("block_table", num_blocks + 2, "block_table", "data"), ("block_table", "int64", "block_table", None)]
    else:
        mistakes += [("cache_batch_idx", num_blocks, "cache_batch_idx", "data")]
        if leftpad:
            mistakes += [("cache_leftpad", capacity + 1, "cache_leftpad", "data")]
    if new:   # new tokens of another dtype than the cache (always checked: the write copies by element size)
        named = "k_cache, v_cache and k must have the same dtype" if write_only else "k (new tokens) has dtype"
        mistakes += [("k", "dtype", named, None)]
    if write_only:
        mistakes = [m for m in mistakes if m[0] in ("cache_seqlens", "block_table", "k")]
    # Table entries the checks read: the blocks holding each sequence's keys (the new tokens' only, for a write).
    in_use = {}
    for b in range(B):
        first = case["seqlens"][b] if write_only else (leftpad[b] if leftpad else 0)
        end = case["seqlens"][b] + new
        if end > first:
            in_use[b] = list(range(first // block_size, (end - 1) // block_size + 1))
    if not in_use:
        mistakes = [m for m in mistakes if m[0] not in ("block_table", "cache_batch_idx") or m[1] == "int64"]
    mistake = pick_mistake(draw, mistakes)
    case["mistake"] = mistake
    if mistake:
        name, value = mistake[0], mistake[1]
        seq = draw(st.sampled_from(sorted(in_use))) if name in ("block_table", "cache_batch_idx") and \
            value != "int64" else draw(st.integers(0, B - 1))
        if name == "cache_seqlens" and value == 2**33:
            case["seqlens_kind"], case["seqlens"] = "int", [value] * B
        elif name == "cache_seqlens":
            case["seqlens_kind"] = "tensor"
            case["seqlens"][seq] = value
        elif name == "block_table" and value != "int64":
            case["table"][seq][draw(st.sampled_from(in_use[seq]))] = value
        elif name == "cache_batch_idx":
            case["table"][seq] = [value]
        elif name == "cache_leftpad":
            case["leftpad"][seq] = value
        elif name == "k":
            other = draw(st.sampled_from([d for d in (torch.float32, torch.float16, torch.bfloat16) if d != dtype]))
            case["k"], case["v"] = case["k"].to(other), case["v"].to(other)
        else:
            case["kw"][name] = value
    return case


def expected_cache(case):
    """The caches after the append, written in Python: new token i of sequence b at cache_seqlens[b] + i."""
    k_cache, v_cache = case["k_cache"].cpu().clone(), case["v_cache"].cpu().clone()
    if case["k"] is not None:
        for b, start in enumerate(case["seqlens"]):
            for i in range(case["k"].shape[1]):
                pos = start + i
                block = case["table"][b][pos // case["block_size"]]
                k_cache[block, pos % case["block_size"]] = case["k"][b, i].cpu()
                v_cache[block, pos % case["block_size"]] = case["v"][b, i].cpu()
    return k_cache, v_cache


def check_decode(case, check_data):
    os.environ["METAL_FLASH_SDPA_CHECK_DATA"] = check_data
    mistake, B = case["mistake"], case["q"].shape[0]
    table = index(case["table"], case["strided"])
    if mistake and mistake[:2] == ("block_table", "int64"):
        table = table.long()
    seqlens = case["seqlens"][0] if case["seqlens_kind"] == "int" else index(case["seqlens"], case["strided"])
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    after = expected_cache(case) if mistake is None else None
    if case["write_only"]:
        call = lambda: fa.kv_cache_write(case["k"], case["v"], k_cache, v_cache, table, seqlens)
    else:
        where = dict(block_table=table) if case["paged"] else dict(cache_batch_idx=table[:, 0])
        if case["leftpad"] is not None:
            where["cache_leftpad"] = index(case["leftpad"], case["strided"])
        call = lambda: fa.flash_attn_with_kvcache(case["q"], k_cache, v_cache, k=case["k"], v=case["v"],
                                                  cache_seqlens=seqlens, num_splits=case["num_splits"],
                                                  return_softmax_lse=True, **where, **case["kw"])
    result = expect(call, mistake, check_data, (k_cache, v_cache))
    if mistake is not None:
        return
    assert torch.equal(k_cache.cpu(), after[0]) and torch.equal(v_cache.cpu(), after[1])   # exactly the new tokens
    if case["write_only"]:
        return
    out, lse = result
    Sq, new = case["q"].shape[1], 0 if case["k"] is None else case["k"].shape[1]
    keys, values, lens = [], [], []
    for b in range(B):
        start, end = (case["leftpad"] or [0] * B)[b], case["seqlens"][b] + new
        pos = torch.arange(start, end)
        blocks = torch.tensor(case["table"][b], dtype=torch.long)[pos // case["block_size"]]
        keys.append(after[0][blocks, pos % case["block_size"]])
        values.append(after[1][blocks, pos % case["block_size"]])
        lens.append(end - start)
    kw = case["kw"]
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    assert_matches_reference(out.cpu().flatten(0, 1), lse.cpu().permute(1, 0, 2).flatten(1),
                             case["q"].cpu().flatten(0, 1), torch.cat(keys), torch.cat(values),
                             torch.arange(B + 1) * Sq, cu_k, causal=kw["causal"], window=kw["window_size"],
                             softcap=kw["softcap"], scale=kw["softmax_scale"],
                             sinks=None if kw.get("s_aux") is None else kw["s_aux"].cpu())


CHECK_DATA = st.sampled_from(["1", "0"])


def run_restoring_env(check, case, check_data):
    saved = os.environ.get("METAL_FLASH_SDPA_CHECK_DATA")
    try:
        check(case, check_data)
    finally:
        os.environ["METAL_FLASH_SDPA_CHECK_DATA"] = saved if saved is not None else "1"


@fuzz_settings(100)
@given(case=prefill_cases(), check_data=CHECK_DATA)
def test_fuzz_prefill(case, check_data):
    run_restoring_env(check_prefill, case, check_data)


@fuzz_settings(100)
@given(case=decode_cases(), check_data=CHECK_DATA)
def test_fuzz_decode_and_kv_write(case, check_data):
    run_restoring_env(check_decode, case, check_data)


@pytest.mark.slow
@fuzz_settings(2000)
@given(case=prefill_cases(), check_data=CHECK_DATA)
def test_fuzz_prefill_long(case, check_data):
    run_restoring_env(check_prefill, case, check_data)


@pytest.mark.slow
@fuzz_settings(2000)
@given(case=decode_cases(), check_data=CHECK_DATA)
def test_fuzz_decode_and_kv_write_long(case, check_data):
    run_restoring_env(check_decode, case, check_data)
