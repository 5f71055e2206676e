"""Making a session's items (sampling from the policies) and serving it, for the `label` command's actions
(engine/label/commands.py):

    label rank  --policy DIR --prompts FILE --labelers alice,bob --to SESSION [--k 4] [--overlap 0.2]
                samples K responses per prompt with the engine's rollout backend (transformers), writes the
                session folder, prints each labeler's link and serves it
    label compare --policies a=DIR,b=DIR --prompts FILE --labelers alice,bob --to SESSION
                one answer per prompt from each policy, every pair of policies per prompt, judged blind
    label serve --session SESSION        serves an existing session again (after a restart, a crash, kill -9)
    label report --session SESSION       win rates with intervals, agreement, per-labeler figures
    label simulate --session SESSION --url URL [--heldout true]   the built-in task's labelers, through the API

The server listens on 127.0.0.1 unless --host says otherwise, and every page and call needs a token.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

log = logging.getLogger("engine")


def sample_items(policy: str | Path, prompts_file: str | Path, *, k: int, max_new_tokens: int, temperature: float,
                 seed: int, max_prompt_tokens: int = 512, min_k: int = 2,
                 allow_empty: bool = False) -> tuple[list[dict], dict]:
    """K sampled responses with text per prompt of `prompts_file` from the policy at `policy` -> (items, source);
    a prompt whose samples are mostly empty is left out (logged). allow_empty: K samples, empty or not (a blind
    evaluation judges an empty answer like any other)."""
    from ..config import DataConfig, RunConfig
    from ..data.encode import make_encoder, special_texts
    from ..data.formats import load
    from ..models.loading import load_model, load_tokenizer
    from ..rollout import HFRollout

    if k < min_k:
        raise ValueError(f"--k must be >= {min_k} (a ranking compares at least two responses), got {k}")
    tok = load_tokenizer(policy, "--policy")
    model = load_model(policy, flag="--policy", scalar=False, device="cpu", run=RunConfig(), tokenizer=tok)
    enc = make_encoder(tok, DataConfig(max_prompt_tokens=max_prompt_tokens), None, max_new_tokens, "--policy")
    records = [r.prompt for r in load(prompts_file, "prompts", special_texts(tok))]
    ids = [enc.prompt(p) for p in records]
    rollout = HFRollout(model, seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    # 2K samples per prompt, the first K with text kept: an empty answer cannot go into a comparisons file
    n = k if allow_empty else 2 * k
    results = rollout.generate(ids, n=n, max_tokens=max_new_tokens, temperature=temperature, seed=seed)
    items, dropped = [], 0
    for i, prompt in enumerate(records):
        mine = [(enc.text_of(r.token_ids), r.finish_reason == "stop") for r in results[i * n:(i + 1) * n]]
        mine = [(text, done) for text, done in mine if allow_empty or text.strip()][:k]
        if len(mine) < k:
            dropped += 1
            continue
        items.append({"index": i, "prompt": prompt, "responses": [t for t, _ in mine],
                      "finished": [d for _, d in mine]})
    if dropped:
        log.warning("label: %d of %d prompts left out: fewer than %d of their %d samples had any text", dropped,
                    len(records), k, n)
    source = {"policy": str(Path(policy).resolve()), "k": k, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "seed": seed}
    return items, source


def compare_items(policies: dict[str, str], prompts_file, *, max_new_tokens: int, temperature: float,
                  seed: int) -> tuple[list[dict], dict]:
    """One answer per prompt from each policy; an item per prompt and pair of policies -> (items, source)."""
    if len(policies) < 2:
        raise ValueError(f"--policies needs two or more name=DIR entries, got {list(policies)}")
    answers = {}  # policy -> {prompt index: its item}; every prompt, since empty answers are kept
    for name, path in policies.items():
        items, _ = sample_items(path, prompts_file, k=1, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, min_k=1, allow_empty=True)
        answers[name] = {row["index"]: row for row in items}
    out = []
    for i in sorted(answers[next(iter(policies))]):
        for a, b in itertools.combinations(policies, 2):
            out.append({"prompt": answers[a][i]["prompt"], "policies": [a, b],
                        "responses": [answers[a][i]["responses"][0], answers[b][i]["responses"][0]],
                        "finished": [answers[a][i]["finished"][0], answers[b][i]["finished"][0]]})
    source = {"policies": {n: str(Path(p).resolve()) for n, p in policies.items()},
              "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    return out, source


def parse_policies(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--policies: {part!r} is not name=DIR")
        if name in out:
            raise ValueError(f"--policies: the name {name!r} is given twice")
        out[name] = path
    return out


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is 1 to 65535 (8765 by default)")
    return port


def check_tls(cert: str | None, key: str | None) -> tuple[str, str] | None:
    """(certificate, key) for https, both readable files, or None for plain http; an error naming the flag."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls_cert and --tls_key go together: give the certificate and its private key (PEM "
                         "files), or neither for plain http")
    for flag, path in (("--tls_cert", cert), ("--tls_key", key)):
        if not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file (a PEM file; e.g. made with openssl req -x509 ...)")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--tls_cert {cert} / --tls_key {key}: not a certificate and its key ({exc}); give PEM "
                         f"files that belong together") from None
    return cert, key


