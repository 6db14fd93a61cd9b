"""The web API without a browser: uploads of every format, bad input of every kind, streamed chat, history."""

from __future__ import annotations

import io
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file

from medgym.agents import studies, web
from medgym.agents.graph import AgentContext
from medgym.agents.local_server import serve_in_thread
from medgym.agents.studies import ERR_NOT_IMAGE


@pytest.fixture
def client(tmp_path):
    app = web.create_app(tmp_path / "chat.sqlite", tmp_path / "data", context=AgentContext(backend="expert"))
    with TestClient(app, base_url="http://127.0.0.1") as c:  # the server answers to loopback names only
        yield c


def png_bytes(size=(64, 48), mode="L") -> bytes:
    img = Image.new(mode, size)
    if mode == "L":
        arr = np.zeros(size[::-1], np.uint8)
        arr[10:30, 20:40] = 200
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def upload(client, data: bytes, name: str):
    return client.post("/api/upload", files={"file": (name, data, "application/octet-stream")})


def events(response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_png_upload_chat_follow_up_and_history(client):
    r = upload(client, png_bytes(), "scan.png")
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["width"], info["height"], info["modality"]) == (64, 48, "OT")
    assert client.get(f"/api/images/{info['preview']}.png").headers["content-type"] == "image/png"
    r = client.post("/api/chat", json={"upload_id": info["upload_id"], "question": "How big is it?"})
    evs = events(r)
    session = evs[0]["session_id"]
    kinds = [e["kind"] for e in evs]
    assert kinds[0] == "session" and kinds[1] == "question" and kinds[-2:] == ["result", "done"]
    assert [e["name"] for e in evs if e["kind"] == "tool"] == ["zoom", "window", "segment", "measure"]
    assert evs[-1]["status"] == "answered" and evs[-1]["overlay"]
    r = client.post("/api/chat", json={"session_id": session, "question": "And again?", "reliability_n": 2})
    assert events(r)[-1]["reliability"]["n"] == 2
    history = client.get(f"/api/sessions/{session}").json()["messages"]
    assert sum(m.get("kind") == "question" for m in history) == 2
    assert session in client.get("/api/sessions").json()["sessions"]


def _nifti_upload(client, tmp_path):
    vol = np.zeros((20, 24, 6), np.float32)
    vol[5:10, 5:10, 2:4] = 100
    img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0]))
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    r = upload(client, path.read_bytes(), "v.nii.gz")
    assert r.status_code == 200, r.text
    assert r.json()["slices"] == 6 and r.json()["width"] == 20


def test_dicom_and_nifti_uploads_load(client, tmp_path, monkeypatch):
    r = upload(client, open(get_testdata_file("CT_small.dcm"), "rb").read(), "ct.dcm")
    assert r.status_code == 200, r.text
    assert r.json()["modality"] == "CT"
    # MONAI's first NIfTI read costs ~20 s of imports: the fast test reads NIfTI with the plain fallback
    monkeypatch.setattr(studies, "_via_realdata", lambda data, suffix: None)
    _nifti_upload(client, tmp_path)


@pytest.mark.slow
def test_nifti_upload_through_the_realdata_loader(client, tmp_path):
    _nifti_upload(client, tmp_path)


def test_file_over_the_size_limit_is_refused_with_413(client, monkeypatch):
    monkeypatch.setattr(studies, "MAX_UPLOAD_BYTES", 1000)
    monkeypatch.setattr(web, "MAX_UPLOAD_BYTES", 1000)
    r = upload(client, b"\x89PNG" + b"0" * 5000, "big.png")
    assert r.status_code == 413
    assert r.json()["error"].startswith("The file is ") and "limit is 1000 bytes" in r.json()["error"]


def test_not_an_image_is_refused(client):
    r = upload(client, b"hello, this is a text file", "notes.png")
    assert r.status_code == 400
    assert r.json()["error"] == ERR_NOT_IMAGE.format(details="UnidentifiedImageError")
    assert upload(client, b"", "empty.png").json()["error"] == studies.ERR_EMPTY


