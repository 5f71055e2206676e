"""Episodes of several turns (engine/episodes): what the trajectory holds, that only the model's own tokens
train, that a misbehaving environment is contained and named, and the built-in lookup task's episodes."""
import json
import time

import pytest
import torch

from engine.config import ModelConfig, PPOConfig
from engine.episodes import EpisodeSettings, Step, load_env, run_episodes
from engine.episodes.render import TurnRenderer
from engine.models.batch import make_batch
from engine.models.forward import PolicyLogprobs
from engine.rollout import HFRollout
from engine.task.model import build_policy
from engine.task.tools import Lookup
from engine.task.vocab import NOUN_COLOR, build_tokenizer
from engine.trainers.experience import make_experience
from engine.trainers.ppo_update import ppo_minibatch_loss
from envs import hostile


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_policy(ModelConfig(hidden_size=64, num_heads=2, num_layers=2, intermediate_size=128), tok).eval()


class Recording:
    """The real transformers backend, with every call's prompts and answers kept."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, **kw):
        out = self.engine.generate(prompts, **kw)
        self.calls.append(([list(p) for p in prompts], kw["n"], [list(r.token_ids) for r in out]))
        return out


def prompt_ids(tok, texts):
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, return_dict=False) for t in texts]


def episodes(model, tok, env, *, prompts=("count to three", "repeat cat two times"), args=None, n=2, turns=4,
             max_tokens=6, budget=60, timeout=10.0, temperature=1.0, engine=None):
    engine = engine or HFRollout(model, seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    settings = EpisodeSettings(turns, max_tokens, budget, timeout, temperature)
    return run_episodes(engine, env, list(prompts), args or [{} for _ in prompts], prompt_ids(tok, prompts), n=n,
                        settings=settings, renderer=TurnRenderer(tok, 16), seeds=[11, 12][:len(prompts)])


def test_the_trajectory_is_what_was_generated_then_appended_turn_by_turn(model, tok):
    """Each turn's prompt is the prompt plus the episode so far, and the episode is exactly the concatenation of
    each turn's generated ids (mask 1, as generated) and the environment's rendered ids (mask 0)."""
    engine = Recording(HFRollout(model, seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    out = episodes(model, tok, hostile.Talks, args=[{}, {"word": "dog"}], engine=engine)
    renderer = TurnRenderer(tok, 16)
    assert [r.prompt_index for r in out] == [0, 0, 1, 1]
    for i, r in enumerate(out):
        word = "cat" if r.prompt_index == 0 else "dog"
        appended = renderer.ids([{"role": "tool", "content": f"the {word} was red"}])
        assert tok.convert_ids_to_tokens(appended) == ["the", word, "was", "red", "<sep>"]
        want_ids, want_mask = [], []
        for turn, (prompts, n, answers) in enumerate(engine.calls):
            row = i if turn == 0 else i  # every episode lives for 3 turns: the same row in every call
            if turn == 0:
                assert n == 2 and prompts == prompt_ids(tok, ["count to three", "repeat cat two times"])
            else:
                assert n == 1 and prompts[row] == prompt_ids(tok, [["count to three", "repeat cat two times"]
                                                                   [r.prompt_index]])[0] + want_ids
            want_ids += answers[row]
            want_mask += [1] * len(answers[row])
            if turn < 2:
                want_ids += appended
                want_mask += [0] * len(appended)
        assert len(engine.calls) == 3 and r.episode.turns == 3 and r.episode.done
        assert r.token_ids == want_ids and r.loss_mask == want_mask
        assert r.episode.reward == 1.5
        turn_ends = [pos for pos, _ in r.episode.turn_rewards]
        assert [r.episode.turn_rewards[k][1] for k in range(3)] == [0.25, 0.25, 1.0]
        assert all(r.loss_mask[p] == 1 and (p + 1 == len(r.token_ids) or r.loss_mask[p + 1] == 0) for p in turn_ends)
        assert len(r.logprobs) == len(r.token_ids) and all(lp == 0.0 for lp, m in zip(r.logprobs, r.loss_mask) if not m)


def test_a_one_turn_environment_changes_nothing_of_the_single_turn_rollout(model, tok):
    class Done:
        def reset(self, prompt):
            pass

        def step(self, reply):
            return Step(reward=2.0, done=True)
    engine = HFRollout(model, seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    plain = engine.generate(prompt_ids(tok, ["count to three", "repeat cat two times"]), n=2, max_tokens=6,
                            seeds=[11, 12])
    out = episodes(model, tok, Done)
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert [r.logprobs for r in out] == [r.logprobs for r in plain]
    assert all(r.loss_mask == [1] * len(r.token_ids) and r.episode.reward == 2.0 for r in out)


@pytest.mark.parametrize("fused", [True, False])
def test_the_environments_tokens_get_exactly_zero_gradient(model, tok, fused):
    """The policy loss's gradient with respect to each token's log-prob is 0 on every appended token, and the
    parameters' gradients do not change when the advantages and old log-probs on those tokens are changed
    wildly (their tokens still shape the model's context: that is what they are for)."""
    out = episodes(model, tok, hostile.Talks)
    prompts = prompt_ids(tok, ["count to three", "repeat cat two times"])
    batch = make_batch([prompts[r.prompt_index] for r in out], [r.token_ids for r in out], tok.pad_token_id,
                       [r.loss_mask for r in out])
    env = torch.zeros(batch.response_mask.shape, dtype=torch.bool)
    for i, r in enumerate(out):
        env[i, :len(r.token_ids)] = torch.tensor(r.loss_mask) == 0
    assert env.sum() >= 20
    policy = PolicyLogprobs(model, fused=fused)
    cfg = PPOConfig(advantage_estimator="grpo", samples_per_prompt=2, rollout_batch=2, minibatch=4)
    exp = make_experience(policy, None, None, batch, torch.tensor([0.0, 1.0, 2.0, 0.5]), kl_coef=0.0, cfg=cfg,
                          temperature=1.0, use_ref=False)
    assert torch.all(exp.advantages[env] == 0) and torch.all(exp.rewards[env] == 0)

    def grads(exp, keep=None):
        model.zero_grad()
        real = policy.forward

        def spy(*a, **k):
            lp, ent = real(*a, **k)
            lp.retain_grad()
            keep.append(lp) if keep is not None else None
            return lp, ent
        policy.forward = spy
        try:
            loss, _ = ppo_minibatch_loss(policy, None, exp, torch.arange(4), cfg, 1.0)
        finally:
            del policy.forward
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    kept = []
    g1 = grads(exp, kept)
    per_token = kept[0].grad
    assert torch.all(per_token[env] == 0) and per_token[batch.response_mask].abs().sum() > 0
    noisy = torch.randn(env.shape) * 1e3
    exp.advantages = torch.where(env, noisy, exp.advantages)
    exp.old_logprobs = torch.where(env, noisy, exp.old_logprobs)
    g2 = grads(exp)
    assert any(g.abs().sum() > 0 for g in g1.values())
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("env, kind, says", [
    (hostile.Raises, "raised", "Raises.step raised RuntimeError: the tool's server is down"),
    (hostile.Hangs, "timeout", "Hangs.step did not return within 0.5 s (--rollout.env_timeout)"),
    (hostile.Garbage, "malformed", "Garbage.step returned dict, not engine.episodes.Step"),
    (hostile.NaNReward, "malformed", "NaNReward.step returned reward nan"),
    (hostile.Forges, "special_token", "Forges.step returned messages[0] containing '<eos>', a special token"),
    (hostile.Exits, "raised", "Exits.reset raised SystemExit: 3"),
])
def test_an_environment_that_misbehaves_is_contained_named_and_counted(model, tok, env, kind, says, caplog):
    began = time.monotonic()
    with caplog.at_level("WARNING", logger="engine"):
        out = episodes(model, tok, env, timeout=0.5)
    assert time.monotonic() - began < 30  # 4 episodes, one turn each, each step waited for 0.5 s at most
    assert [r.episode.failure for r in out] == [kind] * 4
    assert [r.episode.turns for r in out] == [1] * 4  # the first turn is the model's; nothing was appended
    assert all(r.loss_mask == [1] * len(r.token_ids) for r in out)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1 and says in warnings[0], warnings  # once per kind, however many episodes


def test_environments_that_hang_at_their_start_cost_one_timeout_not_one_each(model, tok):
    began = time.monotonic()
    out = episodes(model, tok, hostile.HangsAtStart, n=4, timeout=2.0)  # 8 episodes: 16 s one after another
    assert time.monotonic() - began < 10
    assert [r.episode.failure for r in out] == ["timeout"] * 8 and all(r.episode.turns == 1 for r in out)


def test_long_environment_messages_are_cut_and_the_episode_budget_holds(model, tok):
    class Verbose:
        def reset(self, prompt):
            pass

        def step(self, reply):
            return Step([{"role": "tool", "content": " ".join(["cat"] * 500)}])
    renderer = TurnRenderer(tok, 16)
    assert renderer.ids([{"role": "tool", "content": " ".join(["cat"] * 500)}]) == \
        tok.convert_tokens_to_ids(["cat"] * 16 + ["<sep>"])
    out = episodes(model, tok, Verbose, turns=8, budget=40)
    assert all(len(r.token_ids) <= 40 and r.episode.failure is None for r in out)
    assert all(r.loss_mask.count(0) % 17 == 0 and r.loss_mask.count(0) >= 17 for r in out)


@pytest.mark.parametrize("spec, says", [
    ("nowhere_at_all:Env", "cannot import 'nowhere_at_all'"),
    ("envs.hostile:Missing", "envs.hostile has no class 'Missing'"),
    ("envs.hostile", "give package.module:Class"),
    ("envs.hostile:NeedsArgs", "NeedsArgs() needs constructor arguments"),
    ("engine.task.tools:tool_record", "has no class 'tool_record'"),
])
def test_a_bad_env_flag_is_refused_by_name(spec, says):
    with pytest.raises(ValueError, match="--rollout.env") as err:
        load_env(spec)
    assert says in str(err.value)


def test_the_lookup_tool_pays_only_when_called_and_read_back():
    env = Lookup()
    env.reset("what color was the cat ?", color="blue")
    assert env.step("see cat") == Step([{"role": "tool", "content": "the cat was blue"}])
    assert env.step("see dog").messages[0]["content"] == f"the dog was {NOUN_COLOR['dog']}"  # its usual colour
    assert env.step("the cat was blue") == Step(reward=1.0, done=True)
    assert env.step("the cat was red") == Step(reward=0.0, done=True)
    assert env.step("the cat was blue ok") == Step(reward=0.0, done=True)


def test_prompt_records_carry_the_environments_arguments(tmp_path):
    from engine.data.formats import DataError, load

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "what color was the cat ?", "env": {"color": "blue"}}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content":
                                  "see cat"}, {"role": "tool", "content": "the cat was red"}]}) + "\n")
    a, b = load(path, "prompts")
    assert a.env == {"color": "blue"} and b.env is None and b.prompt[-1]["role"] == "tool"
    path.write_text(json.dumps({"prompt": "hi", "env": ["blue"]}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl.*line 1.*field 'env' must be an object"):
        load(path, "prompts")


@pytest.fixture(scope="module")
def lookup(tmp_path_factory, tok):
    """The lookup task's files and a small random policy that knows its words (a user's checkpoint)."""
    from engine.task.tools import write_tool_task

    root = tmp_path_factory.mktemp("lookup")
    files = write_tool_task(root / "data", n_demonstrations=40, n_prompts=32, n_eval=8)
    torch.manual_seed(1)
    policy = build_policy(ModelConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64), tok)
    policy.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root, files


def ppo_flags(lookup, estimator):
    root, files = lookup
    return ["--policy.path", str(root / "base"), "--data.prompts", str(files["prompts"]),
            "--rollout.env", "envs.hostile:Talks", "--rollout.max_turns", "3", "--rollout.max_new_tokens", "5",
            "--rollout.max_episode_tokens", "30", "--ppo.advantage_estimator", estimator, "--ppo.iterations", "4", "--ppo.rollout_batch", "4",
            "--ppo.samples_per_prompt", "2", "--ppo.minibatch", "4", "--ppo.checkpoint_every", "2",
            "--run.progress", "false", "--run.threads", "2"]


@pytest.mark.parametrize("estimator, staleness", [("gae", 0), ("grpo", 0), ("gae", 1)])
def test_ppo_on_episodes_logs_them_and_resumes_exactly_after_ctrl_c(lookup, tmp_path, monkeypatch, interrupt,
                                                                     estimator, staleness):
    """PPO with its critic (the critic reads the episode, values 0 on what the environment appended) and GRPO,
    on episodes of three turns with a reward at each, in the synchronous loop and with the engine (and the
    environment) in a process of its own one version behind; Ctrl-C in the middle and a resume give the
    uninterrupted run's weights (with staleness, from the episodes the checkpoint kept, checked as data)."""
    from safetensors.torch import load_file

    import engine.trainers.ppo as ppo
    from engine.cli import main

    flags = ppo_flags(lookup, estimator)
    if staleness:
        flags += ["--ppo.max_staleness", str(staleness), "--rollout.engine_cores", "shared"]
    assert main(["ppo", "--out", str(tmp_path / "straight"), *flags]) == 0
    rows = [json.loads(line) for line in (tmp_path / "straight" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(m.get("staleness", 0) == min(staleness, i) for i, m in enumerate(rows))
    for m in rows:
        assert m["episodes/tokens"] <= 15 + 10  # three turns of 5 at most, and two tool messages of 5
        assert m["episodes/turns"] == 3 and m["episodes/done"] == 1.0 and m["episodes/env_reward"] == 1.5
        assert 0.3 < m["episodes/masked_share"] < 1 and m["score"] == 1.5  # the environment's alone
    with monkeypatch.context() as m:
        interrupt(m, ppo, "make_experience", 3)  # during iteration 3 of 4
        assert main(["ppo", "--out", str(tmp_path / "broken"), *flags]) == 130
    if staleness:  # batch 2, generated by version 1, kept whole: its episodes' masks and stats too
        where = tmp_path / "broken" / "ppo" / "checkpoints" / "step-000002" / "trainer.json"
        kept = json.loads(where.read_text())["state"]["async_pending"]
        assert [(b["batch"], b["version"]) for b in kept] == [(2, 1)]
        answer = kept[0]["results"][0]
        assert len(answer) == 6 and answer[4].count(0) > 0 and answer[5]["turns"] == 3
    assert main(["ppo", "--out", str(tmp_path / "broken"), "--run.resume", "true", *flags]) == 0
    for role in ["policy"] + (["value"] if estimator == "gae" else []):
        a, b = (load_file(tmp_path / run / "ppo" / "final" / role / "model.safetensors") for run in ("straight", "broken"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_episode_flags_without_an_environment_are_refused(lookup, tmp_path, capsys):
    from engine.cli import main

    root, files = lookup
    code = main(["ppo", "--out", str(tmp_path / "x"), "--policy.path", str(root / "base"), "--data.prompts",
                 str(files["prompts"]), "--reward.fn", "engine.task.rewards:exact_answer", "--rollout.max_turns", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--rollout.max_turns" in err and "add --rollout.env package.module:Class" in err


def test_the_readmes_environment_runs_as_written(tiny_models, tmp_path, monkeypatch):
    """README's "Episodes" example: its environment file and its command, on a small Qwen2 checkpoint."""
    import re
    import shlex
    from pathlib import Path

    from engine.cli import main

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Episodes: tools and environments"):]
    code = re.search(r"```python\n(.*?)\n```", section, flags=re.S).group(1)
    shell = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).replace("\\\n", " ").splitlines()
    (tmp_path / "my_env.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    echo = shlex.split(shell[0])
    assert echo[0] == "echo" and echo[2] == ">"
    Path(echo[3]).write_text(echo[1] + "\n")
    argv = shlex.split(shell[1])[3:]
    argv[argv.index("--policy.path") + 1] = str(tiny_models["qwen2"])
    assert main(argv + ["--ppo.iterations", "1", "--ppo.rollout_batch", "1", "--ppo.samples_per_prompt", "2",
                        "--ppo.minibatch", "2", "--run.progress", "false"]) == 0
    m = json.loads((tmp_path / "runs" / "guess" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["episodes/turns"] >= 1 and "episodes/env_raised" not in m

    import my_env
    env = my_env.Guess()
    env.reset("Guess my number between 1 and 10.", secret=7)
    assert env.step("Is it 3?").messages == [{"role": "user", "content": "No, higher."}]
    assert env.step("Then 7.") == Step(reward=0.5, done=True)
