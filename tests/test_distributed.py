"""The same loop under torchrun on this CPU (gloo): 2 ranks of batch B/2 train like 1 process of batch B,
under DDP and FSDP2; only rank 0 writes; a stop or a skipped step on one rank is every rank's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.packages import optional
from utils import train
from utils.loop import distributed

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "gpt-tiny", "--precision", "bf16-mixed", "--steps", "40", "--seq-len", "32", "--eval-interval", "20"]
FAULTY = ["--model", f"{ROOT}/tests/user_models.py:FaultOnce"]
# FSDP2 (fully_shard) is in torch 2.6 and later; on older torch utils.train refuses it by name (tested below).
FSDP2 = pytest.param("fsdp2", marks=pytest.mark.skipif(bool(distributed.fsdp2_unavailable()),
                                                       reason=distributed.fsdp2_unavailable() or "FSDP2 available"))


def launch(out: Path, *args, ranks=2, fault=None):
    """utils.train under torchrun (ranks > 0) or as one plain process (ranks=0); returns (exit code, results)."""
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks
               else [sys.executable]) + ["-m", "utils.train", *COMMON, "--output-dir", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SUITE_TEST_FAULT": fault or "none:0"}
    proc = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    results = out / "results.json"
    assert results.exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads(results.read_text())


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    code, results = launch(tmp_path_factory.mktemp("one") / "out", "--batch-size", "8", ranks=0)
    assert code == 0
    return results


@pytest.mark.versions
@pytest.mark.parametrize("parallel", ["ddp", FSDP2])
def test_two_ranks_of_half_the_batch_train_like_one_process_and_only_rank_0_writes(one, tmp_path, parallel):
    out = tmp_path / "out"
    code, two = launch(out, "--batch-size", "4", "--parallel", parallel, "--checkpoint-every", "20")
    assert code == 0 and two["status"] == "pass"
    d = two["distributed"]
    assert (d["world_size"], d["backend"], d["parallel"], d["global_batch"]) == (2, "gloo", parallel, 8)
    assert len(d["tokens_per_s_per_rank"]) == 2 and d["tokens_per_s_total"] == pytest.approx(sum(d["tokens_per_s_per_rank"]))
    start, end = one["evals"]["eval_loss"][0], one["evals"]["eval_loss"][-1]
    assert two["evals"]["eval_loss"][0] == pytest.approx(start, rel=1e-5)  # the same weights and eval batches
    assert two["evals"]["eval_loss"][-1] == pytest.approx(end, rel=0.01) and end < 0.8 * start  # it trained, alike
    assert two["written_by_rank"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "loss.png", "results.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020.pt", "step_00000040.pt"]


def test_scaling_efficiency_is_measured_against_a_one_process_reference(one, tmp_path):
    reference = tmp_path / "one.json"
    reference.write_text(json.dumps(one))
    code, two = launch(tmp_path / "out", "--batch-size", "4", "--steps", "10", "--reference", str(reference))
    d = two["distributed"]
    assert code == 0 and d["reference"]["tokens_per_s"] == one["distributed"]["tokens_per_s_total"]
    assert d["scaling_efficiency"] == pytest.approx(d["tokens_per_s_total"] / (2 * d["reference"]["tokens_per_s"]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    code, results = launch(tmp_path_factory.mktemp("straight") / "out", "--batch-size", "4", *FAULTY)
    assert code == 0
    return results


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step_and_resume_finishes_the_run(straight, tmp_path):
    out = tmp_path / "out"
    code, stopped = launch(out, "--batch-size", "4", *FAULTY, fault="interrupt:15:1")
    assert code != 0 and stopped["verdict"]["status"] == "warn"
    assert "interrupted at step 15 of 40" in stopped["verdict"]["reason"] and len(stopped["history"]["step"]) == 15
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000015.pt"]
    code, resumed = launch(out, "--batch-size", "4", "--resume", "True", *FAULTY)
    assert code == 0 and resumed["summary"]["checkpoints"]["resumed_from"].endswith("step_00000015.pt")
    assert resumed["history"]["loss"] == pytest.approx(straight["history"]["loss"], rel=1e-6)
    assert resumed["evals"]["eval_loss"] == pytest.approx(straight["evals"]["eval_loss"], rel=1e-6)


def test_with_log_every_ranks_agree_on_a_stop_at_the_next_log_point_and_records_are_unchanged(straight, tmp_path):
    code, stopped = launch(tmp_path / "out", "--batch-size", "4", "--log-every", "10", *FAULTY, fault="interrupt:12:1")
    assert code != 0 and "interrupted at step 20 of 40" in stopped["verdict"]["reason"]
    h = stopped["history"]
    assert h["step"] == list(range(1, 21))
    assert h["loss"] == straight["history"]["loss"][:20] and h["lr"] == straight["history"]["lr"][:20]


@pytest.mark.parametrize("parallel", ["ddp", FSDP2])
def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path, parallel):
    code, r = launch(tmp_path / "out", "--batch-size", "4", "--precision", "16-mixed", "--steps", "8", "--parallel", parallel,
                     "--log-every", "3", *FAULTY, fault="overflow:5:1")  # records read at steps 3, 6 and 8
    skipped = [step for step, s in zip(r["history"]["step"], r["history"]["skipped"]) if s]
    assert code == 0 and skipped == [5]  # rank 0's record: its own activations were fine, the step was still skipped
    scales = r["history"]["loss_scale"]
    assert scales[5] == scales[4] / 2


@pytest.mark.versions
def test_fsdp2_missing_from_torch_is_a_clear_message_not_a_crash(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "fully_shard", None)
    with pytest.raises(SystemExit) as exit_:
        train.main([*COMMON, "--parallel", "fsdp2"])
    assert exit_.value.code == 2 and "FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6) is not in torch" in capsys.readouterr().err


def test_a_bad_reference_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        train.main([*COMMON, "--reference", str(tmp_path / "x.json"), "--output-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "expects the results.json of a utils.train run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gradient_accumulation_under_ddp_trains_like_one_process(tmp_path):
    """Inside an accumulation window backward skips DDP's all-reduce (no_sync) until the last micro-batch."""
    _, one = launch(tmp_path / "one", "--batch-size", "4", "--grad-accum-steps", "2", "--steps", "20", ranks=0)
    code, two = launch(tmp_path / "two", "--batch-size", "2", "--grad-accum-steps", "2", "--steps", "20")
    assert code == 0 and two["history"]["micro_batches"] == [2] * 20
    assert two["evals"]["eval_loss"] == pytest.approx(one["evals"]["eval_loss"], rel=0.01)
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], rel=0.01)


@pytest.mark.skipif(bool(distributed.fsdp2_unavailable()), reason=distributed.fsdp2_unavailable() or "FSDP2 available")
def test_a_hugging_face_llama_trains_alike_sharded_by_fsdp2_and_in_one_process(tmp_path):
    """FSDP2 shards each element of the model's ModuleList (Llama's decoder layers), as for ours."""
    transformers = optional("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=64,
                                      intermediate_size=128, vocab_size=512, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    llama = ["--model", f"hf:{tmp_path / 'llama'}", "--steps", "20"]
    _, one = launch(tmp_path / "one", *llama, "--batch-size", "8", ranks=0)
    code, two = launch(tmp_path / "two", *llama, "--batch-size", "4", "--parallel", "fsdp2")
    assert code == 0 and two["distributed"]["parallel"] == "fsdp2"
    assert two["evals"]["eval_loss"] == pytest.approx(one["evals"]["eval_loss"], rel=0.01)
    assert two["evals"]["eval_loss"][-1] < 0.9 * two["evals"]["eval_loss"][0]
