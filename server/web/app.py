"""The case-lookup page (`xmodal web`): a small web app that is a client of the gRPC API like
any other frontend. It holds a SearchClient, never a data directory.

The page (one Jinja2 template, one vanilla JS file, one CSS file; nothing from a CDN) uses
this JSON API; every error is ``{"error": MESSAGE}`` with a 4xx status (5xx only when the
gRPC server is unreachable, 502/503/504, or for a fault of the web app itself, whose
details stay in its log). POSTs must carry the header ``X-Xmodal: 1`` (the page's fetch
sets it; a cross-site form cannot), so another site cannot search or send feedback through
a browser with this app's API key.

- ``GET /``: the page; its filter inputs come from GetStatus ``filter_fields``.
- ``GET /api/status``: ``{serving, snapshot_id, head_kind, version, counts, max_k,
  feedback_total, filter_fields: [{name, kind: number|text, declared}], window_presets:
  [{name, width, centre, window}]}`` (OHIF's presets; ``window`` is the value to send).
- ``POST /api/search`` (multipart): the query, ``text`` or ``file`` (JPEG, PNG, DICOM...),
  with ``box`` (``x0,y0,x1,y1`` as fractions of the rendered image's width and height: the
  region is cropped and sent as a PNG; without it the uploaded bytes go unchanged) and
  ``window`` (a DICOM window to render with before cropping: a preset name of
  xmodal.indexer.dicom or ``centre,width``); ``target`` (``image``, ``text`` or empty for the other modality),
  ``k``, ``where`` (JSON ``{field: [values...]}`` for one-of, ``{field: {"min": a, "max":
  b}}`` for an inclusive range, numbers for number fields). Answers ``{snapshot_id,
  timing, hits: [{rank, item_id, modality, score, text, caption, source, metadata,
  thumbnail}]}``; ``thumbnail`` is the image URL of an image hit, else null.
- ``GET /api/items/{id}``: ``{item_id, modality, text, caption, source, metadata, dicom}``
  (``dicom``: the stored image is DICOM, so window presets apply); no bytes, no header values.
- ``GET /api/items/{id}/image?size=192&window=C,W``: the item's image as a PNG at most
  ``size`` pixels on its long side (32..1024); DICOM rendered with ``window``.
- ``POST /api/preview`` (multipart ``file``, ``window``): the upload rendered as a PNG (DICOM
  through xmodal.indexer.dicom); header ``X-Xmodal-Dicom: 1`` when it is DICOM.
- ``POST /api/feedback`` (multipart): the query fields of /api/search and ``relevant`` (an
  item id): SubmitFeedback with source ``web``; answers ``{feedback_id}``.

Uploaded bytes and query texts are never logged.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image
from starlette.exceptions import HTTPException

from xmodal.client import SearchClient
from xmodal.client import XmodalError as ClientError
from xmodal.indexer.dicom import is_dicom, parse_window
from xmodal.indexer.dicom import render as render_dicom
from xmodal.indexer.errors import InvalidArgument, ResourceExhausted, XmodalError
from xmodal.indexer.images import decode_image

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
THUMBNAIL_SIZE = 192
K_CHOICES = (5, 10, 20, 50)
# metadata fields shown as an image hit's caption, the first present
CAPTION_FIELDS = ("caption", "diagnosis", "findings", "impression", "description", "label")
# OHIF's window presets: (name, width, level), level being the window's centre
OHIF_PRESETS = (
    ("soft tissue", 400, 40),
    ("lung", 1500, -600),
    ("liver", 150, 90),
    ("bone", 2500, 480),
    ("brain", 80, 40),
)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 413,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


# -- images: DICOM through xmodal.indexer.dicom, everything else through decode_image ----------
def window_presets() -> list[dict[str, Any]]:
    """The window preset buttons: OHIF's, each sent as ``centre,width`` (what parse_window reads)."""
    return [
        {"name": name, "width": width, "centre": centre, "window": f"{centre},{width}"}
        for name, width, centre in OHIF_PRESETS
    ]


