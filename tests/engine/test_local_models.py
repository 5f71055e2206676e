"""The real-model path: small random checkpoints of each named family (written by `tiny-model` with
save_pretrained), trained through the CLI on the example files: SFT, RM, PPO, PPO-ptx, LoRA, resume, export."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flag_bundles import cli_with_bundles as cli
from engine.task.tiny_checkpoint import FAMILIES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FEW = ["--run.progress", "false",
       "--sft.steps", "4", "--sft.batch_size", "4", "--sft.warmup", "1", "--sft.log_every", "1",
       "--sft.checkpoint_every", "2", "--sft.lr", "1e-3",
       "--rm.steps", "3", "--rm.batch_size", "2", "--rm.warmup", "1", "--rm.log_every", "1",
       "--ppo.iterations", "2", "--ppo.rollout_batch", "4", "--ppo.minibatch", "2", "--ppo.ptx_batch", "2",
       "--ppo.checkpoint_every", "1", "--rollout.max_new_tokens", "6"]
DATA = ["--data.demonstrations", str(EXAMPLES / "demonstrations.jsonl"),
        "--data.comparisons", str(EXAMPLES / "comparisons_ranked.jsonl"),
        "--data.prompts", str(EXAMPLES / "prompts.jsonl")]


@pytest.fixture(scope="module")
def gpt2_rm(tiny_models, tmp_path_factory):
    """A reward model with another tokenizer than Qwen2's: tiny GPT-2 with a (random but saved) score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("gpt2_rm")
    AutoModelForSequenceClassification.from_pretrained(tiny_models["gpt2"], num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["gpt2"]).save_pretrained(path)
    return path


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(model_dir):
    return load_file(Path(model_dir) / "model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_on_each_family_then_export(tiny_models, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    extra = ["--policy.gradient_checkpointing", "true", "--value.gradient_checkpointing", "true"] \
        if family == "mistral" else []
    assert cli(["pipeline", "--policy.path", str(tiny_models[family]), "--out", str(out), *DATA,
                 "--data.pretrain", str(EXAMPLES / "pretrain.jsonl"),
                 "--data.eval_comparisons", str(EXAMPLES / "comparisons_pairwise.jsonl"), *FEW, *extra]) == 0
    sft = rows(out / "sft" / "metrics.jsonl")
    assert len(sft) == 4 and sft[-1]["loss"] < sft[0]["loss"]  # four steps on five examples: it learns them
    rm = json.loads((out / "rm" / "eval.json").read_text())
    assert abs(rm["demonstration_score_mean_after"]) < 1e-4   # demonstrations average 0
    assert rm["rm_heldout_accuracy"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # five held-out pairs
    for stage in ("ppo", "ppo_ptx"):
        m = rows(out / stage / "metrics.jsonl")
        assert len(m) == 2 and all(torch.isfinite(torch.tensor(r["pg_loss"])) for r in m)
        assert m[-1]["logprob_diff_max"] < 1e-3  # HF generate and the trainer agree on the sampled tokens
    assert "ptx_loss" in rows(out / "ppo_ptx" / "metrics.jsonl")[0]
    changed = weights(out / "ppo" / "final" / "policy")
    start = weights(out / "sft" / "final" / "policy")
    assert any(not torch.equal(changed[k], start[k]) for k in start)

    exported = tmp_path / "exported"
    assert cli(["export", "--out", str(out), "--to", str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                    "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    for k, v in changed.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert bool(tok.chat_template) == (family != "gpt2")
    ids = tok("Name three primary colors.", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_lora_reference_is_the_base_and_merged_weights_are_the_plain_model(tiny_models):
    from engine.config import RunConfig, TrainedModelConfig
    from engine.models.loading import load_model, load_tokenizer
    from engine.models.lora import merged_named_weights, plain

    path = tiny_models["llama"]
    tok = load_tokenizer(path)
    base = load_model(path, flag="--policy.path", scalar=False, device="cpu", run=RunConfig(), tokenizer=tok)
    lora = load_model(path, flag="--policy.path", scalar=False, device="cpu", run=RunConfig(),
                      train=TrainedModelConfig(lora_rank=4), tokenizer=tok)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters train
    torch.manual_seed(1)
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)  # fresh adapters are zero; make them matter
    ids = torch.tensor([tok("the sky is blue").input_ids])
    with torch.no_grad():
        want = base(ids).logits
        with lora.disable_adapter():
            torch.testing.assert_close(lora(ids).logits, want, rtol=0, atol=0)
        adapted = lora(ids).logits
    assert (adapted - want).abs().max() > 1e-2
    merged = dict(merged_named_weights(lora))
    assert merged.keys() == dict(base.named_parameters()).keys()
    plain_model = plain(lora)
    for k, v in plain_model.named_parameters():
        torch.testing.assert_close(merged[k], v.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain_model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def qwen_run(tiny_models, tmp_path_factory):
    """SFT and RM on the Qwen2 checkpoint, shared by the PPO tests below."""
    out = tmp_path_factory.mktemp("qwen_run")
    assert cli(["sft", "--policy.path", str(tiny_models["qwen2"]), "--out", str(out), *DATA, *FEW]) == 0
    assert cli(["rm", "--policy.path", str(out / "sft" / "final" / "policy"), "--out", str(out), *DATA, *FEW]) == 0
    return out


def test_lora_ppo_ctrl_c_and_resume_match_an_uninterrupted_run(qwen_run, tmp_path, monkeypatch, interrupt):
    import engine.trainers.ppo as ppo

    def run(out):
        shutil.copytree(qwen_run, out, ignore=shutil.ignore_patterns("ppo*"))
        return ["ppo", "--policy.path", str(out / "sft" / "final" / "policy"), "--reward.path",
                str(out / "rm" / "final" / "reward"), "--out", str(out), *DATA, *FEW,
                "--policy.lora_rank", "4", "--value.lora_rank", "4", "--ppo.lr", "1e-2"]

    straight = run(tmp_path / "straight")
    assert cli(straight) == 0
    broken = run(tmp_path / "broken")
    with monkeypatch.context() as m:
        interrupt(m, ppo, "make_experience", 2)  # during iteration 2 of 2
        assert cli(broken) == 130
    ckpt = tmp_path / "broken" / "ppo" / "checkpoints" / "step-000001"
    assert (ckpt / "policy" / "adapter_config.json").is_file()  # LoRA checkpoints hold the adapters only
    assert not (ckpt / "policy" / "model.safetensors").exists()
    assert cli(broken + ["--run.resume", "true"]) == 0
    a = weights(tmp_path / "straight" / "ppo" / "final" / "policy")
    b = weights(tmp_path / "broken" / "ppo" / "final" / "policy")
    sft = weights(qwen_run / "sft" / "final" / "policy")
    assert a.keys() == sft.keys()  # the final policy is a plain model with the adapters merged
    assert any(not torch.equal(a[k], sft[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_reward_model_with_another_tokenizer_is_rescored_on_text(qwen_run, tiny_models, gpt2_rm, tmp_path, caplog):
    from engine.models.batch import make_batch
    from engine.config import Config, DataConfig, RunConfig
    from engine.context import RunContext
    from engine.data.encode import make_encoder
    from engine.stages import _reward_scorer
    from engine.models.loading import load_model, load_tokenizer
    from engine.models.forward import SequenceScores
    from engine.rollout.base import RolloutResult

    policy_tok = load_tokenizer(tiny_models["qwen2"])
    rm_tok = load_tokenizer(tiny_models["gpt2"])
    assert policy_tok.get_vocab() != rm_tok.get_vocab()
    reward = SequenceScores(load_model(gpt2_rm, flag="--reward.path", scalar=True, device="cpu", run=RunConfig(),
                                       tokenizer=rm_tok, head_required=True))
    ctx = RunContext(Config(), tmp_path, policy_tok, None)
    enc = make_encoder(policy_tok, DataConfig())
    prompts = ["What is 17 times 3?", [{"role": "user", "content": "Name three primary colors."}]]
    answers = ["17 times 3 is 51.", "Red, yellow and"]
    results = [RolloutResult(0, enc.response(prompts[0], answers[0]), [], "stop"),
               RolloutResult(1, policy_tok(answers[1], add_special_tokens=False).input_ids, [], "length")]
    score = _reward_scorer(ctx, reward, rm_tok, gpt2_rm, prompts, enc)
    got = score(None, [0, 1], results)
    # what the RM gives the same texts tokenized its own way (GPT-2 has no template: prompt text, answer, eos)
    want = reward(make_batch(
        [rm_tok(prompts[0]).input_ids, rm_tok("Name three primary colors.").input_ids],
        [rm_tok(answers[0]).input_ids + [rm_tok.eos_token_id], rm_tok(answers[1]).input_ids], rm_tok.pad_token_id))
    torch.testing.assert_close(got, want)

    # Through the CLI: the value model cannot start from an RM with another tokenizer...
    args = ["ppo", "--policy.path", str(qwen_run / "sft" / "final" / "policy"), "--reward.path",
            str(gpt2_rm), "--out", str(tmp_path / "x"), *DATA, *FEW]
    assert cli(args) == 2
    # ...so with the value model from the SFT policy, PPO runs on the re-tokenized scores.
    assert cli(args + ["--value.path", str(qwen_run / "sft" / "final" / "policy")]) == 0
    assert len(rows(tmp_path / "x" / "ppo" / "metrics.jsonl")) == 2


def test_encoder_chat_template_and_length_rule(tiny_models):
    from engine.data.encode import Encoder
    from engine.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_models["qwen2"])
    enc = Encoder(tok, max_prompt_tokens=1000, max_response_tokens=1000)
    p = enc.prompt("Name three primary colors.")
    assert tok.decode(p) == "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"
    r = enc.response("Name three primary colors.", "Red, yellow and blue.")
    assert tok.decode(r) == "Red, yellow and blue.<|im_end|>" and r[-1] == tok.eos_token_id  # the turn's end
    assert enc.text_of(r) == "Red, yellow and blue."

    cut = Encoder(tok, max_prompt_tokens=5, max_response_tokens=3)
    assert cut.prompt("Name three primary colors.") == p[-5:]   # the end of the prompt is kept
    assert cut.response("x", "Red, yellow and blue.") == r[:3]
    drop = Encoder(tok, max_prompt_tokens=5, long_prompts="drop")
    assert drop.prompt("Name three primary colors.") is None and drop.prompt("hi") is None
    assert (cut.counts.prompts_truncated, cut.counts.responses_cut, drop.counts.prompts_dropped) == (1, 1, 2)
    assert "2 prompts (0 truncated, 2 dropped)" in drop.counts.summary()

    gpt2 = load_tokenizer(tiny_models["gpt2"])  # no template, no pad token (pad = eos)
    assert gpt2.pad_token_id == gpt2.eos_token_id
    e = Encoder(gpt2)
    assert e.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]) == \
        gpt2("Be brief.\n\nHi.").input_ids
    assert e.response("Hi.", "Hello.") == gpt2("Hello.").input_ids + [gpt2.eos_token_id]


def test_length_rule_drops_and_logs_through_the_cli(tiny_models, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="engine")
    assert cli(["sft", "--policy.path", str(tiny_models["mistral"]), "--out", str(tmp_path / "r"), *DATA, *FEW,
                 "--data.max_prompt_tokens", "25", "--data.long_prompts", "drop"]) == 0
    assert "5 prompts (0 truncated, 3 dropped)" in caplog.text  # those of 27, 30 and 30 tokens
    assert cli(["sft", "--policy.path", str(tiny_models["mistral"]), "--out", str(tmp_path / "r2"), *DATA, *FEW,
                 "--data.max_prompt_tokens", "1", "--data.long_prompts", "drop"]) == 2  # nothing left to train on


def _error(capsys, args) -> str:
    assert cli(args) == 2
    return capsys.readouterr().err


def test_bad_inputs_name_what_where_and_how_to_fix(tiny_models, qwen_run, gpt2_rm, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from engine.task.tiny_checkpoint import build_config, build_tokenizer

    qwen = str(tiny_models["qwen2"])
    sft_dir = str(qwen_run / "sft" / "final" / "policy")
    out = ["--out", str(tmp_path / "o"), *FEW]
    # a tokenizer with more tokens than the model's embedding rows
    small = tmp_path / "small_vocab"
    tok = build_tokenizer("llama")
    cfg = build_config("llama", tok)
    cfg.vocab_size = 100
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    tok.save_pretrained(small)
    err = _error(capsys, ["sft", "--policy.path", str(small), *DATA, *out])
    assert f"--policy.path {small}: the tokenizer has {len(tok)} tokens but the model's embedding has 100 rows" in err
    assert "resize_token_embeddings" in err
    # not a checkpoint directory
    assert "no such directory" in _error(capsys, ["sft", "--policy.path", str(tmp_path / "nope"), *DATA, *out])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(capsys, ["sft", "--policy.path", str(tmp_path / "empty"), *DATA, *out])
    # a stage without the data it needs; data files without a checkpoint
    assert "sft with --policy.path needs --data.demonstrations FILE" in _error(capsys, ["sft", "--policy.path", qwen, *out])
    assert "rm with --policy.path needs --data.comparisons FILE" in _error(capsys, ["rm", "--policy.path", qwen, *out])
    assert "ppo with --policy.path needs --reward.path DIR" in _error(
        capsys, ["ppo", "--policy.path", qwen, "--data.prompts", str(EXAMPLES / "prompts.jsonl"), *out])
    assert "the built-in task makes its own data: give --policy.path DIR" in _error(capsys, ["sft", *DATA, *out])
    assert "--data.pretrain FILE" in _error(capsys, ["ppo", "--ptx", "true", "--policy.path", sft_dir, "--reward.path",
                                                     str(qwen_run / "rm" / "final" / "reward"), *DATA, *out])
    # a reference model with another tokenizer cannot give a per-token KL
    err = _error(capsys, ["ppo", "--policy.path", sft_dir, "--reward.path", str(qwen_run / "rm" / "final" / "reward"),
                          "--reference.path", str(tiny_models["llama"]), *DATA, *out])
    assert "--reference.path" in err and "tokenizer differs from the policy's" in err
    # a plain causal LM is no reward model: its score head would be random
    err = _error(capsys, ["ppo", "--policy.path", sft_dir, "--reward.path", str(tiny_models["gpt2"]), *DATA, *out])
    assert f"--reward.path {tiny_models['gpt2']}: this checkpoint has no trained score head" in err
    # the value model defaults to the RM: with another tokenizer, say so and say what to do
    err = _error(capsys, ["ppo", "--policy.path", sft_dir, "--reward.path", str(gpt2_rm), *DATA, *out])
    assert "the value model scores every policy token" in err and "give --value.path" in err
    # malformed data through the CLI: file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    err = _error(capsys, ["sft", "--policy.path", qwen, "--data.demonstrations", str(bad), *out])
    assert f"{bad}:line 2: field 'completion' is empty" in err
    bad.write_text('{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 0]}\n')
    err = _error(capsys, ["rm", "--policy.path", qwen, "--data.comparisons", str(bad), *out])
    assert f"{bad}:line 1: field 'ranking' must be a permutation of 0..1" in err
    # eval and pretrain are the built-in task's
    assert "held-out labelers" in _error(capsys, ["eval", "--policy.path", qwen, *out])


def test_lora_ppo_with_vllm_rollouts_then_export_loads_in_vllm(tiny_models, tmp_path):
    """The engine samples from the merged LoRA weights (pushed each iteration under the base names)."""
    from engine.rollout.vllm import vllm_available

    ok, why = vllm_available()
    if not ok:
        pytest.skip(f"vLLM is not importable here: {why}")
    from engine.rollout import VLLMRollout

    out = tmp_path / "run"
    base = str(tiny_models["llama"])  # head_dim 64: what vLLM's CPU attention supports
    assert cli(["sft", "--policy.path", base, "--out", str(out), *DATA, *FEW]) == 0
    sft = str(out / "sft" / "final" / "policy")
    assert cli(["rm", "--policy.path", sft, "--out", str(out), *DATA, *FEW]) == 0
    assert cli(["ppo", "--policy.path", sft, "--reward.path", str(out / "rm" / "final" / "reward"), "--out", str(out),
                 *DATA, *FEW, "--policy.lora_rank", "8", "--ppo.lr", "3e-2", "--ppo.iterations", "3",
                 "--rollout.backend", "vllm"]) == 0
    m = rows(out / "ppo" / "metrics.jsonl")
    assert len(m) == 3
    # After the first update the adapters are non-zero: had the engine kept the SFT weights, its log-probs
    # would differ from the trainer's by the update; they agree to float noise.
    for r in m:
        assert r["logprob_diff_max"] < 1e-3, r
    assert m[-1]["approx_kl"] >= 0 and m[-1]["kl"] > 0  # the policy moved away from the reference

    exported = tmp_path / "exported"
    assert cli(["export", "--out", str(out), "--to", str(exported)]) == 0
    with VLLMRollout(exported, dtype="float32", seed=0, max_model_len=64) as engine:
        res = engine.generate([[1, 2, 3]], n=2, max_tokens=4)
    assert len(res) == 2 and all(1 <= len(r.token_ids) <= 4 for r in res)


def test_bf16_runs_keep_float32_master_weights(tiny_models, tmp_path):
    """run.dtype=bfloat16 (the GPU default): frozen models are stored in bf16, trained ones in float32 and
    computed under autocast. At lr 1e-5 an Adam step moves a weight by ~1e-5, below half a bf16 ulp of a
    typical weight here (~6e-5 at |w| ~ 0.02), so bf16 weights would mostly not move; the float32 masters do."""
    from engine.config import RunConfig, TrainedModelConfig
    from engine.models.loading import load_model, load_tokenizer

    path = tiny_models["llama"]
    run = RunConfig(dtype="bfloat16")
    tok = load_tokenizer(path)
    frozen = load_model(path, flag="--reward.path", scalar=True, device="cpu", run=run, tokenizer=tok)
    trained = load_model(path, flag="--policy.path", scalar=False, device="cpu", run=run,
                         train=TrainedModelConfig(), tokenizer=tok)
    lora = load_model(path, flag="--policy.path", scalar=False, device="cpu", run=run,
                      train=TrainedModelConfig(lora_rank=4), tokenizer=tok)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" not in n} == {torch.bfloat16}

    out = tmp_path / "run"
    assert cli(["sft", "--policy.path", str(path), "--out", str(out), *DATA, *FEW, "--run.dtype", "bfloat16",
                 "--sft.lr", "1e-5"]) == 0
    before, after = weights(path), weights(out / "sft" / "final" / "policy")
    moved = [k for k in before if not torch.equal(before[k].float(), after[k])]
    assert len(moved) == len(before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rl_and_preference_stages_train_without_dropout_unless_asked(tiny_models, tmp_path, family):
    """GPT-2's checkpoints carry dropout 0.1 (and a Llama may set attention_dropout): the forward of a model
    in train mode is then noise, and the old log-probs PPO reuses are not what a recomputed pass gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.models.dropout import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], attention_dropout=0.3) \
        if family == "llama" else AutoModelForCausalLM.from_pretrained(tiny_models[family])
    model.train()
    ids = torch.tensor([[5, 17, 42, 9, 11, 30]])
    torch.manual_seed(0)
    noisy = [model(ids).logits for _ in range(2)]
    assert not torch.equal(*noisy)  # the checkpoint's dropout is live in train mode
    assert disable_dropout(model) > 0
    same = [model(ids).logits for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids).logits, same[0], rtol=0, atol=0)  # train mode is now eval's forward