def public_base(host: str, port: int, public_url: str | None = None, https: bool = False) -> str:
    """What a labeler's link starts with: --public_url as given, else this machine's name where the server
    listens on every interface (0.0.0.0 or ::, which nobody can open), else the listening address; https when
    the app serves TLS itself."""
    if public_url:
        if not public_url.startswith(("http://", "https://")):
            raise ValueError(f"--public_url {public_url!r}: give the address labelers open, starting with http:// "
                             f"or https:// (e.g. https://label.example.org)")
        return public_url.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        import socket

        host = socket.gethostname()
    return f"{'https' if https else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def warn_plain_http(host: str, base: str) -> None:
    if host not in LOOPBACK and not base.startswith("https://"):
        log.warning("label: listening on %s over plain http: the tokens in these links cross the network in clear "
                    "text. Put the app behind an https reverse proxy and pass --public_url, or keep it on "
                    "127.0.0.1", host)


def links(session, base: str) -> list[str]:
    out = [f"admin: {base}/admin?token={session.tokens['admin']}"]
    page = "rank" if session.settings["kind"] == "rank" else "compare"
    out += [f"{name}: {base}/{page}?token={tok}" for name, tok in session.tokens["labelers"].items()]
    return out


def listen(host: str, port: int):
    """A socket bound to (host, port) before anything is printed: a busy port is refused by name here rather
    than after the links (which would reach whatever holds the port)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}): another server (another labeling "
                         f"session?) holds that port. Choose another with --port, or stop that server") from None
    sock.listen(128)
    return sock


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8765, public_url: str | None = None,
          tls: tuple[str, str] | None = None) -> None:
    """Serve the session in `folder`: its lock first (one server per session, as one run per directory), then
    the port, then the links, then uvicorn until Ctrl-C. tls: (certificate, key) PEM files for https."""
    import sys

    import uvicorn

    from ..rundir.run_lock import acquire, release
    from .app import make_app
    from .session import Session

    check_port(port)
    folder = Path(folder)
    if not (folder / "session.json").exists():
        Session.open(folder, write=False)  # says what is missing, before a lock file is made in a wrong folder
    lock = acquire(folder, " ".join(["python -m engine", *sys.argv[1:]]))
    try:
        session = Session.open(folder)
        try:
            sock = listen(host, port)
            base = public_base(host, port, public_url, https=tls is not None)
            print("\n".join(links(session, base)), flush=True)
            warn_plain_http(host, base)
            print(f"serving {folder} on {base} (listening on {host}:{port}); Ctrl-C to stop", flush=True)
            config = uvicorn.Config(make_app(session), log_level="warning",
                                    **({"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}))
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            session.close()
    finally:
        release(folder, lock)