def render(data: bytes, window: str = "") -> Image.Image:
    """Encoded bytes as an 8-bit RGB image: DICOM rendered with ``window`` (a preset name or
    ``centre,width``; empty: the file's own), anything else decoded.

    Raises:
        InvalidArgument: an unknown window, or bytes that are not an image.
    """
    if is_dicom(data):
        return render_dicom(data, window=parse_window(window) if window.strip() else None)
    return decode_image(data)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """``x0,y0,x1,y1`` fractions of width and height (empty: no box).

    Raises:
        InvalidArgument: not four numbers with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1.
    """
    if not text.strip():
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidArgument(f"box {text[:60]!r}: write x0,y0,x1,y1 as fractions of width and height") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InvalidArgument(f"box {text[:60]!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    width, height = image.size
    left, top = round(box[0] * width), round(box[1] * height)
    right, bottom = max(round(box[2] * width), left + 1), max(round(box[3] * height), top + 1)
    if right - left < 4 or bottom - top < 4:
        raise InvalidArgument(f"the box is {right - left}x{bottom - top} pixels: draw a region of at least 4x4")
    return image.crop((left, top, right, bottom))


# -- requests ----------------------------------------------------------------------------------
def _read_upload(file: UploadFile | None) -> bytes | None:
    if file is None:
        return None
    data = file.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ResourceExhausted(f"the file is over the web app's limit of {MAX_UPLOAD_BYTES // 2**20} MiB")
    if not data:
        raise InvalidArgument("the file is empty: drop a JPEG, PNG or DICOM image")
    return data


def _query(text: str, file: UploadFile | None, box: str, window: str) -> dict[str, Any]:
    """The client's query keyword (``text=`` or ``image=``) from the form fields: a region of
    the image is cropped from its rendering and sent as PNG; a whole image goes unchanged."""
    data = _read_upload(file)
    if data is not None and text.strip():
        raise InvalidArgument("give a description or an image, not both")
    if data is None:
        if not text.strip():
            raise InvalidArgument("type a description or drop an image to search with")
        return {"text": text}
    region = parse_box(box)
    if region is None:
        return {"image": data}
    return {"image": png(crop(render(data, window), region))}


def _where(text: str) -> dict[str, object] | None:
    """The page's filter JSON as SearchClient.search's ``where``."""
    if not text.strip():
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidArgument("filters are not valid JSON") from None
    if not isinstance(raw, dict):
        raise InvalidArgument('filters must be a JSON object like {"field": ["a", "b"]}')
    where: dict[str, object] = {}
    for name, condition in raw.items():
        if isinstance(condition, dict):
            unknown = set(condition) - {"min", "max"}
            if unknown:
                raise InvalidArgument(f"filter {name!r}: a range has min and max, not {sorted(unknown)}")
            where[name] = (condition.get("min"), condition.get("max"))
        elif isinstance(condition, list):
            where[name] = condition
        else:
            raise InvalidArgument(f"filter {name!r}: give a list of values or {{min, max}}")
    return where


def _k(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"k must be a whole number, got {text[:20]!r}") from None


def _caption(modality: str, text: str, metadata: dict) -> str:
    if modality == "text":
        return text
    return next((str(metadata[f]) for f in CAPTION_FIELDS if metadata.get(f) not in (None, "")), "")


def _image_url(item_id: str, size: int = THUMBNAIL_SIZE) -> str:
    from urllib.parse import quote

    return f"/api/items/{quote(item_id, safe='')}/image?size={size}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


Text = Annotated[str, Form()]
Upload = Annotated[UploadFile | None, File()]


# -- the app -----------------------------------------------------------------------------------
def create_app(client: SearchClient) -> FastAPI:
    """The case-lookup app around ``client`` (which the caller opens and closes)."""
    app = FastAPI(title="xmodal case lookup", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.method == "POST" and request.headers.get("x-xmodal") != "1":
            return _error(403, "POST requests need the header X-Xmodal: 1 (the page sends it)")
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(XmodalError)
    @app.exception_handler(ClientError)
    async def xmodal_error(request: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "code", "INTERNAL")
        return _error(HTTP_STATUS.get(code, 502), str(exc) or code)

    @app.exception_handler(RequestValidationError)
    async def bad_form(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own detail echoes the input; name the field only
        fields = ", ".join(str(e["loc"][-1]) for e in exc.errors())
        return _error(400, f"malformed request: check the field(s) {fields}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return _error(500, "internal error in the web app; see its log")

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        try:
            status, problem = _status(client), ""
        except ClientError as exc:
            status, problem = None, str(exc)
        context = {"status": status, "problem": problem, "k_choices": K_CHOICES, "presets": window_presets()}
        return templates.TemplateResponse(request, "index.html", context)

    @app.get("/api/status")
    def status():
        return _status(client)

    @app.post("/api/search")
    def search(
        text: Text = "",
        file: Upload = None,
        box: Text = "",
        window: Text = "",
        target: Text = "",
        k: Text = "10",
        where: Text = "",
    ):
        query = _query(text, file, box, window)
        result = client.search(**query, target=target or None, k=_k(k), where=_where(where))
        return {
            "snapshot_id": result.snapshot_id,
            "timing": result.timing,
            "hits": [
                {
                    "rank": h.rank,
                    "item_id": h.item_id,
                    "modality": h.modality,
                    "score": h.score,
                    "text": h.text,
                    "caption": _caption(h.modality, h.text, h.metadata),
                    "source": h.source,
                    "metadata": h.metadata,
                    "thumbnail": _image_url(h.item_id) if h.modality == "image" else None,
                }
                for h in result.hits
            ],
        }

    @app.get("/api/items/{item_id:path}/image")
    def item_image(item_id: str, size: int = THUMBNAIL_SIZE, window: str = ""):
        if not 32 <= size <= 1024:
            raise InvalidArgument(f"size must be 32..1024 pixels, got {size}")
        item = client.get_items([item_id])[0]
        if item.modality != "image":
            raise InvalidArgument(f"item {item_id!r} is a {item.modality}, not an image")
        image = render(item.image, window)
        image.thumbnail((size, size))
        return Response(png(image), media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/api/items/{item_id:path}")
    def item(item_id: str):
        found = client.get_items([item_id])[0]
        return {
            "item_id": found.item_id,
            "modality": found.modality,
            "text": found.text,
            "caption": _caption(found.modality, found.text, found.metadata),
            "source": found.source,
            "metadata": found.metadata,
            "dicom": found.modality == "image" and is_dicom(found.image),
        }

    @app.post("/api/preview")
    def preview(file: Annotated[UploadFile, File()], window: Text = ""):
        data = _read_upload(file) or b""
        image = render(data, window)
        headers = {"X-Xmodal-Dicom": "1" if is_dicom(data) else "0", "Cache-Control": "no-store"}
        return Response(png(image), media_type="image/png", headers=headers)

    @app.post("/api/feedback")
    def feedback(relevant: Text, text: Text = "", file: Upload = None, box: Text = "", window: Text = ""):
        if not relevant.strip():
            raise InvalidArgument("relevant: give the id of the matching item")
        query = _query(text, file, box, window)
        return {"feedback_id": client.submit_feedback(**query, relevant=[relevant], source="web")}

    return app


def _status(client: SearchClient) -> dict[str, Any]:
    status = client.status()
    return {
        "serving": status.serving,
        "snapshot_id": status.snapshot_id,
        "head_kind": status.head_kind,
        "version": status.version,
        "counts": status.counts,
        "max_k": status.max_k,
        "feedback_total": status.feedback_total,
        "filter_fields": [
            {"name": f.name, "kind": f.kind, "declared": f.declared} for f in getattr(status.raw, "filter_fields", ())
        ],
        "window_presets": window_presets(),
    }
