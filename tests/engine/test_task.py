"""The built-in task's data: deterministic, well-formed, and labelers who disagree at InstructGPT's rate."""
from engine.config import TaskConfig
from engine.data.encode import Encoder
from engine.task import decode_response
from engine.task.datasets import make_task_data
from engine.task.instructions import features
from engine.task.people import pairwise_agreement
from engine.task.vocab import build_tokenizer

SMALL = TaskConfig(n_corpus=200, n_corpus_heldout=20, n_demonstrations=300, n_comparisons=100,
                   n_comparisons_heldout=600, n_ppo_prompts=50, n_eval_prompts=40)


def test_data_is_deterministic_per_seed():
    a, b = make_task_data(SMALL), make_task_data(SMALL)
    assert a.demonstrations == b.demonstrations and a.comparisons == b.comparisons
    assert [i.prompt for i in a.eval_prompts] == [i.prompt for i in b.eval_prompts]
    c = make_task_data(TaskConfig(**{**SMALL.__dict__, "seed": 1}))
    assert c.demonstrations != a.demonstrations


def test_rankings_are_permutations_of_k_distinct_responses():
    data = make_task_data(SMALL)
    ks = set()
    for row in data.comparisons + data.comparisons_heldout:
        k = len(row["responses"])
        ks.add(k)
        assert SMALL.k_min <= k <= SMALL.k_max
        assert sorted(row["ranks"]) == list(range(k))
        assert len(set(row["responses"])) == k
    assert len(ks) >= 4  # K varies over 4..9


def test_heldout_labelers_never_label_training_data():
    data = make_task_data(SMALL)
    train_ids = {lab.id for lab in data.labelers}
    held_ids = {lab.id for lab in data.heldout_labelers}
    assert not train_ids & held_ids
    assert {row["labeler"] for row in data.comparisons} <= train_ids
    assert {row["labeler"] for row in data.comparisons_heldout} <= held_ids


def test_labeler_agreement_near_instructgpt_rate():
    # InstructGPT: 72.6 +- 1.5% inter-annotator agreement among training labelers.
    data = make_task_data(SMALL)
    assert 0.68 <= data.labeler_agreement() <= 0.78


def test_pairwise_agreement_counts_pairs():
    assert pairwise_agreement([0, 1, 2], [0, 1, 2]) == (3, 3)
    assert pairwise_agreement([0, 1, 2], [2, 1, 0]) == (0, 3)
    assert pairwise_agreement([0, 1, 2, 3], [1, 0, 2, 3]) == (5, 6)


def test_demonstrator_makes_mistakes_but_is_mostly_right():
    data = make_task_data(SMALL)
    inst = [(d, features(_inst(d), d["response"], True)) for d in data.demonstrations]
    core = sum(f["core"] for _, f in inst) / len(inst)
    assert 0.55 < core < 0.9  # right most of the time, not always: room for RLHF to help


def _inst(row):
    from engine.task.datasets import instruction_of
    return instruction_of(row)


def test_tokenizer_round_trip_through_the_users_encoder():
    """The task's text goes through the encoder users' data go through, by its chat template:
    "<bos> prompt <sep>" then "answer <eos>" (no eos for an answer that was cut off)."""
    tok = build_tokenizer()
    enc = Encoder(tok)
    d = make_task_data(SMALL).demonstrations[0]
    prompt = enc.prompt(d["prompt"])
    assert tok.convert_ids_to_tokens(prompt) == ["<bos>", *d["prompt"].split(), "<sep>"]
    ids = enc.response(d["prompt"], d["response"], len(prompt))
    assert ids[-1] == tok.eos_token_id
    words, finished = decode_response(tok, ids)
    assert words == d["response"] and finished
    cut = enc.response(d["prompt"], d["response"], len(prompt), finished=False)
    assert cut == ids[:-1] and decode_response(tok, cut) == (d["response"], False)


def test_verifiable_reward_checks_the_exact_answer():
    """engine.task.rewards:exact_answer: every prompt the task writes parses back to its instruction, and an
    answer scores 1 exactly when its core is the target, whatever its opener or full stop."""
    import random

    from engine.task.instructions import parse_instruction, sample_instruction
    from engine.task.rewards import exact_answer

    rng = random.Random(0)
    insts = [sample_instruction(rng) for _ in range(2000)]
    assert all(parse_instruction(i.prompt) == i for i in insts)
    right = [f"sure , {' '.join(i.target)} ." for i in insts[:50]]
    wrong = [" ".join(i.target[:-1]) for i in insts[:50]]
    assert exact_answer([i.prompt for i in insts[:50]], right) == [1.0] * 50
    assert exact_answer([i.prompt for i in insts[:50]], wrong) == [0.0] * 50
    assert exact_answer(["not an instruction of this task"], ["one two"]) == [0.0]
