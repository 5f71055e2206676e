"""Reward-model ensembles (issue 40): `rm --rm.members 4` trains four score heads on one body, each on its own
bootstrap resample, saved as one model; they differ, load as four members or as their mean (the value model's
start), resume exactly, and PPO trains on their mean, minimum or variance-penalised mean."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.models.batch import make_batch
from engine.models.forward import SequenceScores
from engine.models.loading import load_model
from engine.overopt.ensemble import combine
from engine.trainers.reward import in_bag

MEMBERS = ["--rm.members", "4"]


def _copy(tiny_run, dst, stages):
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns(*[s for s in ("rm", "ppo", "ppo_ptx", "dpo")
                                                                   if s not in stages]))
    return dst


@pytest.fixture(scope="module")
def ensemble_run(tiny_run, tmp_path_factory, tiny_args):
    out = _copy(tiny_run, tmp_path_factory.mktemp("ensemble") / "run", ["pretrain", "sft"])
    assert main(["rm", "--out", str(out), *tiny_args("rm"), *MEMBERS]) == 0
    return out


def _scores(rm_dir, **kw):
    model = load_model(rm_dir, flag="rm", scalar=True, **kw)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 60, (7,), generator=gen).tolist() for _ in range(12)]
    responses = [torch.randint(5, 60, (1 + i % 5,), generator=gen).tolist() for i in range(12)]
    return model, make_batch(prompts, responses, 0)


def test_members_differ_and_load_as_one_model_or_as_their_mean(ensemble_run):
    rm_dir = ensemble_run / "rm" / "final" / "reward"
    config = json.loads((rm_dir / "config.json").read_text())
    assert len(config["id2label"]) == 4 and len(config["score_offset"]) == 4
    assert len(set(config["score_offset"])) == 4  # each member centred on the demonstrations on its own
    ev = json.loads((ensemble_run / "rm" / "eval.json").read_text())
    assert abs(ev["demonstration_score_mean_after"]) < 1e-4  # the member farthest from 0 after centring
    model, batch = _scores(rm_dir)
    rm = SequenceScores(model)
    with torch.no_grad():
        members = rm(batch, members=True)
        mean = rm(batch)
    assert members.shape == (4, 12)
    # every pair of members scores the answers differently (their heads and their data differ)
    assert all((members[a] - members[b]).abs().max() > 1e-4 for a in range(4) for b in range(a + 1, 4))
    torch.testing.assert_close(mean, members.mean(0))
    value, _ = _scores(rm_dir, mean_head=True)  # the value model's start: one head, the members' mean
    assert value.score.out_features == 1 and value.config.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(SequenceScores(value)(batch), mean, rtol=1e-5, atol=1e-5)
    bags = in_bag(1000, 4, seed=0)
    assert 0.55 < bags.float().mean() < 0.71  # 1 - 1/e = 0.632 of the rows per bootstrap resample
    assert all(not torch.equal(bags[a], bags[b]) for a in range(4) for b in range(a + 1, 4))
    assert torch.equal(in_bag(10, 1, seed=0), torch.ones(1, 10, dtype=torch.bool))


def test_an_ensemble_resumes_exactly(ensemble_run, tmp_path, tiny, monkeypatch, interrupt):
    import engine.trainers.reward as reward

    broken = _copy(ensemble_run, tmp_path / "broken", ["pretrain", "sft"])
    with monkeypatch.context() as m:
        interrupt(m, reward, "ensemble_ranking_loss", 3)  # during step 3 of 4
        assert main(["rm", "--out", str(broken), *tiny("rm"), *MEMBERS]) == 130
    assert (broken / "rm" / "checkpoints" / "latest").read_text() == "step-000002"
    assert main(["rm", "--out", str(broken), *tiny("rm"), *MEMBERS, "--run.resume", "true"]) == 0
    a = load_file(ensemble_run / "rm" / "final" / "reward" / "model.safetensors")
    b = load_file(broken / "rm" / "final" / "reward" / "model.safetensors")
    assert a.keys() == b.keys() and a["score.weight"].shape[0] == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_ppo_on_the_worst_case_of_the_members_logs_their_spread(ensemble_run, tmp_path, tiny):
    out = _copy(ensemble_run, tmp_path / "run", ["pretrain", "sft", "rm"])
    assert main(["ppo", "--out", str(out), *tiny("ppo"), "--reward.ensemble", "wco"]) == 0
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_spread"] > 0 for r in rows)
    value = json.loads((out / "ppo" / "final" / "value" / "config.json").read_text())
    assert len(value["id2label"]) == 1  # the critic started from the members' mean


def test_wco_and_uwo_through_the_reward_model_match_the_members():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=0)).eval()
    model.config.score_offset = [0.5, -1.0, 2.0]
    batch = make_batch([[3, 4, 5]] * 5, [[6 + i] for i in range(5)], 0)
    with torch.no_grad():
        members = SequenceScores(model)(batch, members=True)
        raw = model(batch.input_ids, attention_mask=batch.attention_mask).logits.float().T
        torch.testing.assert_close(members, raw - torch.tensor([[0.5], [-1.0], [2.0]]))
        for mode in ("wco", "uwo"):
            rm = SequenceScores(model, lambda s, mode=mode: combine(s, mode, 2.0))
            torch.testing.assert_close(rm(batch), combine(members, mode, 2.0))


@pytest.mark.parametrize("flags,message", [
    (["--reward.ensemble", "max"], "reward.ensemble must be mean, wco or uwo, got 'max'"),
    (["--reward.uwo_lambda", "-1"], "reward.uwo_lambda must be a finite number >= 0"),
])
def test_bad_ensemble_settings_are_refused_by_name(tmp_path, tiny, capsys, flags, message):
    assert main(["ppo", "--out", str(tmp_path / "run"), *tiny("ppo"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_reward_model_with_other_heads_than_asked_is_refused(ensemble_run, tmp_path, tiny, capsys):
    out = _copy(ensemble_run, tmp_path / "run", ["pretrain", "sft"])
    rm_dir = ensemble_run / "rm" / "final" / "reward"
    assert main(["rm", "--out", str(out), *tiny("rm"), "--rm.members", "2", "--reward.path", str(rm_dir)]) == 2
    assert "a reward model with 4 score head(s), not 2; give --rm.members 4" in capsys.readouterr().err
    assert main(["rm", "--out", str(out), *tiny("rm"), "--rm.members", "0"]) == 2
    assert "rm.members must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("archs", [5, "LlamaForSequenceClassification", [3]])
def test_a_reward_models_architectures_that_are_not_class_names_are_refused_by_file(ensemble_run, tmp_path, archs):
    rm_dir = tmp_path / "rm"
    shutil.copytree(ensemble_run / "rm" / "final" / "reward", rm_dir)
    config = json.loads((rm_dir / "config.json").read_text())
    (rm_dir / "config.json").write_text(json.dumps({**config, "architectures": archs}))
    with pytest.raises(ValueError, match="config.json's architectures is .*; it must be a list of class names"):
        load_model(rm_dir, flag="--reward.path", scalar=True)
