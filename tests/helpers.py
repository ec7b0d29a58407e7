"""What the test modules share: the device, the kernel module (loaded through `kernels`, as users load it),
the lists it exports, and input builders. Test modules import from here, never from each other."""
import functools
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The Metal build on a Mac; everywhere else the CPU build, which runs the same shaders in the simulator.
DEVICE = "mps" if torch.backends.mps.is_available() else "cpu"
SIMULATED = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@functools.cache
def load_kernel():
    """The kernel module via kernels.get_local_kernel (never a direct import); on Linux the simulator variant
    is built first (cached: it rebuilds only when a source changed)."""
    import kernels
    if SIMULATED:
        from scripts.build_variant import build
        build()
    return kernels.get_local_kernel(REPO)


KERNEL = load_kernel()


def strided(t, fill=-7):
    """The same values as a non-contiguous view: every other element of a larger tensor (the rest `fill`)."""
    wide = torch.full((2 * t.numel(),), fill, dtype=t.dtype, device=t.device)
    wide[::2] = t.reshape(-1)
    return wide[::2].view(t.shape) if t.dim() <= 1 else wide[::2].unflatten(0, t.shape)
HEAD_DIMS = list(KERNEL.SUPPORTED_HEAD_DIMS)


def queries(B, Sq, H, D, dtype, seed=1):
    return torch.randn(B, Sq, H, D, generator=torch.Generator().manual_seed(seed)).to(dtype)



class PagedCache:
    """A paged cache like transformers': shuffled blocks, block_table rows padded with -1."""

    def __init__(self, cache_seqlens, Hkv, D, block_size, dtype, seed=0, spare_blocks=3, max_blocks=None):
        g = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        self.seqlens = torch.tensor(cache_seqlens, dtype=torch.int32)
        needed = [math.ceil(n / block_size) for n in cache_seqlens]
        max_blocks = max_blocks or max(max(needed), 1)
        num_blocks = sum(needed) + spare_blocks
        self.k = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
        self.v = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
        order = torch.randperm(num_blocks, generator=g).int()
        self.table = torch.full((len(cache_seqlens), max_blocks), -1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(needed):
            self.table[b, :n] = order[used:used + n]
            used += n

    def gather(self, b, n, cache=None):
        """K/V of sequence b's first n positions, [n, Hkv, D] (the reference reads the cache through the table)."""
        pos = torch.arange(n)
        blocks = self.table[b, pos // self.block_size].long()
        k, v = cache if cache is not None else (self.k, self.v)
        return k[blocks, pos % self.block_size], v[blocks, pos % self.block_size]

    def on_device(self):
        return self.k.to(DEVICE), self.v.to(DEVICE), self.table.to(DEVICE)
