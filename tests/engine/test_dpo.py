"""`python -m engine dpo`: DPO, IPO and listwise DPO on the built-in task and on a user's checkpoint and data
files (pairwise and K-way), LoRA, Ctrl-C and resume, refused flags, and the fused LM head's gradients
against the plain path. (1 vs 2 processes: tests/engine/test_distributed.py.)"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flag_bundles import DPO_TINY, cli_with_bundles as cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PAIRS, RANKED = str(EXAMPLES / "comparisons_pairwise.jsonl"), str(EXAMPLES / "comparisons_ranked.jsonl")


def metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(stage_dir):
    return load_file(Path(stage_dir) / "final" / "policy" / "model.safetensors")


def random_rows(gen, vocab, n=3, kmax=4):
    rows = []
    for i in range(n):
        k = 2 + i % (kmax - 1)
        rows.append({"prompt": torch.randint(1, vocab, (3 + i,), generator=gen).tolist(),
                     "responses": [torch.randint(1, vocab, (2 + (j * 3 + i) % 5,), generator=gen).tolist()
                                   for j in range(k)],
                     "ranks": torch.randperm(k, generator=gen).tolist()})
    return rows


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "listwise"])
def test_gradients_through_the_fused_lm_head_equal_the_plain_path(tiny_models, loss):
    """float64, K from 2 to 4 per prompt with padding: every parameter's gradient of the DPO loss through
    kernels.linear_token_logprobs equals the one through the LM head's logits and log_softmax."""
    from engine.models.loading import load_tokenizer
    from engine.models.forward import PolicyLogprobs
    from engine.trainers.dpo import comparison_logps
    from kernels.preference import preference_loss
    from transformers import AutoModelForCausalLM

    path = tiny_models["llama"]
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").double()
    rows = random_rows(torch.Generator().manual_seed(7), model.config.vocab_size)
    ref = torch.randn(len(rows), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        logps, ranks, valid = comparison_logps(PolicyLogprobs(model, fused=fused), rows, tok.pad_token_id)
        value, _ = preference_loss(logps - ref, ranks, valid, loss=loss, beta=0.5)
        value.backward()
        grads[fused] = (value.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-12)
    for name, g in grads[False][1].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_dpo_ipo_and_listwise_on_the_built_in_task_are_reported(tiny_run, tmp_path, tiny):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("report*", "*.png", "samples.json"))
    for loss in ("sigmoid", "ipo", "listwise"):
        assert cli(["dpo", "--out", str(out), "--dpo.loss", loss, *tiny("dpo"), *DPO_TINY]) == 0
    for stage in ("dpo", "dpo_ipo", "dpo_listwise"):
        m = metrics(out / stage / "metrics.jsonl")
        assert [r["step"] for r in m] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in m)
        # step 1: the policy is the reference, so every implicit reward is 0 (up to batching's rounding)
        assert abs(m[0]["margin"]) < 1e-5
        held = json.loads((out / stage / "eval.json").read_text())
        assert 0 <= held["heldout_accuracy"] <= 1 and math.isfinite(held["heldout_loss"])
    assert metrics(out / "dpo" / "metrics.jsonl")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics(out / "dpo_ipo" / "metrics.jsonl")[0]["loss"] == pytest.approx((1 / 0.2) ** 2, rel=1e-5)
    sft = weights(out / "sft")
    assert all(any(not torch.equal(weights(out / s)[k], sft[k]) for k in sft) for s in ("dpo", "dpo_listwise"))
    assert cli(["eval", "--out", str(out), *tiny("eval")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["dpo_vs_sft_win_rates"]) == {"dpo", "dpo_ipo", "dpo_listwise"}
    md = (out / "report.md").read_text()
    assert "| DPO |" in md and "| IPO |" in md and "| Listwise DPO |" in md and "Listwise DPO over SFT" in md
    assert cli(["export", "--out", str(out), "--stage", "dpo_listwise", "--to", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_pipeline_with_dpo_runs_the_stage_from_the_sft_policy(tmp_path, tiny):
    out = tmp_path / "run"
    assert cli(["pipeline", "--out", str(out), "--with_dpo", "true", "--dpo.loss", "listwise", *tiny("pipeline"),
                *DPO_TINY]) == 0
    assert (out / "dpo_listwise" / "final" / "policy").is_dir() and (out / "ppo" / "final" / "policy").is_dir()
    assert "dpo_listwise" in json.loads((out / "report.json").read_text())["dpo_vs_sft_win_rates"]


@pytest.mark.parametrize("data", ["pairwise", "ranked"])
def test_dpo_on_a_users_checkpoint_then_ctrl_c_and_resume_match_an_uninterrupted_run(
        tiny_models, tmp_path, monkeypatch, interrupt, data):
    import engine.trainers.dpo as dpo

    loss, stage = ("sigmoid", "dpo") if data == "pairwise" else ("listwise", "dpo_listwise")

    def args(out):
        return ["dpo", "--policy.path", str(tiny_models["qwen2"]), "--out", str(out), "--run.progress", "false",
                "--data.comparisons", PAIRS if data == "pairwise" else RANKED, "--data.eval_comparisons", PAIRS,
                "--dpo.loss", loss, *DPO_TINY]

    assert cli(args(tmp_path / "straight")) == 0
    with monkeypatch.context() as m:
        interrupt(m, dpo, "preference_loss", 4)  # during step 4 of 4
        assert cli(args(tmp_path / "broken")) == 130
    assert (tmp_path / "broken" / stage / "checkpoints" / "latest").read_text() == "step-000002"
    assert cli(args(tmp_path / "broken") + ["--run.resume", "true"]) == 0
    a, b = weights(tmp_path / "straight" / stage), weights(tmp_path / "broken" / stage)
    start = load_file(Path(tiny_models["qwen2"]) / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in start)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    m = metrics(tmp_path / "straight" / stage / "metrics.jsonl")
    # step 1: every implicit reward is 0, so each choice among m responses costs log m
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) if data == "pairwise" else m[0]["loss"] > math.log(2)
    assert m[-1]["accuracy"] > 0.5
    assert json.loads((tmp_path / "straight" / stage / "eval.json").read_text())["heldout_accuracy"] in (
        0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # five held-out pairs


def test_lora_dpo_uses_the_base_weights_as_reference_and_reference_free_uses_none(tiny_models, tmp_path):
    base = ["dpo", "--policy.path", str(tiny_models["llama"]), "--run.progress", "false", "--data.comparisons",
            RANKED, *DPO_TINY]
    assert cli([*base, "--out", str(tmp_path / "lora"), "--policy.lora_rank", "4", "--dpo.loss", "listwise"]) == 0
    m = metrics(tmp_path / "lora" / "dpo_listwise" / "metrics.jsonl")
    # fresh adapters are zero: the policy equals its base, so the reference is the base exactly
    assert abs(m[0]["margin"]) < 1e-6 and m[-1]["margin"] != 0
    start = load_file(Path(tiny_models["llama"]) / "model.safetensors")
    merged = weights(tmp_path / "lora" / "dpo_listwise")
    assert merged.keys() == start.keys() and any(not torch.equal(merged[k], start[k]) for k in start)
    assert cli([*base, "--out", str(tmp_path / "free"), "--dpo.reference_free", "true",
                "--dpo.length_norm", "true", "--dpo.beta", "2.0"]) == 0
    first = metrics(tmp_path / "free" / "dpo" / "metrics.jsonl")[0]
    assert abs(first["margin"]) > 1e-3  # the policy's own log-probs already differ between the responses


@pytest.mark.parametrize("argv,message", [
    (["dpo", "--dpo.reference_free", "true", "--reference.path", "X"],
     "--reference.path (--dpo.reference_free true uses no reference model)"),
    (["dpo", "--dpo.loss", "ipo", "--dpo.label_smoothing", "0.1"], "defined for --dpo.loss sigmoid, not ipo"),
    (["dpo", "--dpo.loss", "kto"], "dpo.loss must be one of sigmoid, ipo, listwise, got 'kto'"),
    (["dpo", "--dpo.beta", "0"], "dpo.beta must be > 0"),
    (["dpo", "--dpo.beta", "1e30"], "dpo.beta must be at most 100"),
    (["dpo", "--policy.path", "P", "--data.prompts", "F"], "--data.prompts (`dpo` does not read it)"),
    (["pipeline", "--dpo.loss", "ipo"], "--dpo.loss (the DPO stage is off: add --with_dpo true)"),
])
def test_flags_dpo_would_not_read_or_cannot_use_are_refused_by_name(argv, message, capsys):
    from engine.cli import main

    assert main([*argv, "--out", "/nonexistent/never-made"]) == 2
    assert message in capsys.readouterr().err
    assert not Path("/nonexistent/never-made").exists()


def test_dpo_needs_comparisons_on_a_users_checkpoint(tiny_models, tmp_path, capsys):
    from engine.cli import main

    assert main(["dpo", "--policy.path", str(tiny_models["llama"]), "--out", str(tmp_path / "r")]) == 2
    assert "dpo with --policy.path needs --data.comparisons FILE" in capsys.readouterr().err


def test_comparisons_of_an_answer_with_itself_are_left_out_and_alone_refused(tiny_models, tmp_path, capsys, caplog):
    from engine.cli import main

    rows = [json.loads(line) for line in Path(PAIRS).read_text().splitlines()]
    rows = [r for r in rows if "chosen" in r]
    same = [{**r, "rejected": r["chosen"]} for r in rows]
    base = ["dpo", "--policy.path", str(tiny_models["llama"]), "--run.progress", "false", *DPO_TINY]
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    assert main([*base, "--out", str(tmp_path / "a"), "--data.comparisons", str(tmp_path / "same.jsonl")]) == 2
    assert "every comparison ranks the same answer against itself" in capsys.readouterr().err
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same[:2] + rows[2:]))
    assert main([*base, "--out", str(tmp_path / "b"), "--data.comparisons", str(tmp_path / "mixed.jsonl")]) == 0
    assert f"2 of {len(rows)} comparisons rank the same answer twice" in caplog.text


def test_a_reward_model_given_as_the_reference_is_refused_by_name(tiny_run, tmp_path, capsys):
    from engine.cli import main

    reward = tiny_run / "rm" / "final" / "reward"
    policy = tiny_run / "sft" / "final" / "policy"
    assert main(["dpo", "--policy.path", str(policy), "--reference.path", str(reward), "--data.comparisons", PAIRS,
                 "--out", str(tmp_path / "r"), "--run.progress", "false", *DPO_TINY]) == 2
    err = capsys.readouterr().err
    assert f"--reference.path {reward}: a scalar-head model" in err and "not a causal LM" in err
