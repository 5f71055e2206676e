"""The `label` command's actions and their arguments (`python -m engine label rank|compare|serve|report|simulate`),
parsed by jsonargparse like every command; what they do lives beside them (serve.py, report.py, simulate.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

log = logging.getLogger("engine")


def _session_arguments(q: ArgumentParser, order: str) -> None:
    """What `rank` and `compare` share: who labels, where the session goes, how the answers are sampled."""
    q.add_argument("--labelers", type=str, required=True, help="comma-separated labeler names")
    q.add_argument("--to", type=str, required=True, help="the session folder to make (new or empty)")
    q.add_argument("--max_new_tokens", type=int, default=128)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0, help=f"sampling, assignment and {order}")
    q.add_argument("--overlap", type=float, default=0.0,
                   help="share of items given to --per_shared labelers (for agreement)")
    q.add_argument("--per_shared", type=int, default=2)


def add_actions(p: ArgumentParser) -> None:
    actions = p.add_subcommands(dest="action", required=True)
    rank = ArgumentParser(description="sample K responses per prompt from a policy, make a labeling session "
                                      "folder, print each labeler's link and serve the ranking page")
    rank.add_argument("--policy", type=str, required=True, help="the policy: a transformers checkpoint directory")
    rank.add_argument("--prompts", type=str, required=True, help="prompts file (JSONL, JSON or Parquet)")
    rank.add_argument("--k", type=int, default=4, help="responses per prompt")
    rank.add_argument("--rm", type=Optional[str], default=None,
                      help="a reward model: the items it separates least are labeled first")
    rank.add_argument("--flags", type=Optional[str], default=None,
                      help="the metadata flags a labeler may tick per answer, separated by ';' (default: "
                           "InstructGPT's five)")
    _session_arguments(rank, "display order")
    compare = ArgumentParser(description="sample one answer per prompt from each policy, make a blind A/B "
                                         "session (every pair of policies per prompt) and serve it")
    compare.add_argument("--policies", type=str, required=True,
                         help="name=DIR,name=DIR[,...]: the policies to compare (names are never shown)")
    compare.add_argument("--prompts", type=str, required=True, help="held-out prompts file")
    _session_arguments(compare, "left/right order")
    serve = ArgumentParser(description="serve an existing labeling session (resumes where it was)")
    serve.add_argument("--session", type=str, required=True, help="the session folder")
    report = ArgumentParser(description="win rates with 95% intervals, agreement and per-labeler figures of a "
                                        "session -> report.md, report.json, report.png in its folder")
    report.add_argument("--session", type=str, required=True, help="the session folder")
    simulate = ArgumentParser(description="the built-in task's simulated labelers label a served session through "
                                          "its HTTP API (session labeler i is the task's labeler i)")
    simulate.add_argument("--session", type=str, required=True, help="the session folder (for its tokens)")
    simulate.add_argument("--url", type=str, default="http://127.0.0.1:8765", help="where it is served")
    simulate.add_argument("--heldout", type=bool, default=False, help="the task's held-out labelers (evaluation)")
    simulate.add_argument("--seed", type=int, default=0)
    for q in (rank, compare, serve):
        q.add_argument("--host", type=str, default="127.0.0.1", help="listen address (loopback by default)")
        q.add_argument("--port", type=int, default=8765)
        q.add_argument("--public_url", type=Optional[str], default=None,
                       help="the address labelers open (an https reverse proxy in front of the app, say); the links "
                            "start with it")
        q.add_argument("--tls_cert", type=Optional[str], default=None,
                       help="serve https with this certificate (PEM; with --tls_key): tokens never cross the network "
                            "in clear text")
        q.add_argument("--tls_key", type=Optional[str], default=None, help="the certificate's private key (PEM)")
        q.add_argument("--serve", type=bool, default=True, help="false: only print the links")
    actions.add_subcommand("rank", rank, help="make a ranking session from a policy and prompts, and serve it")
    actions.add_subcommand("compare", compare, help="make a blind A/B session from two or more policies, and serve it")
    actions.add_subcommand("serve", serve, help="serve an existing session")
    actions.add_subcommand("report", report, help="write the session's report")
    actions.add_subcommand("simulate", simulate, help="the built-in task's simulated labelers label through the API")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def run_action(args) -> None:
    """The `label` command: args.action is rank, compare, serve, report or simulate, its options under
    args[action]."""
    from .serve import (check_port, check_tls, compare_items, links, parse_policies, public_base, sample_items,
                        serve, warn_plain_http)
    from .session import FLAGS, Session, create_session

    opts = args[args.action]
    if args.action == "simulate":
        from .simulate import simulate

        done = simulate(opts.session, opts.url, heldout=opts.heldout, seed=opts.seed)
        print(", ".join(f"{name}: {n}" for name, n in done.items()))
        return
    if args.action == "report":
        from .report import build_report

        build_report(opts.session)
        print(Path(opts.session) / "report.md")
        return
    check_port(opts.port)
    tls = check_tls(opts.tls_cert, opts.tls_key)
    if args.action == "compare":
        items, source = compare_items(parse_policies(opts.policies), opts.prompts, max_new_tokens=opts.max_new_tokens,
                                      temperature=opts.temperature, seed=opts.seed)
        folder = create_session(opts.to, items, _names(opts.labelers), kind="compare", overlap=opts.overlap,
                                per_shared=opts.per_shared, seed=opts.seed, source=source)
        log.info("label: %d blind comparisons in %s", len(items), folder)
    elif args.action == "rank":
        items, source = sample_items(opts.policy, opts.prompts, k=opts.k, max_new_tokens=opts.max_new_tokens,
                                     temperature=opts.temperature, seed=opts.seed)
        if opts.rm:
            from .uncertain import most_uncertain_first

            items = most_uncertain_first(opts.rm, items)
            source["order"] = f"the reward model {Path(opts.rm).resolve()} separates them least first"
        flags = [f.strip() for f in opts.flags.split(";") if f.strip()] if opts.flags is not None else FLAGS
        folder = create_session(opts.to, items, _names(opts.labelers), flags=flags, overlap=opts.overlap,
                                per_shared=opts.per_shared, seed=opts.seed, source=source)
        log.info("label: %d items of %d responses in %s", len(items), opts.k, folder)
    else:
        folder = opts.session
    if opts.serve:
        serve(folder, opts.host, opts.port, opts.public_url, tls)
    else:
        session = Session.open(folder, write=False)
        base = public_base(opts.host, check_port(opts.port), opts.public_url, https=tls is not None)
        print("\n".join(links(session, base)))
        warn_plain_http(opts.host, base)
        session.close()
