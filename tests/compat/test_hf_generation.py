"""transformers' `generate` on a SepLLM export against the project's own decoding (CPU, fp32).

Every step's logits must equal ours within 1e-4 (fp32 rounding of two implementations of the same
math; a wrong key set moves them by 1e-2 or more on these random models). Greedy tokens alone are not
enough: a wrong mask can still pick the same argmax.
"""

import sys

import pytest
import torch
import transformers
from packaging.version import Version

from megatron_sep.convert.modeling_sepllm import SepLLMVisibility
from megatron_sep.data.separators import resolve_separator_ids
from megatron_sep.inference import DecodeOptions, generate

from ..export_utils import export_tiny

TOL = 1e-4
NEW = 24
CASES = {
    "llama_sepllm": (
        {"family": "llama", "num_kv_heads": 2, "tie_embeddings": True},
        {"kind": "sepllm", "window": [3, 5, 200], "init_tokens": 2},
    ),
    "neox_sepllm_H": (
        {"family": "neox", "rotary_pct": 0.5, "rotary_base": 5000.0},
        {"kind": "sepllm", "window": 4, "init_tokens": 3, "hybrid": "H"},
    ),
    "llama_streamingllm": (
        {"family": "llama", "num_kv_heads": 4},
        {"kind": "streamingllm", "window": 4},
    ),
    "neox_fixed_interval": (
        {"family": "neox", "rotary_pct": 0.25},
        {"kind": "fixed_interval", "fixed_interval": 3, "window": 4},
    ),
}


def export_case(tmp_path, tokenizer, name):
    ours, out, tok = export_tiny(
        tmp_path, tokenizer, *CASES[name], num_layers=3, out_name=f"hf_{name}"
    )
    return (
        ours,
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(),
        tok,
    )


def prompts(tok, sep_ids):
    """Two prompts of different lengths; the first ends on a separator."""
    a = tok.encode("The model reads, and writes. Does it stop? No; it goes on: line after line.")
    b = tok.encode("Separators mark where each sentence ends, and the window")
    assert a[-1] in sep_ids and b[-1] not in sep_ids and len(a) != len(b)
    return [torch.tensor(a), torch.tensor(b[: len(a) - 5])]


def hf_decode(hf, rows, pad_id, side="right", **generate_kwargs):
    """Padded batch through transformers' generate -> (new tokens [b, NEW], step logits [b, NEW, V])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = r, 1
    out = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    return out.sequences[:, width:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_project_decoding_step_by_step(corpus, tmp_path, name, cache):
    ours, hf, tok = export_case(tmp_path, corpus["tokenizer"], name)
    rows = prompts(tok, set(resolve_separator_ids(tok)[0]))
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    V = hf.config.vocab_size
    # batch 1, then batch 2 with the shorter row right-padded, then left-padded
    for batch, side in (([rows[0]], "right"), (rows, "right"), (rows, "left")):
        new, logits = hf_decode(hf, batch, tok.pad_id, side, **extra)
        for r, prompt in enumerate(batch):
            tokens, mine = generate(ours, prompt[None], NEW, output_logits=True)
            assert torch.equal(tokens[0, len(prompt) :], new[r]), (name, r, tokens, new)
            step_err = (mine[0, :, :V] - logits[r]).abs().max().item()
            assert step_err <= TOL, (name, cache, len(batch), side, r, step_err)
            # the full sequence under the training mask: exactly the rule's keys
            with torch.no_grad():
                full = ours(tokens)[0, len(prompt) - 1 : -1, :V]
            assert (full - logits[r]).abs().max().item() <= TOL


def test_manual_decoding_loop_with_the_returned_cache(corpus, tmp_path):
    """A user's own loop: prefill, then one token at a time through the cache the model returned."""
    ours, hf, tok = export_case(tmp_path, corpus["tokenizer"], "llama_sepllm")
    prompt = prompts(tok, set(resolve_separator_ids(tok)[0]))[0][None]
    tokens, mine = generate(ours, prompt, 8, output_logits=True)
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
        for t in range(8):
            assert (out.logits[:, -1] - mine[:, t]).abs().max().item() <= TOL
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            out = hf(
                tokens[:, prompt.shape[1] + t : prompt.shape[1] + t + 1],
                past_key_values=cache,
                use_cache=True,
            )


