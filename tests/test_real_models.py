"""Models nobody here wrote, built from configs (no download): Hugging Face causal LMs, classifiers and a
masked LM, PyTorch's nn.TransformerEncoder, a minimal GPT that returns only the last position, an
encoder-decoder and a vision model. Each goes through the tiers as a user would run them, or is refused
with one line that says what the suite supports."""

import os
import signal

import pandas as pd
import pytest
import torch

from tests.packages import optional
from utils.data import load_corpus
from utils.models import load_model, model_max_len, probe_model
from utils.results import read_json
from utils.run import main
from utils.measure import matmul_params, measured_flops_per_token, training_flops_per_token
from utils.tier3_training_utilities import test_fine_tuning
from utils.tiers import TIERS, run_tier

transformers = optional("transformers")
tokenizers = optional("tokenizers")

TINY = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128, vocab_size=512,
            max_position_embeddings=128)
RUN = ["-p", "device=cpu", "-p", "seq_len=32", "-p", "latency_iters=3", "-p", "batch_sizes=[1, 2]", "-p", "batch_size=4",
       "-p", "steps=30", "-p", "lr=0.003", "-p", "trials=1", "-p", "warmup_steps=1", "-p", "timed_steps=1",
       "-p", "emulated_amp=full"]


def bpe_tokenizer(folder):
    """A byte-level BPE tokenizer trained here on the built-in corpus, saved the way Hugging Face saves one."""
    corpus = load_corpus()
    text = bytes(torch.cat([corpus.train, corpus.val]).numpy()).decode("utf-8", errors="ignore")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<mask>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny models built from configs and saved with save_pretrained, as a user's checkpoints would be."""
    root = tmp_path_factory.mktemp("zoo")
    T = transformers
    torch.manual_seed(0)
    models = {
        "gpt2": T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=512,
                                               bos_token_id=0, eos_token_id=0)),
        "llama": T.LlamaForCausalLM(T.LlamaConfig(**TINY, num_key_value_heads=1)),
        "bert2": T.BertForSequenceClassification(T.BertConfig(**TINY)),               # Hugging Face's default: 2 labels
        "bert5": T.BertForSequenceClassification(T.BertConfig(**TINY, num_labels=5)),
        "roberta": T.RobertaForMaskedLM(T.RobertaConfig(**{**TINY, "max_position_embeddings": 130}, pad_token_id=1)),
        "t5": T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, vocab_size=512)),
        "vit": T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=128, image_size=32, patch_size=8)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    bpe_tokenizer(root / "gpt2")  # the GPT-2 checkpoint comes with its own tokenizer
    return root


def test_tasks_and_usable_lengths_come_from_the_configs(zoo):
    expected = {"gpt2": ("causal-lm", 128), "llama": ("causal-lm", 128), "bert2": ("classification", 128),
                "bert5": ("classification", 128), "roberta": ("masked-lm", 128)}  # RoBERTa: positions start after pad
    for name, (task, max_len) in expected.items():
        model = load_model(f"hf:{zoo / name}")
        assert (probe_model(model), model_max_len(model)) == (task, max_len), name
    bert5 = load_model(f"hf:{zoo / 'bert5'}")
    probe_model(bert5)
    assert bert5.suite_num_classes == 5


def test_weights_must_stay_fp32(zoo):
    with pytest.raises(ValueError, match="torch_dtype='bfloat16' refused .* keeps fp32 master weights"):
        load_model(f"hf:{zoo / 'gpt2'}", torch_dtype="bfloat16")


@pytest.mark.slow
def test_every_model_goes_through_all_three_tiers_without_a_false_verdict(zoo, tmp_path):
    grid = tmp_path / "grid.yaml"
    models = [f"hf:{zoo / n}" for n in ("gpt2", "llama", "bert2", "bert5", "roberta")] + \
        ["tests.user_models:TransformerEncoderLM", "encoder-tiny"]  # and the built-in classifier, tier 3 included
    grid.write_text("model:\n" + "".join(f"  - '{m}'\n" for m in models))
    assert main(["--grid", str(grid), "--out", str(tmp_path), "--name", "zoo", *RUN]) == 0
    summary = pd.read_csv(tmp_path / "zoo" / "summary.csv")
    assert len(summary) == 21 and (summary["run_status"] == "ok").all()
    for _, row in summary.iterrows():
        results = read_json(tmp_path / "zoo" / row["run_id"] / "results.json")
        wrong = [v for v in results["verdicts"] if not v["timing"] and v["status"] != "pass"]
        assert not wrong, (row["run_id"], wrong)
        if row["tier"] == 3:  # AMP tracks fp32 for every model; the language models (causal and masked) learn
            assert row["verdict.amp_safe"] == "pass"
            assert pd.notna(row["verdict.amp_worth_it"])  # the speed verdict is there; its status is a timing
            if results["record"]["task"] != "classification":
                assert row["final_eval_loss_fp32"] < 0.9 * results["extra"]["fp32_baseline"]["initial_eval_loss"], row["run_id"]


