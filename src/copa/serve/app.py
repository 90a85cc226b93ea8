"""The web demo's server: FastAPI, one static page (``page.html``), a JSON API.

Why FastAPI and one page rather than Gradio: the page needs one form and one result panel; FastAPI
(+ uvicorn, python-multipart) is three small pure-Python packages, where Gradio pulls in about a
hundred and a front-end build; the upload limits, the error answers and the HTTP tests are then
ours, in plain code; and the page works without any external asset, offline.

Routes:

- ``GET /``: the page. ``?example=NAME&question=...&phrase=...&phrase2=...&keep=0.5&run=1`` fills
  the form and runs it (used by the screenshot test, and shareable);
- ``GET /api/info``: models per task, examples, limits, the default keep ratio;
- ``GET /examples/NAME``: an example image;
- ``POST /api/predict`` (multipart form): ``image`` (file) or ``example`` (name), ``question``,
  ``phrase``, ``phrase2``, ``keep_ratio`` -> JSON: kept patches (overlay PNGs as data URLs) for each
  phrase and for the text-agnostic query, the box of each phrase in pixels, the answer, a caption,
  and the time of the text-aware encoder pass at the chosen keep ratio next to unpruned.

A bad upload (too large, too many pixels, not an image, truncated) is a 4xx JSON error with a
message; any other failure is a 500 JSON error, logged; the server keeps serving. Model calls are
serialised by a lock (the keep ratio is model state).

(No ``from __future__ import annotations`` here: FastAPI reads the route annotations at runtime.)
"""

import base64
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copa.predictor import Predictor
from copa.preprocess import ImageError, open_image

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
SHOWN_TASKS = ("vqa", "grounding", "caption")
MAX_TEXT_CHARS = 300


@dataclass
class ServeOptions:
    """Limits and extras of the server."""

    max_upload_bytes: int = 8 * 2**20
    max_pixels: int = 24_000_000  # width x height of an upload, checked from the header before decoding
    examples: list[Path] = field(default_factory=list)
    display_size: int = 320
    timing_runs: int = 3