@pytest.mark.parametrize("window", [None, 1, 3])
def test_decoding_mask_is_the_sepllm_rule(window):
    """Prefill 9 tokens, then decode 3 more one at a time; row 1 is padded at slots 6-8, row 0 at slot 0."""
    torch.manual_seed(0)
    b, s, a = 2, 12, 2
    is_sep = torch.rand(b, s) < 0.3
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, 6:9] = False  # right padding of row 1's prompt
    valid[0, 0] = False  # a leading pad: it sees only itself
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    keep = is_sep | (pos < a)
    for first, last in ((0, 9), (9, 10), (10, 11), (11, 12)):
        vis = SepLLMVisibility(
            pos[:, :last], keep[:, :last], valid[:, :last], pos[:, first:last], first
        )
        got = vis.mask(window, last + 4)[:, 0]  # 4 unfilled static slots
        assert not got[..., last:].any()
        for r in range(b):
            real = valid[r].nonzero().flatten().tolist()
            for qi, q in enumerate(range(first, last)):
                # the rule over positions: earlier, and initial or separator or inside the window (self
                # included); a padding slot has the previous real token's position, so it sees what that saw
                want = [
                    k
                    for k in real
                    if k <= q
                    and pos[r, k] <= pos[r, q]
                    and (window is None or keep[r, k] or pos[r, q] - pos[r, k] < window)
                ]
                assert got[r, qi, :last].nonzero().flatten().tolist() == (want or [q]), (
                    window,
                    r,
                    q,
                )


def test_export_refuses_unsupported_transformers(corpus, tmp_path):
    _, _, _ = export_case(tmp_path, corpus["tokenizer"], "llama_streamingllm")
    out = tmp_path / "hf_llama_streamingllm"
    code = (out / "modeling_sepllm.py").read_text()
    (out / "modeling_sepllm.py").write_text(
        code.replace(
            'MIN_TRANSFORMERS, BELOW_TRANSFORMERS = "4.57.0"',
            'MIN_TRANSFORMERS, BELOW_TRANSFORMERS = "99.0.0"',
        )
    )
    with pytest.raises(ImportError) as err:
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    msg = str(err.value)
    assert (
        f"transformers {transformers.__version__} is installed" in msg and ">=99.0.0,<6.0.0" in msg
    )


@pytest.mark.parametrize("name", ["llama_sepllm", "neox_sepllm_H"])
def test_sep_cache_in_transformers_generate_matches_ours(corpus, tmp_path, name):
    """The exported SepCache (a transformers Cache) under `generate`: with a capacity small enough to
    compress many times over prompt + 40 new tokens, every step's logits equal the project's SepCache
    decoding (the same rule in two implementations), and the cache never holds more than its capacity."""
    ours, hf, tok = export_case(tmp_path, corpus["tokenizer"], name)
    prompt = prompts(tok, set(resolve_separator_ids(tok)[0]))[0][None]
    sizes = (2, 3, 4, 12)
    SepCache = sys.modules[type(hf).__module__].SepCache  # the class shipped in the export
    cache = SepCache(*sizes)
    name = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **{name: cache},
    )
    mine, logits = generate(
        ours, prompt, 40, DecodeOptions(cache="sep", cache_sizes=sizes), output_logits=True
    )
    assert torch.equal(out.sequences, mine)
    assert (torch.stack(out.logits, 1) - logits).abs().max() < TOL
    assert cache.get_seq_length() <= sizes[3] and cache.sepllm_seen == prompt.shape[1] + 39
    with pytest.raises(ValueError, match="init \\+ seps \\+ window < capacity"):
        SepCache(4, 64, 256, 300)
