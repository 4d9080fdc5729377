"""flashgen inside a Hugging Face model: a small randomly initialised Llama built in code, against SDPA."""

import os

import pytest
import torch

from flashgen import dispatch, ops

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def no_user_database(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHGEN_DB", raising=False)  # and the default database is one that does not exist:
    absent = f"sqlite:///{tmp_path / 'absent.sqlite3'}"
    monkeypatch.setattr(dispatch, "default_database_url", lambda: os.environ.get("FLASHGEN_DB") or absent)
    monkeypatch.setattr(dispatch, "_warned", set())
    dispatch.reload()
    ops._plans.clear()



def _llama_pair():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from flashgen.integrations import transformers as fg

    fg.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    reference = LlamaForCausalLM(copy.deepcopy(config)).eval()
    reference.set_attn_implementation("sdpa")
    ours = LlamaForCausalLM(copy.deepcopy(config)).eval()
    ours.load_state_dict(reference.state_dict())
    ours.set_attn_implementation(fg.NAME)
    return reference, ours


@pytest.mark.cpu_interpreter
def test_transformers_llama_logits_match_sdpa():
    reference, ours = _llama_pair()
    assert ours.config._attn_implementation == "fgen"
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert any(plan.route == "kernel" and plan.variant.causal for plan in ops._plans.values())


@pytest.mark.cpu_interpreter
def test_transformers_padding_mask_goes_through_the_fallback():
    reference, ours = _llama_pair()
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad(), pytest.warns(dispatch.FlashgenWarning, match="attn_mask"):
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:, 5:], expected[:, 5:], atol=1e-4, rtol=1e-4)
