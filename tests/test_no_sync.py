"""Issue 12: with the data checks off (the default on MPS) no op synchronises the device with the host: no
`.item()` / `_local_scalar_dense` or host copy in a profiler trace of one call of each op, and (simulator build)
no host read of index data at all. With checks on, each index tensor is read once per call."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.helpers import DEVICE, SIMULATED, PagedCache, queries

# What a device->host synchronisation looks like in a trace (Tensor.item(), .tolist(), .cpu() of an input).
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::_to_copy"}


def op_calls(fa):
    """One call of each op (and each kernel path), fp32 so no dtype conversion is traced; index tensors include
    views (made contiguous on the device, which is a copy kernel, not a sync)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 4, 64, generator=g).to(DEVICE)
    kv = torch.randn(14, 2, 64, generator=g).to(DEVICE)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 0, 6, 0, 14], dtype=torch.int32, device=DEVICE)[::2]
    sinks = torch.randn(4, generator=g).to(DEVICE)
    cache = PagedCache([20, 33], 2, 64, 16, torch.float32, seed=1, max_blocks=4)
    k_cache, v_cache, table = cache.on_device()
    seqlens = cache.seqlens.to(DEVICE) - 1
    new = torch.randn(2, 1, 2, 64, generator=g).to(DEVICE)
    qd = queries(2, 1, 4, 64, torch.float32).to(DEVICE)
    rows = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    short = torch.tensor([9, 16], dtype=torch.int32, device=DEVICE)
    used = cache.seqlens.to(DEVICE)
    return {
        "flash_attn_varlen_func": lambda: fa.flash_attn_varlen_func(q, kv, kv, cu_q, cu_k, 7, 8, causal=True,
                                                                    window_size=(3, 0), s_aux=sinks),
        "flash_attn_varlen_func paged": lambda: fa.flash_attn_varlen_func(
            q, k_cache, v_cache, cu_q, None, 7, 33, causal=True, block_table=table, seqused_k=used),
        "flash_attn_func prefill": lambda: fa.flash_attn_func(q[None], kv[None], kv[None], causal=True),
        "flash_attn_func decode step": lambda: fa.flash_attn_func(q[None, :1], kv[None], kv[None], causal=True),
        "flash_attn_with_kvcache paged + append": lambda: fa.flash_attn_with_kvcache(
            qd, k_cache, v_cache, k=new, v=new, cache_seqlens=seqlens, block_table=table, causal=True, num_splits=3),
        "flash_attn_with_kvcache contiguous": lambda: fa.flash_attn_with_kvcache(
            qd, k_cache[:2], v_cache[:2], cache_seqlens=short, cache_batch_idx=rows, cache_leftpad=rows),
        "kv_cache_write": lambda: fa.kv_cache_write(new, new, k_cache, v_cache, table, seqlens),
    }


CALLS = ["flash_attn_varlen_func", "flash_attn_varlen_func paged", "flash_attn_func prefill", "flash_attn_func decode step",
         "flash_attn_with_kvcache paged + append", "flash_attn_with_kvcache contiguous", "kv_cache_write"]
HOST_READS_WHEN_CHECKED = [2, 3, 0, 0, 2, 3, 2]   # one read per index tensor; flash_attn_func builds its own


def traced_ops(call):
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        call()
    return {event.name for event in trace.events()}


@pytest.mark.parametrize("name", CALLS)
def test_no_sync_with_checks_off(fa, monkeypatch, name):
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    call = op_calls(fa)[name]
    call()   # warm-up outside the trace
    if SIMULATED:
        fa.simulator_counters(reset=True)
    assert not traced_ops(call) & SYNC_OPS
    if SIMULATED:
        assert fa.simulator_counters()["host_index_reads"] == 0


@pytest.mark.skipif(not SIMULATED, reason="host_index_reads is a simulator-build counter")
@pytest.mark.parametrize("name, reads", zip(CALLS, HOST_READS_WHEN_CHECKED))
def test_checks_read_each_index_once(fa, monkeypatch, name, reads):
    """The counter the no-sync test relies on does count: with checks on, each index tensor is read once (the
    decode op appending new tokens used to read cache_seqlens and block_table twice)."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "1")
    call = op_calls(fa)[name]
    fa.simulator_counters(reset=True)
    call()
    assert fa.simulator_counters()["host_index_reads"] == reads


def test_the_trace_sees_a_sync(fa):
    """The profiler does record a wrapper's .item(): a 0-d CPU max_seqlen_q is read (free on the CPU) ..."""
    q = torch.randn(6, 2, 64)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    assert "aten::_local_scalar_dense" in traced_ops(lambda: fa.flash_attn_varlen_func(q, q, q, cu, cu,
                                                                                        torch.tensor(6), 6))


def test_device_max_seqlen_is_not_read(fa, monkeypatch):
    """... but a 0-d max_seqlen on another device is never read (it would sync): the op treats it as unknown
    and bounds the grid by the token totals. A meta tensor stands in for an MPS one (.item() would raise)."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    q = torch.randn(9, 2, 64, device=DEVICE)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    unknown = torch.tensor(5, device="meta")
    out = fa.flash_attn_varlen_func(q, q, q, cu, cu, unknown, unknown, causal=True)
    assert torch.equal(out, fa.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True))
