"""Loading users' local transformers checkpoints: tokenizer, policy, reward and value models.

Nothing is fetched from a hub: every path must be a local directory written by `save_pretrained`. Weights
load in bfloat16 on a GPU and float32 on the CPU (`run.dtype`), with SDPA attention, or FlashAttention 2 on
a GPU where `flash-attn` is installed (`run.attention`). Every mismatch that would silently corrupt training
is an error naming the flag and the fix: a tokenizer with more tokens than the model's embedding (or with
no tokenizer files at all), a value model whose tokenizer differs from the policy's, weights missing from
the checkpoint or shaped unlike its config, an encoder (which sees future tokens) where a causal LM is
needed, a reward model whose score head would be freshly random. A damaged or missing weights file is one
line naming the directory, not a traceback.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..parallel import distributed as dist
from .causal import check_causal
from .lora import add_lora, load_adapters
from .meta_load import build, init_missing_head, pending

log = logging.getLogger("engine")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_attention(name: str, device: torch.device) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "flash_attention_2":
        if device.type != "cuda":
            raise ValueError("--run.attention flash_attention_2 needs a CUDA GPU (--run.device cuda); use sdpa "
                             "on the CPU")
        if not has_flash:
            raise ValueError("--run.attention flash_attention_2: the flash-attn package is not installed; "
                             "`pip install flash-attn --no-build-isolation`, or use --run.attention sdpa")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "flash_attention_2" if has_flash else "sdpa"
    from .attention import register

    return register()  # SDPA with grouped KV heads and a mask in one call on the CPU (`engine/models/attention.py`)


def compute_precision(run):
    """The context every pass of a run on the user's checkpoints computes under: autocast to run.dtype when
    that is a 16-bit type (frozen models are stored in it; trained ones keep float32 weights), else nothing."""
    import contextlib

    device = torch.device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def checkpoint_dir(path, flag: str) -> Path:
    """`path` as a directory holding a transformers checkpoint, or a FileNotFoundError naming `flag`."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory (a local transformers checkpoint written "
                                f"by save_pretrained; nothing is downloaded)")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: no config.json in this directory; expected a transformers "
                                f"checkpoint written by save_pretrained")
    for name in ("config.json", "adapter_config.json"):
        if (p / name).is_file():
            check_json_object(p / name, flag, path)
    return p


def check_json_object(file: Path, flag: str, path) -> dict:
    """`file` (a checkpoint's config) holds one JSON object, or a ValueError naming it: a garbled config is
    reported as itself, not as whichever loader first trips over it (the tokenizer's, before)."""
    import json

    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {path}: {file.name} is not UTF-8 text ({exc.reason} at byte {exc.start}); the "
                         f"checkpoint is damaged: save it again with save_pretrained") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {path}: {file.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}); the checkpoint is damaged: save it again with save_pretrained") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{flag} {path}: {file.name} holds a JSON {type(doc).__name__}, not an object; the "
                         f"checkpoint is damaged: save it again with save_pretrained")
    return doc


def check_causal_lm(config: dict, flag: str, path) -> None:
    """A role that generates or scores tokens (policy, reference) needs a causal LM checkpoint: a reward or value
    model's (a *ForSequenceClassification) would load as one through its body, with its tied embedding as the
    LM head or a random one, and silently give nonsense log-probs."""
    names = config.get("architectures") or []
    if names and all(isinstance(n, str) and n.endswith("ForSequenceClassification") for n in names):
        raise ValueError(f"{flag} {path}: a scalar-head model ({names[0]}: a reward or value model), not a causal "
                         f"LM; {flag} needs a policy checkpoint (e.g. OUT/sft/final/policy)")


