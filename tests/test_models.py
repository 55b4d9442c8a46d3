import pytest
import torch

from utils.models import (GPT, REGISTRY, EncoderClassifier, ModelLoadError, UnsupportedModel, build_model, count_parameters,
                          get_logits, load_model, model_max_len, model_task, model_vocab_size)
from tests.user_models import CausalLMOutput


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small", "encoder-tiny"])
def test_registry_models_give_task_shaped_logits(name):
    model = build_model(name)
    x = torch.randint(0, 256, (3, 10))
    logits = model(x)
    if isinstance(model, GPT):
        assert logits.shape == (3, 10, 256)
    else:
        assert logits.shape == (3, model.config.num_classes)


def test_sizes_go_up_to_gpt2_small():
    # GPT-2 small is 12 x 768; with a byte vocabulary that is ~86M parameters (GPT-2's 124M is mostly its 50k vocab).
    cfg = REGISTRY["gpt2-small"][1]
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.max_len) == (12, 768, 12, 1024)
    assert count_parameters(build_model("gpt-tiny")) < 200_000


def test_gpt_is_causal():
    model = build_model("gpt-tiny").eval()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256  # change only the future
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])


def test_encoder_is_bidirectional():
    model = build_model("encoder-tiny").eval()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 256  # the last token changes the first-token pooled output
    assert not torch.allclose(model(x), model(y))


def test_recorded_attention_matches_fast_path():
    model = build_model("gpt-tiny").eval()
    x = torch.randint(0, 256, (2, 9))
    fast = model(x)
    for block in model.blocks:
        block.attn.record_attention = True
    slow = model(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    att = model.blocks[0].attn.last_attention
    assert att.shape == (2, 2, 9, 9)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 9))
    assert att[0, 0].triu(1).abs().max() == 0  # no weight on future tokens


def test_padding_mask_hides_padded_keys():
    model = build_model("encoder-tiny").eval()
    x = torch.randint(1, 256, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    changed = x.clone()
    changed[0, 6] = (changed[0, 6] + 7) % 256  # a padded position
    torch.testing.assert_close(model(x, mask), model(changed, mask))


def test_overrides_and_too_long_input():
    model = build_model("encoder-tiny", num_classes=7, max_len=16)
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 7)
    with pytest.raises(ValueError, match="exceeds the model's max_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ModelLoadError, match="unknown config field.*'layers'"):
        build_model("gpt-tiny", layers=3)


def test_load_model_forms(tmp_path):
    assert isinstance(load_model("encoder-tiny"), EncoderClassifier)
    assert isinstance(load_model("tests.user_models:make_hf_style").inner, GPT)
    model = build_model("gpt-tiny")
    assert load_model(model) is model
    path = tmp_path / "my_model.py"
    path.write_text("import torch.nn as nn\n\ndef factory(width=3):\n    return nn.Linear(width, 2)\n")
    assert load_model(f"{path}:factory", width=5).in_features == 5


@pytest.mark.parametrize("spec, message", [
    ("gpt-huge", "expected a registry name"),
    ("no_such_package.mod:f", "cannot import module 'no_such_package.mod'"),
    ("tests.user_models:missing", "has no attribute 'missing'"),
    ("tests.user_models:make_failing", "raised RuntimeError: weights file missing"),
    ("tests.user_models:make_not_a_module", "returned str; expected a torch.nn.Module"),
    ("nowhere/model.py:f", "does not exist"),
    (42, "must be an nn.Module or a string; got int"),
])
def test_load_model_errors_name_what_was_given(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_get_logits_accepts_common_output_forms():
    t = torch.randn(2, 3, 5)
    assert get_logits(t) is t
    assert get_logits((t, t.sum())) is t
    assert get_logits((t.sum(), t)) is t  # (loss, logits) as Hugging Face returns with labels
    assert get_logits({"logits": t, "loss": t.sum()}) is t
    assert get_logits(CausalLMOutput(logits=t)) is t
    with pytest.raises(TypeError, match="cannot find logits in model output of type dict"):
        get_logits({"hidden": t})
    with pytest.raises(TypeError, match="of type tuple"):
        get_logits((t.sum(),))


def test_task_and_vocab_are_read_from_the_model():
    gpt, enc = build_model("gpt-tiny"), build_model("encoder-tiny")
    assert model_task(gpt, torch.zeros(1, 2, 256)) == "causal-lm"
    assert model_task(enc, torch.zeros(1, 4)) == "classification"
    assert model_task(torch.nn.Identity(), torch.zeros(1, 2, 3)) == "causal-lm"
    with pytest.raises(ValueError, match="cannot tell the task"):
        model_task(torch.nn.Identity(), torch.zeros(3))
    assert model_vocab_size(gpt) == 256
    assert model_vocab_size(torch.nn.Sequential(torch.nn.Embedding(100, 4))) == 100


def test_max_len_from_config_or_position_embedding():
    assert model_max_len(build_model("gpt-tiny", max_len=48)) == 48

    class UserModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.pos_embedding = torch.nn.Embedding(256, 8), torch.nn.Embedding(32, 8)

    assert model_max_len(UserModel()) == 32

    class OtherLibrary(UserModel):  # another library's attribute, not a config
        max_seq_len = 24

    assert model_max_len(OtherLibrary()) == 24

    class Unstated(torch.nn.Module):  # says nothing, fails beyond 256 positions: measured, never guessed
        def __init__(self):
            super().__init__()
            self.emb, self.table = torch.nn.Embedding(256, 8), torch.nn.Parameter(torch.zeros(256, 8))

        def forward(self, input_ids):
            return self.emb(input_ids) + self.table[:input_ids.size(1)].expand(input_ids.size(0), -1, -1) * 1

    model = Unstated()
    assert model_max_len(model) == 256 and model.suite_max_len == 256
    with pytest.raises(UnsupportedModel, match="fails on 64 tokens and states no maximum length"):
        model_max_len(torch.nn.Linear(2, 2))