def test_an_hf_model_trains_on_its_own_tokenizers_ids(zoo):
    result = run_tier(3, {"model": f"hf:{zoo / 'gpt2'}", "device": "cpu", "seq_len": 32, "batch_size": 4, "steps": 20,
                          "lr": 3e-3, "trials": 1, "warmup_steps": 0, "timed_steps": 1})
    assert result.record["vocab"] == 400 and "tokens]" in result.record["data"]  # the BPE's vocabulary, not 256 bytes
    assert result.checks["fp32_baseline"].verdict.status == "pass" and result.checks["amp_safe"].verdict.status == "pass"
    by_bytes = run_tier(1, {"model": f"hf:{zoo / 'llama'}", "device": "cpu", "latency_iters": 3, "batch_sizes": [1]})
    assert by_bytes.record["vocab"] == 256  # a checkpoint without a tokenizer: byte tokens, said in the record
    told = run_tier(1, {"model": f"hf:{zoo / 'llama'}", "tokenizer": str(zoo / "gpt2"), "device": "cpu",
                        "latency_iters": 3, "batch_sizes": [1]})
    assert told.record["vocab"] == 400 and told.status == "pass"


@pytest.mark.parametrize("model, says", [
    ("tests.user_models:LastPositionGPT", "returns logits of shape (2, 1, 256) for input_ids (2, 8)"),
    ("t5", "is an encoder-decoder (t5): unsupported"),
    ("vit", "(vit) has no token vocabulary, so it does not take token ids (a vision or audio model): unsupported"),
])
def test_unsupported_models_get_one_line_in_every_tier(zoo, tmp_path, model, says):
    spec = model if ":" in model else f"hf:{zoo / model}"
    assert main(["-p", f"model={spec}", "--out", str(tmp_path), *RUN]) == 0  # a refusal is a verdict, not a crash
    summary = pd.read_csv(tmp_path / "default" / "summary.csv")
    assert len(summary) == 3 and (summary["run_status"] == "ok").all() and (summary["verdict"] == "fail").all()
    assert summary["unsupported"].str.contains(says, regex=False).all()
    assert summary["unsupported"].str.contains("The suite supports causal LMs, classifiers and masked LMs").all()
    for row in summary.itertuples():
        executed = (tmp_path / "default" / row.run_id / row.notebook).read_text()
        assert "Traceback" not in executed and "unsupported model: " in executed


def test_causality_is_checked_and_a_future_peeking_lm_fails_it():
    good = run_tier(1, {"model": "tests.user_models:TransformerEncoderLM", "device": "cpu", "latency_iters": 3})
    peeks = run_tier(1, {"model": "tests.user_models:BidirectionalEncoderLM", "device": "cpu", "latency_iters": 3})
    assert good.checks["causality"].verdict.status == "pass"
    v = peeks.checks["causality"].verdict
    assert v.status == "fail" and "sees future tokens" in v.reason and "task='masked-lm'" in v.reason


@pytest.mark.parametrize("seed", range(5))
def test_default_embedding_init_is_not_called_huge(seed):
    r = run_tier(1, {"model": "tests.user_models:TransformerEncoderLM", "seed": seed, "device": "cpu", "latency_iters": 3,
                     "batch_sizes": [1]})
    assert r.checks["initialization"].verdict.status == "pass", r.checks["initialization"].verdict.reason


def test_key_biases_are_not_called_vanishing(zoo):
    r = run_tier(1, {"model": f"hf:{zoo / 'bert2'}", "device": "cpu", "latency_iters": 3, "batch_sizes": [1]})
    grads = r.checks["gradient_flow"].data.set_index("parameter")
    keys = grads[grads.index.str.endswith("attention.self.key.bias")]
    assert len(keys) == 2 and (keys["grad_norm"] < 1e-8).all() and (keys["status"] == "ok").all()
    assert keys["note"].str.contains("softmax is invariant").all()
    assert r.checks["gradient_flow"].verdict.status == "pass"


def test_hf_attention_is_read_per_head_and_the_probe_says_it_switched(zoo):
    r = run_tier(2, {"model": f"hf:{zoo / 'llama'}", "device": "cpu"})
    attention = r.checks["attention"]
    assert attention.verdict.status == "pass" and len(attention.data) == 4  # 2 layers x 2 heads
    assert "read with eager attention for this probe; the model runs sdpa" in attention.verdict.reason


def test_a_classifier_with_more_classes_than_the_builtin_set_is_refused_with_the_reason(zoo, tmp_path):
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=12))
    r = run_tier(1, {"device": "cpu"}, model=model)
    assert r.status == "fail" and "has 2 to 8 classes; the model has 12" in r.checks["supported"].verdict.reason