@dataclass
class TaskModels:
    """The predictor behind each output: ``base`` (kept patches, and every task without its own),
    and the fine-tuned ones by task name."""

    base: Predictor
    by_task: dict[str, Predictor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def for_task(self, task: str) -> Predictor:
        return self.by_task.get(task, self.base)

    def describe(self) -> dict[str, Any]:
        out = {"base": self.sources.get("base", "")}
        for t in SHOWN_TASKS:
            p = self.for_task(t)
            out[t] = {"checkpoint": self.sources.get(t, out["base"]), "fine_tuned": p.task == t}
        return out


class BadRequest(Exception):
    """A request the user can fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _data_url(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise BadRequest(f"the image has more pixels than allowed ({max_pixels:,})", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return  # not an image at all: load_image gives the precise kind next
    if w * h > max_pixels:
        raise BadRequest(f"the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}", 413)


class Service:
    """What the routes call; no HTTP in here, so it is tested and reused directly."""

    def __init__(self, models: TaskModels, options: ServeOptions) -> None:
        self.models, self.options = models, options
        self.lock = threading.Lock()
        self.examples = {p.name: p for p in options.examples}

    def info(self) -> dict[str, Any]:
        base = self.models.base
        return {
            "models": self.models.describe(),
            "keep_ratio": base.model.keep_ratios[0],
            "pruning": base.model.pruning,
            "grid": base.grid,
            "image_size": base.model.cfg.vision.image_size,
            "examples": sorted(self.examples),
            "limits": {
                "max_upload_bytes": self.options.max_upload_bytes,
                "max_pixels": self.options.max_pixels,
                "max_text_chars": MAX_TEXT_CHARS,
            },
        }

    def image_bytes(self, upload: bytes | None, example: str | None) -> tuple[bytes, str]:
        if upload:
            if len(upload) > self.options.max_upload_bytes:
                raise BadRequest(
                    f"the upload is {len(upload):,} bytes; the limit is {self.options.max_upload_bytes:,}",
                    413,
                )
            return upload, "upload"
        if example:
            if example not in self.examples:
                raise BadRequest(f"no example called {example!r}", 404)
            return self.examples[example].read_bytes(), example
        raise BadRequest("send an image file or pick an example")

    def predict(
        self, data: bytes, source: str, question: str, phrases: list[str], keep_ratio: float | None
    ) -> dict[str, Any]:
        """The whole panel for one image (see the module docstring)."""
        if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
            raise BadRequest(f"keep ratio {keep_ratio} is outside (0, 1]")
        for t in [question, *phrases]:
            if len(t) > MAX_TEXT_CHARS:
                raise BadRequest(f"a text is {len(t)} characters long; the limit is {MAX_TEXT_CHARS}")
        check_pixels(data, self.options.max_pixels)
        try:
            image = open_image(data)
        except ImageError as e:
            raise BadRequest(f"cannot use this image ({e.kind.replace('_', ' ')})") from None
        with self.lock:
            return self._predict(image, source, question, phrases, keep_ratio)

    def _predict(
        self, image: Any, source: str, question: str, phrases: list[str], keep_ratio: float | None
    ) -> dict[str, Any]:
        m = self.models
        base, grounding = m.base, m.for_task("grounding")
        ratio = keep_ratio if keep_ratio is not None else base.model.keep_ratios[0]
        prep = base.prepare(image)
        texts: list[str | None] = [*phrases, None]
        kept = base.kept_patches(prep, texts, keep_ratio=ratio)
        boxes = grounding.ground(grounding.prepare(image), phrases, keep_ratio=ratio) if phrases else []
        views = []
        for i, (t, k) in enumerate(zip(texts, kept, strict=True)):
            box = boxes[i] if i < len(boxes) else None
            views.append(
                {
                    "text": t if t is not None else "(no text: text-agnostic query)",
                    "kept": k,
                    "num_kept": len(k),
                    "box": box.to_dict() if box else None,
                    "overlay": _data_url(base.overlay(image, k, self.options.display_size, box)),
                }
            )
        out: dict[str, Any] = {
            "source": source,
            "width": image.width,
            "height": image.height,
            "keep_ratio": ratio,
            "grid": base.grid,
            "num_patches": base.grid**2,
            "views": views,
        }
        if question:
            vqa = m.for_task("vqa")
            out["answer"] = vqa.answer(vqa.prepare(image), question, keep_ratio=ratio)[0]
        cap = m.for_task("caption")
        out["caption"] = cap.caption(cap.prepare(image), keep_ratio=ratio)[0]
        out["timing_ms"] = self._timing(
            base, prep, question or (phrases[0] if phrases else "a picture"), ratio
        )
        return out

    def _timing(self, p: Predictor, prep: Any, text: str, ratio: float) -> dict[str, float]:
        """Median time of the text-aware encoder pass (ViT with selection + text + fusion) for this
        image at ``ratio`` and unpruned, on this server's device."""
        import torch

        from copa.export import timed

        ids, mask = p.tokenizer([text])
        ids, mask = ids.to(p.device), mask.to(p.device)

        def run() -> None:
            p.model(prep.pixels, ids, mask)
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)

        res = {}
        for name, r in (("chosen", ratio), ("unpruned", 1.0)):
            with p.inference(r):
                res[name] = round(1000 * timed(run, self.options.timing_runs, warmup=1), 2)
        res["speedup"] = round(res["unpruned"] / max(res["chosen"], 1e-9), 2)
        return res


def create_app(models: TaskModels, options: ServeOptions | None = None) -> Any:
    """The FastAPI application (``uvicorn.run(app, host=..., port=...)``)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    service = Service(models, options or ServeOptions())
    app = FastAPI(title="COPA", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # never a crash, never a trace
        log.exception("error serving %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return service.info()

    @app.get("/examples/{name}")
    async def example(name: str) -> Any:
        if name not in service.examples:
            return error(404, f"no example called {name!r}")
        return FileResponse(service.examples[name])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        limit = service.options.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
            return error(413, f"the request is {int(declared):,} bytes; uploads are limited to {limit:,}")
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=limit + 1)
        except Exception as e:  # noqa: BLE001 - malformed multipart, a part over the limit: the client's
            status = getattr(e, "status_code", 400)
            return error(413 if status == 413 else 400, f"cannot read the form: {getattr(e, 'detail', e)}")
        try:
            upload = form.get("image")
            data = await upload.read(limit + 1) if upload is not None and hasattr(upload, "read") else None
            ratio_raw = str(form.get("keep_ratio") or "").strip()
            try:
                ratio = float(ratio_raw) if ratio_raw else None
            except ValueError:
                raise BadRequest(f"keep_ratio {ratio_raw!r} is not a number") from None
            image, source = service.image_bytes(data, str(form.get("example") or "") or None)
            phrases = [str(form.get(k) or "").strip() for k in ("phrase", "phrase2")]
            result = await run_in_threadpool(
                service.predict,
                image,
                source,
                str(form.get("question") or "").strip(),
                [p for p in phrases if p],
                ratio,
            )
        except BadRequest as e:
            return error(e.status, str(e))
        finally:
            await form.close()
        return JSONResponse(result)

    return app


def wait_until_up(url: str, timeout: float = 60.0) -> bool:
    """Poll ``url`` until it answers (for tests and scripts)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.2)
    return False
