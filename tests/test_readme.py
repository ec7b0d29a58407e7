"""The README's support tables are checked against what the tests exercise and what the kernel accepts."""
import re

import pytest
import torch

from tests.helpers import DEVICE, DTYPES, HEAD_DIMS, REPO

README = (REPO / "README.md").read_text()


def table_row(label):
    row = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", README, re.M)
    assert row, f"README has no '{label}' row"
    return row.group(1)


def test_head_dims_row_matches_tests_and_kernel(fa):
    listed = [int(d) for d in re.findall(r"\d+", table_row("head dims"))]
    assert listed == HEAD_DIMS
    q = torch.zeros(4, 1, 48, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError) as info:   # the kernel's own list, in its error message
        fa.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4)
    forward_only = [int(d) for d in re.findall(r"\d+", table_row("forward-only head dims").split("(out")[0])]
    assert forward_only == [d for dims in fa.FORWARD_HEAD_DIMS[len(listed):] for d in dict.fromkeys(dims)]
    assert [int(d) for d in re.findall(r"\d+", str(info.value).split("supported head dims:")[1])] == listed + forward_only


def test_dtypes_row_matches_tests():
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    listed = [names[n] for n in re.findall(r"fp16|bf16|fp32", table_row("dtypes"))]
    assert sorted(map(str, listed)) == sorted(map(str, DTYPES))



def test_hub_card_renders_with_the_public_functions(fa):
    """CARD.md is the template kernel-builder renders for the Hub page (minijinja; jinja2 reads the same syntax)."""
    import jinja2
    template = jinja2.Environment(trim_blocks=True).from_string((REPO / "CARD.md").read_text())
    functions = [name for name in fa.__all__ if callable(getattr(fa, name))]
    card = template.render(repo_id="kernels-community/metal-flash-sdpa", version=2, functions=functions,
                           license="apache-2.0", layers=[], has_benchmark=False)
    assert card.startswith("---\nlibrary_name: kernels\nlicense: apache-2.0\n")
    assert 'get_kernel("kernels-community/metal-flash-sdpa", version=2)' in card
    assert sorted(functions) == ["dequantize_kv", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
                                 "kv_cache_write", "quantize_kv"]
    for name in functions:
        assert f"- `{name}`" in card


def test_paged_prefill_example_runs(fa):
    """The README's paged prefill example is code a user can paste: run it as written (it asserts on its own output
    against contiguous calls), with `fa` loaded as the README's "Use it" section loads it."""
    section = README.split("## Paged prefill", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Paged prefill section should hold exactly one runnable example"
    torch.manual_seed(0)
    namespace = {"fa": fa}
    exec(compile(blocks[0], "README.md (Paged prefill example)", "exec"), namespace)
    assert namespace["out"].shape == (6, 8, 64) and torch.isfinite(namespace["out"]).all()
