"""Everything the built-in task needs, made by code from one seed: corpus, demonstrations, rankings,
PPO prompts and held-out evaluation prompts. Written as JSONL so a person can read what was trained on."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .corpus import make_corpus
from .instructions import Instruction, sample_instruction
from .people import Labeler, candidate_response, make_labelers, pairwise_agreement, write_response


@dataclass
class TaskData:
    corpus: list[str]
    corpus_heldout: list[str]
    demonstrations: list[dict]        # {prompt, response, family, target}
    comparisons: list[dict]           # {prompt, family, target, responses, finished, ranks, labeler}
    comparisons_heldout: list[dict]   # ranked by held-out labelers; `ranks_second` by a second one
    ppo_prompts: list[Instruction]
    eval_prompts: list[Instruction]
    labelers: list[Labeler]
    heldout_labelers: list[Labeler]

    def labeler_agreement(self) -> float:
        same = total = 0
        for c in self.comparisons_heldout:
            s, t = pairwise_agreement(c["ranks"], c["ranks_second"])
            same, total = same + s, total + t
        return same / max(total, 1)


def instruction_of(row: dict) -> Instruction:
    return Instruction(row["family"], row["prompt"], tuple(row["target"]))


def _row(inst: Instruction, **kw) -> dict:
    return {"prompt": inst.prompt, "family": inst.family, "target": list(inst.target), **kw}


def _ranked(inst, k, rng, labelers, second: Labeler | None = None) -> dict:
    responses, finished = [], []
    for _ in range(50 * k):  # K distinct samples: identical pairs carry no preference
        r, f = candidate_response(inst, rng)
        if r not in responses:
            responses.append(r)
            finished.append(f)
        if len(responses) == k:
            break
    lab = rng.choice(labelers)
    row = _row(inst, responses=responses, finished=finished, ranks=lab.rank(inst, responses, finished, rng),
               labeler=lab.id)
    if second is not None:
        other = second if second.id != lab.id else labelers[(labelers.index(lab) + 1) % len(labelers)]
        row["ranks_second"] = other.rank(inst, responses, finished, rng)
    return row


def make_task_data(cfg) -> TaskData:
    """cfg: engine.config.TaskConfig. Each data set has its own random stream, so changing the size of
    one (say, more comparisons) leaves every other one as it was."""
    def stream(name: str) -> random.Random:
        return random.Random(f"task-{cfg.seed}-{name}")

    labelers = make_labelers(cfg.n_labelers, 0, cfg.label_noise, cfg.labeler_spread, cfg.seed)
    heldout = make_labelers(cfg.n_heldout_labelers, cfg.n_labelers, cfg.label_noise, cfg.labeler_spread, cfg.seed)
    rng = stream("demonstrations")
    demos = []
    for _ in range(cfg.n_demonstrations):
        inst = sample_instruction(rng)
        demos.append(_row(inst, response=write_response(inst, rng)))
    rng = stream("comparisons")
    comps = [_ranked(sample_instruction(rng), rng.randint(cfg.k_min, cfg.k_max), rng, labelers)
             for _ in range(cfg.n_comparisons)]
    rng = stream("comparisons-heldout")
    comps_h = [_ranked(sample_instruction(rng), rng.randint(cfg.k_min, cfg.k_max), rng, heldout, heldout[0])
               for _ in range(cfg.n_comparisons_heldout)]
    ppo_rng, eval_rng = stream("ppo"), stream("eval")
    return TaskData(
        corpus=make_corpus(cfg.n_corpus, stream("corpus")),
        corpus_heldout=make_corpus(cfg.n_corpus_heldout, stream("corpus-heldout")),
        demonstrations=demos,
        comparisons=comps,
        comparisons_heldout=comps_h,
        ppo_prompts=[sample_instruction(ppo_rng) for _ in range(cfg.n_ppo_prompts)],
        eval_prompts=[sample_instruction(eval_rng) for _ in range(cfg.n_eval_prompts)],
        labelers=labelers,
        heldout_labelers=heldout,
    )


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def ranking_of(ranks: list[int]) -> list[int]:
    """Response indices best first (the users' comparisons format) from each response's rank (0 = best)."""
    return sorted(range(len(ranks)), key=lambda i: ranks[i])


def _comparison_record(c: dict) -> dict:
    out = {"prompt": c["prompt"], "responses": c["responses"], "ranking": ranking_of(c["ranks"]),
           "finished": c["finished"], "family": c["family"], "target": c["target"], "labeler": c["labeler"]}
    if "ranks_second" in c:
        out["ranking_second"] = ranking_of(c["ranks_second"])
    return out


# What each file holds, in the formats users bring (engine/data/formats.py); extra fields (family, target,
# labeler, ranking_second) are for reading and for the built-in report.
FILES = {"corpus": "corpus.jsonl", "corpus_heldout": "corpus_heldout.jsonl", "demonstrations": "demonstrations.jsonl",
         "comparisons": "comparisons.jsonl", "comparisons_heldout": "comparisons_heldout.jsonl",
         "ppo_prompts": "ppo_prompts.jsonl", "eval_prompts": "eval_prompts.jsonl"}


def save_task_data(data: TaskData, out: Path) -> None:
    write_jsonl(out / FILES["corpus"], ({"text": t} for t in data.corpus))
    write_jsonl(out / FILES["corpus_heldout"], ({"text": t} for t in data.corpus_heldout))
    write_jsonl(out / FILES["demonstrations"], ({"prompt": d["prompt"], "completion": d["response"],
                                                 "family": d["family"], "target": d["target"]}
                                                for d in data.demonstrations))
    write_jsonl(out / FILES["comparisons"], (_comparison_record(c) for c in data.comparisons))
    write_jsonl(out / FILES["comparisons_heldout"], (_comparison_record(c) for c in data.comparisons_heldout))
    write_jsonl(out / FILES["ppo_prompts"], (_row(i) for i in data.ppo_prompts))
    write_jsonl(out / FILES["eval_prompts"], (_row(i) for i in data.eval_prompts))
