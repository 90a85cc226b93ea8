"""``copa serve``: started on a free local port and driven over HTTP; bad uploads get a 4xx JSON
answer and the server keeps serving. The browser screenshot test is marked slow."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import scene_png

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(
    url: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]] | None = None
) -> tuple[int, dict]:
    body, ctype = multipart(fields, files or {})
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(micro_ckpt, tmp_path_factory):
    """`copa serve` in its own process on a free port, on a demo-like layout with an example. The
    pre-trained model's TPD is bilinear (``p_i . q``), so even random weights keep different patches
    for different phrases; the fine-tuned grounding model is the plain micro one."""
    import torch

    from copa.model.copa import COPAModel
    from copa.serve.app import wait_until_up
    from tests.conftest import micro_config

    d = tmp_path_factory.mktemp("serve")
    demo = d / "demo"
    torch.manual_seed(1)
    COPAModel(micro_config("model.select.tpd_form=bilinear").model).save_pretrained(
        demo / "pretrain" / "model"
    )
    shutil.copytree(micro_ckpt, demo / "tasks" / "grounding" / "model")
    (demo / "data" / "images" / "test").mkdir(parents=True)
    scene_png(demo / "data" / "images" / "test" / "000000.png", (64, 64), 0)
    port = free_port()
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "copa",
            "serve",
            "--ckpt",
            str(demo),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-upload-mb",
            "0.05",
            "--max-megapixels",
            "0.25",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(url + "/healthz", timeout=300):
            proc.kill()
            pytest.fail("server did not start:\n" + (d / "server.log").read_text()[-3000:])
        yield url, proc, d
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _png(size=(48, 40), seed=0) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_info_and_example(server):
    url, _, _ = server
    status, page = get(url + "/")
    assert status == 200 and b"COPA" in page and b"api/predict" in page
    status, raw = get(url + "/api/info")
    info = json.loads(raw)
    assert info["examples"] == ["000000.png"] and info["models"]["grounding"]["checkpoint"].endswith("model")
    assert info["limits"]["max_upload_bytes"] == int(0.05 * 2**20)
    status, img = get(url + "/examples/000000.png")
    assert status == 200 and img.startswith(b"\x89PNG")
    assert get(url + "/examples/../../etc/passwd")[0] == 404


def test_predict_an_upload_and_an_example(server):
    url, _, _ = server
    status, res = post(
        url + "/api/predict",
        {
            "question": "what color is the circle?",
            "phrase": "the red circle",
            "phrase2": "the blue square",
            "keep_ratio": "0.25",
        },
        {"image": ("mine.png", _png((60, 44)))},
    )
    assert status == 200, res
    assert (res["width"], res["height"], res["keep_ratio"]) == (60, 44, 0.25)
    assert [v["text"] for v in res["views"]][:2] == ["the red circle", "the blue square"]
    assert all(v["num_kept"] == 4 and v["overlay"].startswith("data:image/png;base64,") for v in res["views"])
    x0, y0, x1, y1 = res["views"][0]["box"]["box_xyxy"]
    assert 0 <= x0 <= x1 <= 60 and 0 <= y0 <= y1 <= 44
    assert isinstance(res["answer"], str) and isinstance(res["caption"], str)
    assert res["timing_ms"]["chosen"] > 0 and res["timing_ms"]["unpruned"] > 0
    status, res = post(url + "/api/predict", {"example": "000000.png", "phrase": "a star"})
    assert status == 200 and res["source"] == "000000.png" and "answer" not in res


@pytest.mark.parametrize(
    "case",
    [
        "not an image",
        "truncated",
        "too large",
        "too many pixels",
        "no image",
        "unknown example",
        "bad keep ratio",
        "keep ratio 0",
        "long text",
        "garbage body",
    ],
)
def test_bad_uploads_are_4xx_and_the_server_lives_on(server, case):
    url, proc, _ = server
    png = _png((40, 40))
    fields, files = {"phrase": "x"}, {"image": ("x.png", png)}
    if case == "not an image":
        files = {"image": ("x.png", b"hello, I am text")}
    elif case == "truncated":
        files = {"image": ("x.png", png[: len(png) // 2])}
    elif case == "too large":
        files = {"image": ("x.png", png + b"\0" * 60_000)}
    elif case == "too many pixels":
        buf = io.BytesIO()
        Image.new("RGB", (600, 600)).save(buf, format="PNG")  # small file, 360k pixels > 250k
        files = {"image": ("x.png", buf.getvalue())}
    elif case == "no image":
        files = {}
    elif case == "unknown example":
        files, fields = {}, {"example": "nope.png"}
    elif case == "bad keep ratio":
        fields = {"keep_ratio": "lots"}
    elif case == "keep ratio 0":
        fields = {"keep_ratio": "0"}
    elif case == "long text":
        fields = {"phrase": "x" * 1000}
    if case == "garbage body":
        req = urllib.request.Request(
            url + "/api/predict",
            data=b"\x00\x01garbage",
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
            method="POST",
        )
        try:
            urllib.request.urlopen(req, timeout=60)
            status = 200
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read())
    else:
        status, body = post(url + "/api/predict", fields, files)
    assert 400 <= status < 500 and body["error"], (status, body)
    assert proc.poll() is None and get(url + "/healthz")[0] == 200


def test_binds_localhost_by_default():
    from copa.cli import build_parser

    args = build_parser().parse_args(["serve", "--ckpt", "x"])
    assert args.host == "127.0.0.1"


@pytest.mark.slow
def test_browser_shows_kept_patches_for_two_phrases(server, tmp_path):
    """Headless Chromium renders the page, runs it for two phrases, and the screenshot shows two
    different overlays."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium)")
    url, _, _ = server
    phrases = {"phrase": "the red circle", "phrase2": "the blue square"}
    status, res = post(url + "/api/predict", {"example": "000000.png", **phrases})
    assert status == 200 and set(res["views"][0]["kept"]) != set(res["views"][1]["kept"])
    shot = tmp_path / "page.png"
    page = (
        f"{url}/?example=000000.png&phrase=the%20red%20circle&phrase2=the%20blue%20square&question=what&run=1"
    )
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,1100",
            "--virtual-time-budget=60000",
            f"--screenshot={shot}",
            page,
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1100, 1200)
    # the results area (right of the form) holds the overlays: far from a blank page
    right = img[80:420, 360:1200]
    assert right.std() > 20
    # the overlays of the two phrases (the first two 260-px figures, 288 px apart) differ
    a, b = img[90:340, 371:621], img[90:340, 659:909]
    assert np.abs(a - b).mean() > 1.0
    shutil.copy(shot, tmp_path.parent / "copa_serve_screenshot.png")  # to look at after a run