def load_tokenizer(path, flag: str = "--policy.path", model: bool = True):
    """The tokenizer saved beside the model (model=False: a directory holding only a tokenizer). A missing pad
    token becomes the eos token (GPT-2 has none)."""
    from transformers import AutoTokenizer

    p = checkpoint_dir(path, flag) if model else Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{flag} {path}: no usable tokenizer in this directory ({exc}); save the "
                                f"model's tokenizer there with tokenizer.save_pretrained") from None
    if len(tok) < 32:
        raise FileNotFoundError(f"{flag} {path}: the tokenizer found there has {len(tok)} token(s): its files "
                                f"(tokenizer.json, or vocab.json + merges.txt, or tokenizer.model) are missing. Save "
                                f"the model's tokenizer there with tokenizer.save_pretrained")
    if tok.eos_token_id is None:
        raise ValueError(f"{flag} {path}: the tokenizer has no eos token, so generations could never end; "
                         f"set tokenizer.eos_token and save it again")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def check_vocab(tokenizer, model, flag: str, path) -> None:
    """A tokenizer may have fewer tokens than the embedding (padded vocabularies), never more."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{flag} {path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
            f"rows, so token ids >= {rows} would index past it. Use the tokenizer saved with this model, or "
            f"call model.resize_token_embeddings(len(tokenizer)) and save the model again.")


def _from_pretrained(cls, p: Path, flag: str, *, head_required: bool, **kw):
    """cls.from_pretrained(p) with every way a checkpoint can fail to be the model it claims turned into one
    line naming `flag`: unreadable or missing weights, weights missing from it or shaped unlike its config,
    and (head_required) a scalar head that would be freshly initialised."""
    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(str(p), output_loading_info=True, ignore_mismatched_sizes=True, **kw)
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ValueError(f"{flag} {p}: the model cannot be loaded ({reason}); is the checkpoint complete? Write it "
                         f"again with save_pretrained") from None
    if info.get("mismatched_keys"):
        key, ckpt, want = sorted(info["mismatched_keys"])[0]
        raise ValueError(f"{flag} {p}: {len(info['mismatched_keys'])} weights do not fit the shapes config.json "
                         f"gives (e.g. {key}: {list(ckpt)} in the weights file, {list(want)} from the config); the "
                         f"config and the weights come from different models")
    head = {k for k in info.get("missing_keys", ()) if k.split(".")[0] == "score"}
    missing = sorted(set(info.get("missing_keys", ())) - head)
    if missing:
        raise ValueError(f"{flag} {p}: {len(missing)} weights are missing from the checkpoint (e.g. {missing[0]}) and "
                         f"would be random; is this a {model.config.model_type} checkpoint of the architecture "
                         f"config.json names, written completely?")
    if head and head_required:
        raise ValueError(f"{flag} {p}: this checkpoint has no trained score head ({sorted(head)[0]} is not in it), so "
                         f"its rewards would come from a random head. Give a reward model (`python -m engine rm` "
                         f"writes OUT/rm/final/reward)")
    if head:
        init_missing_head(model, head)
    return model


def placed(model, device):
    """`model` on `device`, unless it was built on the meta device for sharding (`sharding.shard` places
    its slices)."""
    return model if pending(model) else model.to(device)


def score_heads(p: Path, flag: str, path, heads: int | None) -> int:
    """The outputs of the score head to build: `heads` when given, else a saved reward model's own (its
    config's num_labels: an ensemble of several heads on one body is one model directory), else 1 (a causal
    LM's config says num_labels 2 by transformers' default, which means nothing here). A saved reward model
    with another number of heads than asked is refused rather than given a fresh head."""
    config = check_json_object(p / "config.json", flag, path) if (p / "config.json").is_file() else {}
    saved, archs = None, config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{flag} {path}: config.json's architectures is {archs!r}; it must be a list of class "
                         f"names (e.g. [\"LlamaForSequenceClassification\"])")
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = config.get("id2label")
        saved = config["num_labels"] if "num_labels" in config else len(labels) if isinstance(labels, dict) else 1
        if not isinstance(saved, int) or isinstance(saved, bool) or not 1 <= saved <= 1024:
            raise ValueError(f"{flag} {path}: config.json's num_labels is {saved!r}; a reward model here has 1 to "
                             f"1024 score heads (an ensemble's members)")
    if heads is None:
        return saved or 1
    if saved is not None and saved != heads:
        raise ValueError(f"{flag} {path}: a reward model with {saved} score head(s), not {heads}; give "
                         f"--rm.members {saved}, or start from the SFT policy instead")
    return heads


@torch.no_grad()
def _average_heads(model) -> None:
    """The score head's outputs replaced by one, their mean (weights, bias and score offsets alike)."""
    from .forward import score_offsets

    old = model.score
    head = torch.nn.Linear(old.in_features, 1, bias=old.bias is not None, dtype=old.weight.dtype,
                           device=old.weight.device)
    head.weight.copy_(old.weight.mean(0, keepdim=True))
    if old.bias is not None:
        head.bias.copy_(old.bias.mean(0, keepdim=True))
    offsets = score_offsets(model, old.out_features)
    model.score = head
    model.config.num_labels = 1
    model.config.score_offset = sum(offsets) / len(offsets)