def test_corrupt_dicom_is_refused(client):
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    r = upload(client, data[: len(data) // 3], "cut.dcm")  # pixel data cut short
    assert r.status_code == 400 and r.json()["error"].startswith("The DICOM file could not be read")
    r = upload(client, b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 10, "junk.dcm")
    assert r.status_code == 400 and r.json()["error"].startswith("The DICOM file could not be read")


def test_absurd_dimensions_are_refused(client, tmp_path):
    r = upload(client, png_bytes(size=(9000, 4), mode="1"), "wide.png")
    assert r.status_code == 413 and "more than 8192 pixels on a side" in r.json()["error"]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = 20000
    buf = io.BytesIO()
    ds.save_as(buf)
    r = upload(client, buf.getvalue(), "huge.dcm")
    assert r.status_code == 413 and "20000" in r.json()["error"]
    header = nib.Nifti1Header()
    header.set_data_shape((600, 600, 600))  # 216M voxels, declared by a header-only file
    header.set_data_dtype(np.uint8)
    r = upload(client, header.binaryblock + b"\0" * 4, "huge.nii")
    assert r.status_code == 413 and "600 x 600 x 600" in r.json()["error"]


def test_ids_outside_their_folders_are_refused(client, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    for name in ("..%2F..%2Fsecret.png", "%2e%2e%2fsecret", "a" * 64 + "/../x.png"):
        r = client.get(f"/api/images/{name}")
        assert r.status_code == 404
    r = client.post("/api/chat", json={"upload_id": "../../secret", "question": "hi"})
    assert r.status_code == 404 and "32 hexadecimal" in r.json()["error"]
    r = client.post("/api/chat", json={"upload_id": "0" * 32, "question": "hi"})
    assert r.status_code == 404 and "Upload the image again" in r.json()["error"]
    r = client.post("/api/chat", json={"session_id": "../chat", "question": "hi"})
    assert r.status_code == 404
    r = client.get("/api/sessions/" + "f" * 32)
    assert r.status_code == 404
    r = client.post("/api/chat", json={"question": "hi"})
    assert r.status_code == 400 and "upload one first" in r.json()["error"]
    r = client.post("/api/chat", json={"question": "x" * 5000, "case_seed": 1})
    assert r.status_code == 422
    r = client.get("/static/../graph.py")
    assert r.status_code == 404


def test_phantom_session_with_the_expert(client):
    r = client.post("/api/chat", json={"case_seed": 3, "question": ""})
    evs = events(r)
    assert evs[-1]["status"] == "answered"
    assert all(e.get("model_id") == "expert" for e in evs if e["kind"] == "turn")


def test_chat_streams_each_step_as_it_happens(tmp_path):
    """Events leave the server when they are made, not at the end of the run."""
    import time

    import httpx

    class Slow:
        model_id = "slow"

        def next_turn(self, messages, *, temperature=0.0):
            time.sleep(0.8)
            if any(m["role"] == "tool" for m in messages):
                return "<answer>done</answer>"
            return '<tool_call>{"name": "zoom", "arguments": {"boxes": [[10, 10, 60, 60]]}}</tool_call>'

    app = web.create_app(tmp_path / "c.sqlite", tmp_path / "data", context=AgentContext(backend=Slow()))
    with serve_in_thread(app) as base:
        arrivals = {}
        start = time.perf_counter()
        with httpx.stream("POST", f"{base}/api/chat", json={"case_seed": 1, "question": "q?"}, timeout=60) as r:
            for line in r.iter_lines():
                if line.strip():
                    arrivals.setdefault(json.loads(line)["kind"], time.perf_counter() - start)
    # each model turn sleeps 0.8 s: the events before it arrived that much earlier than those after it
    assert arrivals["question"] < arrivals["turn"] < arrivals["tool"] < arrivals["result"]
    assert arrivals["turn"] - arrivals["question"] >= 0.7 and arrivals["result"] - arrivals["tool"] >= 0.7


# The default backend: the embedded policy, constrained; an honest note on uploads ------------------------


def test_the_default_app_runs_the_embedded_policy_under_the_grammar(tmp_path):
    app = web.create_app(tmp_path / "c.sqlite", tmp_path / "data")
    context = app.state.agent.context
    assert context.backend == "embedded" and context.backend_options == {"constrained": True}


def test_the_note_is_for_the_embedded_policy_on_uploads_only():
    from medgym.agents.backends import DemoBackend
    from medgym.agents.session import OUT_OF_DOMAIN_NOTE, out_of_domain_note

    upload_ref, phantom_ref = {"kind": "upload", "id": "0" * 32}, {"kind": "phantom", "seed": 1}
    for spec in ("embedded", "embedded-sft", "embedded:/some/checkpoint"):
        assert out_of_domain_note(upload_ref, spec) == OUT_OF_DOMAIN_NOTE
        assert out_of_domain_note(phantom_ref, spec) is None
    for other in ("demo", "expert", "openai:qwen@http://127.0.0.1:8000/v1", DemoBackend()):
        assert out_of_domain_note(upload_ref, other) is None
    assert "--backend openai:MODEL@URL" in OUT_OF_DOMAIN_NOTE


@pytest.mark.slow
def test_an_upload_gets_the_out_of_domain_note_and_the_model_turn_stays_raw(tmp_path):
    from medgym.agents.backends import EmbeddedBackend
    from medgym.agents.session import OUT_OF_DOMAIN_NOTE
    from medgym.environments.parsing import parse_action

    backend = EmbeddedBackend(constrained=True)
    context = AgentContext(backend=backend, max_steps=1, segmenter="threshold")
    app = web.create_app(tmp_path / "c.sqlite", tmp_path / "data", context=context)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        info = upload(client, open(get_testdata_file("CT_small.dcm"), "rb").read(), "ct.dcm").json()
        evs = events(client.post("/api/chat", json={"upload_id": info["upload_id"], "question": "Is there a lesion?"}))
        kinds = [e["kind"] for e in evs]
        assert kinds[-3:] == ["result", "note", "done"] and "format_error" not in kinds
        assert evs[-2]["content"] == OUT_OF_DOMAIN_NOTE and evs[-1]["note"] == OUT_OF_DOMAIN_NOTE
        (turn,) = [e for e in evs if e["kind"] == "turn"]
        assert parse_action(turn["content"]).error is None and OUT_OF_DOMAIN_NOTE not in turn["content"]
        # saved: the history shows it after the result; the trace keeps the model's turn as it was
        history = client.get(f"/api/sessions/{evs[0]['session_id']}").json()["messages"]
        assert [m["kind"] for m in history][-2:] == ["result", "note"]
        trace = (tmp_path / "data" / "traces.jsonl").read_text()
        assert OUT_OF_DOMAIN_NOTE not in trace and json.dumps(turn["content"])[1:-1] in trace
        # a phantom case is the policy's own domain: no note
        evs = events(client.post("/api/chat", json={"case_seed": 2, "question": ""}))
        assert "note" not in [e["kind"] for e in evs] and evs[-1]["note"] is None
