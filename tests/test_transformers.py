"""transformers end to end: tiny random-weight models of every family whose attention features we support, run
with attn_implementation="kernels-community/metal-flash-sdpa" (loaded through kernels, LOCAL_KERNELS -> this
repository) against the same weights with attn_implementation="eager"."""
import copy
import functools
import re
from unittest import mock

import pytest
import torch

from tests.helpers import DEVICE, REPO

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

KERNEL = "kernels-community/metal-flash-sdpa"
WINDOW = 16   # every sliding-window model uses 16, so the 40-64 token inputs exceed it
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
FAMILIES = {
    "llama": dict(),                                                            # plain causal, GQA
    "mistral": dict(sliding_window=WINDOW),                                     # sliding window
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"]),        # sliding layers
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=24),                                  # softcap + window + scalar
    "gpt_oss": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"]),      # sinks + alternating window
}


@pytest.fixture(scope="module")
def kernel_module(fa, tmp_path_factory):
    """transformers loads the kernel itself with get_kernel(repo, version=2): point LOCAL_KERNELS at us, and
    count the calls of each public function (wrapped with functools.wraps: transformers introspects them)."""
    with mock.patch.dict("os.environ", {"LOCAL_KERNELS": f"{KERNEL}={REPO}", "HF_HUB_OFFLINE": "1"}):
        import kernels
        module = kernels.get_kernel(KERNEL, version=2)
        assert module is fa   # the very module the other tests exercise
        calls = {}
        originals = {}
        for name in ["flash_attn_varlen_func", "flash_attn_func", "flash_attn_with_kvcache"]:
            original = originals[name] = getattr(module, name)

            @functools.wraps(original)
            def counted(*args, _original=original, _name=name, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                if kwargs.get("block_table") is not None:
                    calls[f"{_name} with block_table"] = calls.get(f"{_name} with block_table", 0) + 1
                return _original(*args, **kwargs)
            setattr(module, name, counted)
        module.calls = calls
        yield module
        for name, original in originals.items():
            setattr(module, name, original)


def build(family, attn_implementation, dtype=torch.float32, **overrides):
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    if family == "gpt_oss":   # sinks start at zero: give them values that matter
        for layer in model.model.layers:
            layer.self_attn.sinks.data.normal_(0, 2, generator=torch.Generator().manual_seed(1))
    if family == "gemma2":    # random init gives |scores| << softcap: scale q and k so the cap bends them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.data *= 30
            layer.self_attn.k_proj.weight.data *= 30
    return model.to(dtype).to(DEVICE).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def models(request, kernel_module):
    family = request.param
    return family, build(family, "eager"), build(family, KERNEL)


def tokens(*shape, seed=0):
    return torch.randint(1, COMMON["vocab_size"], shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def assert_same_logits(reference, ours, where=None):
    if where is not None:
        reference, ours = reference[where], ours[where]
    assert cosine(reference, ours) >= 0.9999
    assert torch.equal(reference.argmax(-1), ours.argmax(-1))
    return cosine(reference, ours)


@torch.no_grad()
def test_forward_longer_than_the_window(models, kernel_module):
    family, eager, ours = models
    ids = tokens(1, 64)
    kernel_module.calls.clear()
    assert_same_logits(eager(ids).logits, ours(ids).logits)
    assert kernel_module.calls == {"flash_attn_func": 2}   # our kernel ran, in every layer


WITHOUT_FEATURE = {"mistral": dict(sliding_window=None), "qwen2": dict(layer_types=["full_attention"] * 2),
                   "gemma2": dict(attn_logit_softcapping=None), "gpt_oss": dict(layer_types=["full_attention"] * 2)}


@torch.no_grad()
@pytest.mark.parametrize("family", list(WITHOUT_FEATURE))
def test_features_matter(family):
    """Controls: the window / softcap / sinks change the logits, so the agreement above is not by accident."""
    ids = tokens(1, 64)
    without = build(family, "eager", **WITHOUT_FEATURE[family])
    if family == "gpt_oss":   # and no sinks
        for layer in without.model.layers:
            layer.self_attn.sinks.data.fill_(-1e4)
    assert cosine(build(family, "eager")(ids).logits, without(ids).logits) < 0.9999


@torch.no_grad()
def test_left_padded_batch(models, kernel_module):
    family, eager, ours = models
    ids = tokens(3, 48, seed=1)
    mask = torch.ones(3, 48, dtype=torch.long, device=DEVICE)
    mask[1, :9] = 0
    mask[2, :30] = 0
    kernel_module.calls.clear()
    assert_same_logits(eager(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits, mask.bool())
    assert kernel_module.calls == {"flash_attn_varlen_func": 2}   # the unpad / varlen path


@torch.no_grad()
def test_packed_sequences(models, kernel_module):
    family, eager, ours = models
    lengths = [20, 33, 7]
    sequences = [tokens(1, n, seed=n) for n in lengths]
    packed = torch.cat(sequences, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    kernel_module.calls.clear()
    got = ours(packed, position_ids=position_ids).logits[0]
    assert kernel_module.calls == {"flash_attn_varlen_func": 2}   # sequences found from position_ids
    expected = torch.cat([eager(s).logits[0] for s in sequences])
    assert_same_logits(expected, got)


@torch.no_grad()
def test_greedy_generate(models, kernel_module):
    family, eager, ours = models
    prompt = tokens(1, 20, seed=2)
    kernel_module.calls.clear()
    got = ours.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = eager.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert kernel_module.calls["flash_attn_func"] == 2 * 24   # prefill + 23 decode steps (Sq=1 < Sk), per layer


def continuous_batching_fast_path_on_this_machine():
    """transformers 5.22 takes its block-table decode path (flash_attn_with_kvcache) only for implementations
    named flash*2/3 on CUDA or XPU (generation/continuous_batching/initialization.py). We lift exactly that
    name + device gate, leaving the rest of the check (every attention type must support block tables, the
    kernel must expose flash_attn_with_kvcache) and all of continuous batching untouched."""
    from transformers.generation.continuous_batching import initialization

    original = initialization.ensure_decode_fast_path_is_available

    def without_device_gate(config, cb_config, user_requested):
        with mock.patch.object(initialization, "is_flash_attention_requested", lambda *a, **k: True), \
                mock.patch.object(torch.cuda, "is_available", lambda: True):
            original(config, cb_config, user_requested)

    return mock.patch.object(initialization, "ensure_decode_fast_path_is_available", without_device_gate)


@torch.no_grad()
def test_continuous_batching(models, kernel_module):
    family, eager, ours = models
    prompts = [tokens(n, seed=n).tolist() for n in (5, 17, 30, 11)]
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    # A small paged cache: the simulator copies every bound buffer per launch, and by default transformers
    # sizes the cache from free memory (GBs).
    paging = ContinuousBatchingConfig(page_size=16, num_blocks=32, max_batch_tokens=128)
    kernel_module.calls.clear()
    with continuous_batching_fast_path_on_this_machine():
        results = ours.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=paging)
    for i, prompt in enumerate(prompts):
        expected = eager.generate(torch.tensor([prompt], device=DEVICE), generation_config=config)[0, len(prompt):]
        assert len(expected) == 24
        expected = expected.tolist()
        assert results[f"req_{i}"].generated_tokens == expected
    if family in ("llama",):   # all layers full attention: transformers decodes through the block tables
        assert kernel_module.calls.get("flash_attn_with_kvcache", 0) >= 2 * 23
    else:   # sliding layers: transformers 5.22's sliding allocator has no block tables, so it stays on varlen
        assert kernel_module.calls.get("flash_attn_varlen_func", 0) >= 2 * 24
        assert "flash_attn_with_kvcache" not in kernel_module.calls
    # transformers 5.22 gathers each prefill chunk's keys itself (read_index): no block table reaches the paged prefill
    assert "flash_attn_varlen_func with block_table" not in kernel_module.calls


@torch.no_grad()
@pytest.mark.parametrize("family", ["mistral", "gpt_oss"])
def test_half_precision(kernel_module, family):
    """fp16 models: error against the fp32 eager model within 2x (+ eps) of eager fp16's own; the fp32 model's
    greedy tokens except at near-ties that fp16 rounding alone flips (eager fp16 itself flips one of gpt-oss's)."""
    reference = build(family, "eager")
    eager16, ours16 = build(family, "eager", torch.float16), build(family, KERNEL, torch.float16)
    ids = tokens(2, 48, seed=3)
    exact, plain, got = reference(ids).logits.double(), eager16(ids).logits.double(), ours16(ids).logits.double()
    fp16_error = (plain - exact).abs().max()
    assert (got - exact).abs().max() <= 2 * fp16_error + 1e-3
    top2 = exact.topk(2, -1).values
    decided = top2[..., 0] - top2[..., 1] >= 2 * fp16_error
    assert decided.float().mean() > 0.9
    assert torch.equal(got.argmax(-1)[decided], exact.argmax(-1)[decided])
    assert cosine(exact, got) >= 0.9999


def test_compiled_model_forward(kernel_module):
    """torch.compile(fullgraph=True) over a model forward traces through our attention (no graph break) and
    matches eager mode. bf16 and batch 2: in fp32, or with batch 1 + position_ids, transformers' own wrapper
    breaks the graph (a logging call, a data-dependent packed-sequence check) before reaching the kernel."""
    ours = build("mistral", KERNEL, torch.bfloat16)
    ids = tokens(2, 40, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(ids).logits, ours(ids).logits)


def test_model_family_table_matches_the_transformers_tests():
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (Llama|Mistral|Qwen2|Gemma 2|gpt-oss|[A-Za-z0-9 -]+) \| [^|]+ \|$", readme, re.M)
    names = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Gemma 2": "gemma2", "gpt-oss": "gpt_oss"}
    assert sorted(names[r] for r in rows if r in names) == sorted(FAMILIES)


# ---------------------------------------------------------------------------------------- training
TRAIN_FAMILIES = ["llama", "gpt_oss"]   # plain causal GQA; sinks + alternating sliding window


def training_run(family, attn_implementation, batch, steps):
    """`steps` AdamW steps from the same seed: the losses and the first step's gradients."""
    model = build(family, attn_implementation).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, first_grads = [], {}
    for step in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads


def training_batches(layout):
    """(our batch, eager's batch) of the same examples. Packed (padding-free, sequences found from position_ids;
    the boundary-crossing next-token targets ignored) against eager on the right-padded batch: transformers' eager
    attention does not split a packed row, and both losses average the same sum(n - 1) predictions."""
    if layout == "batched":
        ids = tokens(2, 40, seed=6)
        return dict(input_ids=ids, labels=ids), dict(input_ids=ids, labels=ids)
    sequences = [tokens(1, n, seed=n)[0] for n in (20, 33, 7)]
    ids = torch.cat(sequences)[None]
    labels = torch.cat([torch.cat([torch.full((1,), -100, device=DEVICE), s[1:]]) for s in sequences])[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None].to(DEVICE)
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    return (dict(input_ids=ids, labels=labels, position_ids=position_ids),
            dict(input_ids=padded, attention_mask=mask, labels=padded.masked_fill(mask == 0, -100)))


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("family", TRAIN_FAMILIES)
@pytest.mark.parametrize("steps", [pytest.param(20, marks=pytest.mark.slow), 3])
def test_training_matches_eager(kernel_module, family, layout, steps):
    """Fine-tuning through the fused backward: per-step loss within 1e-3 (relative) of eager's and first-step
    gradients with cosine >= 0.9999 on every parameter (fp32). CI runs 3 steps; the slow set the full 20."""
    our_batch, eager_batch = training_batches(layout)
    kernel_module.calls.clear()
    ours, our_grads = training_run(family, KERNEL, our_batch, steps)
    assert kernel_module.calls == {"flash_attn_varlen_func" if layout == "packed" else "flash_attn_func": 2 * steps}
    eager, eager_grads = training_run(family, "eager", eager_batch, steps)
    assert eager[-1] < eager[0]   # it trains
    for step, (a, b) in enumerate(zip(ours, eager)):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: loss {a} vs eager {b}"
    assert our_grads.keys() == eager_grads.keys()
    if family == "gpt_oss":
        assert any(name.endswith("sinks") for name in our_grads)   # d s_aux reached the sinks
    for name, grad in eager_grads.items():
        assert cosine(our_grads[name], grad) >= 0.9999, name