def load_model(path, *, flag: str, scalar: bool, device="cpu", run=None, train=None, resume=None, tokenizer=None,
               head_required: bool = False, heads: int | None = None, mean_head: bool = False):
    """A causal LM (scalar=False) or the same body with a linear score head (scalar=True): one output, or
    `heads` (score_heads: by default a saved reward model's own number, an ensemble's members). mean_head: a
    value model that starts from an ensemble: its heads averaged into one (the members' mean score).

    run: RunConfig (dtype, attention; None: the defaults). train: TrainedModelConfig of a trained role (gradient checkpointing,
    LoRA) or None for a frozen one. resume: a checkpoint's model directory: full weights replace `path`;
    saved LoRA adapters go on top of `path`. tokenizer: checked against the model's embedding size.
    head_required: a scalar model must bring its trained score head (the reward model PPO scores with).
    """
    adapters = None
    if resume is not None:
        if (Path(resume) / "adapter_config.json").is_file():
            adapters = resume
        else:
            path = resume
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .forward import quiet_transformers

    quiet_transformers()
    p = checkpoint_dir(path, flag)
    if not scalar and (p / "config.json").is_file():
        check_causal_lm(check_json_object(p / "config.json", flag, path), flag, path)
    if run is None:
        from ..config import RunConfig

        run = RunConfig()
    device = torch.device(device)
    dtype = resolve_dtype(run.dtype, device)
    labels = score_heads(p, flag, path, heads) if scalar else None
    if train is not None and train.lora_rank == 0:
        # Trained weights stay float32 (the master copy): a bf16 weight would swallow updates smaller than
        # 1/256 of itself, i.e. most of PPO's. The passes still compute in `dtype` (see `compute_precision`).
        dtype = torch.float32
    kw = dict(dtype=dtype, attn_implementation=resolve_attention(run.attention, device))
    if resume is not None:  # a run directory holds safetensors only; never unpickle a file found there
        kw["use_safetensors"] = True
    # several processes: built on the meta device; `sharding.shard` gives each rank its slices (meta_load)
    meta = dist.world().size > 1 and adapters is None and (train is None or train.lora_rank == 0)
    if meta:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(p), **({"num_labels": labels} if scalar else {}))
        cls = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
        model = build(cls, config, p, flag, head_required=head_required and scalar, **kw)
    elif scalar:
        model = _from_pretrained(AutoModelForSequenceClassification, p, flag, head_required=head_required,
                                 num_labels=labels, **kw)
    else:
        model = _from_pretrained(AutoModelForCausalLM, p, flag, head_required=False, **kw)
    if scalar and not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ValueError(f"{flag} {path}: {type(model).__name__} has no linear `score` head, which reward and "
                         f"value models here read; use a decoder-only model (Llama, Qwen2, Mistral, GPT-2, ...)")
    if mean_head and scalar and model.score.out_features > 1:
        if meta:
            raise ValueError(f"{flag} {path}: a value model starting from an ensemble of {model.score.out_features} "
                             f"reward heads needs one process, or --value.path (e.g. the SFT policy)")
        _average_heads(model)
    if tokenizer is not None:
        check_vocab(tokenizer, model, flag, path)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if train is not None and train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters is not None:
        model = load_adapters(model, adapters)
    elif train is not None and train.lora_rank > 0:
        model = add_lora(model, train, scalar=scalar)
    if train is None:
        model.requires_grad_(False).eval()
    if meta:  # moved, filled and checked by sharding.shard, one rank's slices at a time
        return model
    model = model.to(device)
    check_causal(model, flag, path)
    return model