def test_tier3_caps_seq_len_at_the_models_maximum_and_trains_a_classifier():
    r = run_tier(3, {"model": "encoder-tiny", "device": "cpu", "batch_size": 4, "steps": 10, "trials": 1,
                     "warmup_steps": 0, "timed_steps": 1, "emulated_amp": "full"})  # default seq_len 128 > encoder-tiny's 64
    assert r.record["seq_len"] == 64 and r.record["task"] == "classification"
    assert {v.check for v in r.verdicts} == {"fp32_baseline", "amp_safe", "amp_worth_it", "diagnosis"}
    assert r.checks["amp_safe"].verdict.status == "pass"


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_flops_of_a_hugging_face_gpt2_are_counted_not_assumed(attention):
    """FlopCounterMode on the real model: within 5% of 6N + 12 L T d from GPT-2's own config, with either of its
    attention paths (explicit matmuls, or SDPA's fused kernel)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=512, attn_implementation=attention)
    model = transformers.GPT2LMHeadModel(cfg)
    x = torch.randint(0, 512, (2, 128))
    analytic = 6 * matmul_params(model) + 12 * cfg.n_layer * 128 * cfg.n_embd
    assert measured_flops_per_token(model, (x, x)) == pytest.approx(analytic, rel=0.05)
    assert training_flops_per_token(model, 128) is None  # the formula is for this project's models only


@pytest.mark.versions
def test_a_grouped_query_attention_llama_goes_through_every_tier(zoo, tmp_path):
    """Keys and values with fewer heads than queries (Llama, Mistral, Qwen): Colab's torch crashed tier 3 on it.
    Every check of every tier runs (none crashes, none refuses), and tier 3 counts its FLOPs."""
    small = {1: {"seq_len": 32, "latency_iters": 3, "batch_sizes": [1, 2]},
             2: {"seq_len": 32, "batch_size": 2},
             3: {"seq_len": 32, "batch_size": 4, "steps": 6, "trials": 1, "warmup_steps": 1, "timed_steps": 1}}
    for tier, params in small.items():
        r = run_tier(tier, {"model": f"hf:{zoo / 'llama'}", "device": "cpu", "output_dir": str(tmp_path), **params})
        crashed = [v.reason for v in r.verdicts if v.reason.startswith("the check crashed") or v.check == "supported"]
        assert not crashed and list(r.checks) == list(TIERS[tier].sections), (tier, crashed)
    assert r.checks["amp_worth_it"].extra["flops_per_token"] > 6 * r.figures["parameters"] / 2


@pytest.mark.versions
def test_flops_of_grouped_query_attention_are_counted_alike_fused_or_explicit():
    """A Llama whose keys and values have fewer heads than its queries (Llama, Mistral, Qwen do): SDPA's fused
    kernel is counted by the project's own formula (torch 2.11's refused these shapes, crashing tier 3) and
    gives exactly the count of the explicit matmuls of the eager path, which repeats the key and value heads, plus
    the scores the fused backward computes again (one q k^T per layer, with all 4 query heads)."""
    x = torch.randint(0, 512, (2, 64))
    counts = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_attention_heads": 4}, num_key_value_heads=1,
                                                                       attn_implementation=attention))
        counts[attention] = measured_flops_per_token(model, (x, x))
    batch, seq, layers, heads, head_dim = 2, 64, TINY["num_hidden_layers"], 4, TINY["hidden_size"] // 4
    recomputed_scores = layers * 2 * batch * heads * seq * seq * head_dim / (batch * seq)
    assert counts["sdpa"] == counts["eager"] + recomputed_scores and counts["eager"] > 6 * matmul_params(model)


@pytest.mark.versions
def test_a_hugging_face_model_resumes_bitwise_from_its_checkpoint(zoo, tmp_path):
    """Llama (grouped-query attention) from its folder: stopped by Ctrl-C at step 10, resumed, equal to the run that
    never stopped: HF state dicts go through the weights_only checkpoint like ours."""
    class CtrlC:
        def on_step_end(self, record):
            if record["step"] == 10:
                os.kill(os.getpid(), signal.SIGINT)

    run = dict(precision="bf16-mixed", steps=20, batch_size=4, seq_len=32, eval_interval=10, eval_batches=2, progress=False,
               device="cpu")
    spec = f"hf:{zoo / 'llama'}"
    straight = test_fine_tuning(spec, **run)
    assert test_fine_tuning(spec, checkpoint_dir=tmp_path, callbacks=[CtrlC()], **run).interrupted
    resumed = test_fine_tuning(spec, checkpoint_dir=tmp_path, resume=True, **run)
    assert resumed.checkpoints["resumed_from"].endswith("step_00000010.pt")
    assert resumed.history["loss"].tolist() == straight.history["loss"].tolist()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
