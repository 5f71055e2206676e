"""The labeling web app (FastAPI, served by uvicorn): the rank page and its JSON API, and the admin's progress.

Every request needs a token: a labeler's (their own work only) or the admin's (progress only), as
`Authorization: Bearer TOKEN` or, for the pages a person opens from a link, `?token=TOKEN`. Request bodies
are bounded (MAX_BODY bytes). A submission is answered "saved" only after it is on disk (engine/label/store.py).

    GET  /rank?token=T          the ranking page (a "rank" session)
    GET  /compare?token=T       the blind A/B page (a "compare" session): the policies are never named
    GET  /api/next              the labeler's next item (responses in their shuffled order) or {"item": null}
    POST /api/submit            rank: {"id", "item", "ranking", "ratings", "flags", "seconds"}; compare: {"id",
                                "item", "choice": 0 | 1 | "tie", "seconds"} -> {"saved": true, "new": bool}
    POST /api/skip              {"id", "item", "seconds"} -> {"saved": true, "new"}
    GET  /admin?token=A, GET /api/progress   every labeler's assigned, ranked and skipped counts
"""
from __future__ import annotations

import json
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from .session import Session, SubmissionError

MAX_BODY = 64 * 1024


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("token")


def _page(name: str) -> str:
    """A page of static/, with static/common.js (what the pages share) in place of its /*COMMON*/ marker."""
    static = resources.files("engine.label").joinpath("static")
    return static.joinpath(name).read_text(encoding="utf-8").replace(
        "/*COMMON*/", static.joinpath("common.js").read_text(encoding="utf-8"))


def make_app(session: Session) -> FastAPI:
    app = FastAPI(title="rlhf-engine labeling", docs_url=None, redoc_url=None, openapi_url=None)

    def labeler(request: Request) -> str:
        name = session.labeler(_token(request))
        if name is None:
            raise HTTPException(401, "a labeler's token is needed: open the link you were given")
        return name

    def admin(request: Request) -> None:
        if not session.is_admin(_token(request)):
            raise HTTPException(401, "the admin's token is needed")

    async def body_of(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise HTTPException(413, f"request body over {MAX_BODY} bytes")
        try:  # ValueError: not JSON, not UTF-8, or an integer past Python's 4,300 digits; RecursionError: nesting
            body = json.loads(data)
        except (ValueError, RecursionError):
            raise HTTPException(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return body

    @app.middleware("http")
    async def safe_headers(request: Request, call_next):
        # The token rides in the page's link: never sent on as a Referer, never cached, never framed elsewhere;
        # the pages load nothing from other origins.
        response = await call_next(request)
        response.headers.update({"Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
                                 "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                                            "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"})
        return response

    @app.exception_handler(SubmissionError)
    async def refused(request: Request, exc: SubmissionError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/rank", response_class=HTMLResponse)
    def rank_page(request: Request):
        labeler(request)
        return _page("rank.html" if session.settings["kind"] == "rank" else "compare.html")

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request):
        return rank_page(request)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request):
        admin(request)
        return _page("admin.html")

    @app.get("/api/next")
    def next_item(request: Request):
        name = labeler(request)
        return {"labeler": name, **(session.next_item(name) or {"item": None})}

    # The saving endpoints read the (bounded) body here, then save in the thread pool, so that one fsync does
    # not hold up the event loop; the session's lock orders the writes.
    @app.post("/api/submit")
    async def submit(request: Request):
        name, body = labeler(request), await body_of(request)
        return {"saved": True, "new": await _in_thread(session.submit, name, body)}

    @app.post("/api/skip")
    async def skip(request: Request):
        name, body = labeler(request), await body_of(request)
        return {"saved": True, "new": await _in_thread(session.skip, name, body)}

    @app.get("/api/progress")
    def progress(request: Request):
        admin(request)
        return session.progress()

    return app


async def _in_thread(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
