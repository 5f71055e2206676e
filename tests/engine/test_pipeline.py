"""Each stage on a few steps, through the real CLI: outputs, report, resume, NaN stop, Ctrl-C."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def test_pipeline_writes_report(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("ppo_vs_sft_win_rate", "ptx_vs_sft_win_rate", "rm_heldout_accuracy", "labeler_agreement"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["n_eval_prompts"] == 24
    assert set(report["corpus_loss"]) == {"pretrain", "sft", "ppo", "ppo_ptx"}
    assert report["alignment_tax_ppo"] == pytest.approx(report["corpus_loss"]["ppo"] - report["corpus_loss"]["sft"])
    md = (run_dir / "report.md").read_text()
    assert "PPO preferred over SFT" in md and "| PPO-ptx |" in md
    gold = report["gold_vs_proxy"]["ppo"]
    assert gold["points"] == 2 and gold["gold_fit"] is not None and gold["peak"]["gold"] >= gold["final"]["gold"]
    assert gold["guard"] is None  # two evaluations: one slope, nothing to compare it with
    assert "## Gold against proxy" in md and "| PPO | 2 |" in md
    for png in ("training.png", "win_rates.png", "gold_vs_proxy.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_the_pipelines_last_line_says_where_the_report_is(run_dir):
    printed = Path(f"{run_dir}.stdout").read_text().strip().splitlines()
    assert printed[-1] == f"done: the report is {run_dir / 'report.md'} (report.json and the plots beside it)"


def test_pipeline_writes_each_stage(run_dir):
    assert "ppo:" in (run_dir / "config.yaml").read_text()
    for stage in STAGES:
        d = run_dir / stage
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("step" in r for r in rows), stage
        assert list(d.glob("**/events.out.tfevents.*")), f"{stage}: no TensorBoard events"
        model = "reward" if stage == "rm" else "policy"
        weights = load_file(d / "final" / model / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert (d / "checkpoints" / "latest").exists()
    ppo = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(ppo) == 3
    for key in ("score", "kl", "vf_loss", "pg_loss", "clipfrac", "logprob_diff_mean", "logprob_diff_max",
                "ratio_outside_0.9_1.1"):
        assert key in ppo[-1], key
    # HF generate and the trainer compute the same log-probs: the mismatch is float noise.
    assert ppo[-1]["logprob_diff_max"] < 1e-3
    # where each iteration's time went, phase by phase (evaluate only on iterations that evaluate)
    phases = ("generate", "logprobs", "ref_logprobs", "values", "score", "advantages", "update", "sync")
    assert all(ppo[-1][f"time/{p}"] >= 0 for p in phases) and "time/evaluate" in ppo[0]
    assert "win_rate_vs_sft" in ppo[0] and "win_rate_vs_sft" in ppo[1]
    # gold against proxy at each evaluation: d is the root of the KL to SFT, the SFT's own values stay put
    evals = [m for m in ppo if "gold" in m]
    assert len(evals) == 2 and all(k in m for m in evals for k in ("proxy", "gold_sft", "proxy_sft", "kl_to_init"))
    assert all(m["d_to_init"] == pytest.approx(max(m["kl_to_init"], 0.0) ** 0.5) for m in evals)
    assert evals[0]["gold_sft"] == evals[1]["gold_sft"] and evals[0]["proxy_sft"] == evals[1]["proxy_sft"]
    assert evals[0]["kl_to_init"] != 0.0 != evals[1]["kl_to_init"]  # the policy moved from SFT
    assert (run_dir / "ppo" / "final" / "value" / "model.safetensors").exists()


def test_rm_scores_normalised_on_demonstrations(run_dir):
    ev = json.loads((run_dir / "rm" / "eval.json").read_text())
    assert abs(ev["demonstration_score_mean_after"]) < 1e-4


def _weights(stage_dir):
    return load_file(stage_dir / "final" / "policy" / "model.safetensors")


@pytest.mark.parametrize("stage", ["pretrain", "ppo"])
def test_ctrl_c_saves_and_resume_matches_uninterrupted(run_dir, tmp_path, tiny, monkeypatch, interrupt, stage):
    import shutil

    import engine.trainers.lm as lm
    import engine.trainers.ppo as ppo

    def prepare(path):
        shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns(stage, *(["ppo_ptx"] if stage == "ppo" else [])))
        return path

    straight = prepare(tmp_path / "straight")
    assert main([stage, "--out", str(straight), "--run.resume", "true", *tiny(stage)]) == 0

    broken = prepare(tmp_path / "broken")
    with monkeypatch.context() as m:
        if stage == "pretrain":
            interrupt(m, lm, "lm_loss", 5)          # during step 5 of 6
        else:
            interrupt(m, ppo, "make_experience", 3)  # during iteration 3 of 3
        assert main([stage, "--out", str(broken), *tiny(stage)]) == 130
    # The interrupt escaped in the middle of a step: nothing of that step is saved, the last checkpoint stays.
    latest = (broken / stage / "checkpoints" / "latest").read_text()
    assert latest == ("step-000003" if stage == "pretrain" else "step-000002")
    assert not (broken / stage / "final").exists()
    assert main([stage, "--out", str(broken), "--run.resume", "true", *tiny(stage)]) == 0

    a, b = _weights(straight / stage), _weights(broken / stage)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_dir, tmp_path, tiny, capsys):
    import shutil

    out = tmp_path / "nan"
    shutil.copytree(run_dir / "tokenizer", out / "tokenizer")
    code = main(["pretrain", "--out", str(out), *tiny("pretrain"), "--pretrain.lr", "1e30", "--pretrain.checkpoint_every", "1"])
    assert code == 3
    err = capsys.readouterr().err
    # step 1 blew the weights up (~1e29) before its loss did: caught before the checkpoint was written
    assert "pretrain: the policy model's weights diverged by step 1" in err and "no checkpoint was written yet" in err
    assert "--pretrain.lr (now 1e+30)" in err
    assert not (out / "pretrain" / "checkpoints" / "latest").exists()
    assert not (out / "pretrain" / "final").exists()


def test_export_writes_a_plain_transformers_directory(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert main(["export", "--out", str(run_dir), "--to", str(out), "--stage", "ppo_ptx"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ours = _weights(run_dir / "ppo_ptx")
    theirs = dict(model.state_dict())
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=0, atol=0)
    assert tok.eos_token_id == model.config.eos_token_id
    assert main(["export", "--out", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")]) == 2


def test_reproduce_draws_figure1(tmp_path, tiny):
    out = tmp_path / "fig"
    args = tiny("reproduce")
    args[args.index("--model.hidden_size") + 1] = "64"
    assert main(["reproduce", "--out", str(out), *args, "--sizes", "[64]", "--record", "false"]) == 0
    result = json.loads((out / "figure1.json").read_text())
    row = result["sizes"]["64"]
    assert row["sft"] == 0.5  # the largest SFT model against itself: identical answers, all ties
    assert 0.0 <= row["ppo"] <= 1.0 and 0.0 <= row["ppo_ptx"] <= 1.0 and row["params"] > 0
    assert (out / "figure1.png").read_bytes()[:4] == b"\x89PNG"
    assert "Figure 1 in miniature" in (out / "figure1.md").read_text()
