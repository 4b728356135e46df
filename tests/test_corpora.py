"""Corpora: ingestion of text, Markdown, HTML and PDF; refusals; tenant isolation; chunking;
BM25 retrieval on a small corpus with known answers; the search route."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import auth

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"

PHOTOSYNTHESIS = [
    ["Photosynthesis in green plants",
     "Photosynthesis is the process by which plants, algae and some bacteria turn the",
     "energy of sunlight into chemical energy. It takes place in the chloroplasts of leaf",
     "cells, which contain the green pigment chlorophyll. Chlorophyll absorbs red and blue",
     "light strongly and reflects green light, which is why leaves look green."],
    ["In the light reactions, absorbed light splits water molecules, releasing oxygen",
     "as a by-product and storing energy in ATP and NADPH. In the Calvin cycle, the enzyme",
     "RuBisCO fixes carbon dioxide from the air, and the stored energy is used to build",
     "glucose. Almost all the oxygen in the atmosphere was made by photosynthesis."],
]


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A small, valid PDF with one line of Helvetica text per string (written by hand, so
    that the tests need no PDF-writing library)."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects: list[bytes] = []
    n_pages = len(pages)
    font_ref = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, lines in enumerate(pages):
        ops = "BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(f"({esc(line)}) Tj T*"
                                                          for line in lines) + " ET"
        stream = ops.encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Contents {4 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 {font_ref} 0 R >> >> >>".encode())
        objects.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream
                       + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
                   b"/Encoding /WinAnsiEncoding >>")
    info_ref = None
    if title is not None:
        objects.append(f"<< /Title ({esc(title)}) >>".encode("latin-1"))
        info_ref = len(objects)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    trailer = f"<< /Size {len(objects) + 1} /Root 1 0 R"
    if info_ref is not None:
        trailer += f" /Info {info_ref} 0 R"
    out += f"trailer\n{trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def new_key(name: str = "corpus") -> str:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, f"{name}-{secrets.token_hex(4)}")
    return raw


def create_corpus(client: TestClient, key: str, name: str = "Notes") -> str:
    resp = client.post("/v1/corpora", json={"name": name}, headers=auth(key))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def upload(client: TestClient, key: str, corpus_id: str, filename: str, data: bytes,
           content_type: str = "application/octet-stream", **form: str) -> Any:
    return client.post(f"/v1/corpora/{corpus_id}/documents", headers=auth(key),
                       files={"file": (filename, data, content_type)}, data=form)


def upload_raw(client: TestClient, key: str, corpus_id: str, data: bytes, content_type: str,
               **params: str) -> Any:
    return client.post(f"/v1/corpora/{corpus_id}/documents", params=params, content=data,
                       headers={**auth(key), "Content-Type": content_type})


def chunk_texts(document_id: str) -> list[str]:
    from sqlalchemy import select

    from core.db import transaction
    from core.models import CorpusChunk

    with transaction() as s:
        return list(s.scalars(select(CorpusChunk.text).where(
            CorpusChunk.document_id == document_id).order_by(CorpusChunk.ordinal)))


@pytest.fixture
def corpus_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Lets a test change AGENTQ_CORPUS_* settings; they are read again after it."""
    from core.settings import get_settings

    get_settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


# --- Corpora -----------------------------------------------------------------------------------


def test_corpora_need_a_key(client: TestClient) -> None:
    for method, path in [("GET", "/v1/corpora"), ("POST", "/v1/corpora"),
                         ("GET", "/v1/corpora/cor_x"), ("DELETE", "/v1/corpora/cor_x"),
                         ("POST", "/v1/corpora/cor_x/documents"),
                         ("GET", "/v1/corpora/cor_x/search?q=bees")]:
        resp = client.request(method, path)
        assert resp.status_code == 401, (method, path)


def test_create_list_and_read_a_corpus(client: TestClient, tenant_key: str) -> None:
    resp = client.post("/v1/corpora", json={"name": "Pollinators", "description": "Bees"},
                       headers=auth(tenant_key))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["id"].startswith("cor_")
    assert resp.headers["location"] == f"/v1/corpora/{body['id']}"
    assert (body["name"], body["description"]) == ("Pollinators", "Bees")
    assert (body["document_count"], body["chunk_count"]) == (0, 0)
    got = client.get(resp.headers["location"], headers=auth(tenant_key)).json()
    assert got["documents"] == []
    assert got["name"] == "Pollinators"
    second = create_corpus(client, tenant_key, "Second")
    listed = client.get("/v1/corpora?limit=1", headers=auth(tenant_key)).json()
    assert [c["id"] for c in listed["data"]] == [second]
    rest = client.get(f"/v1/corpora?limit=1&cursor={listed['next_cursor']}",
                      headers=auth(tenant_key)).json()
    assert [c["id"] for c in rest["data"]] == [body["id"]]
    assert rest["next_cursor"] is None
    assert client.get("/v1/corpora?cursor=nonsense", headers=auth(tenant_key)
                      ).status_code == 422
    for bad in ({"name": ""}, {"name": "x\x00y"}, {"name": "ok", "extra": 1}, {}):
        assert client.post("/v1/corpora", json=bad, headers=auth(tenant_key)
                           ).status_code == 422, bad


# --- Ingestion ---------------------------------------------------------------------------------


def test_ingests_every_accepted_format(client: TestClient, tenant_key: str) -> None:
    cid = create_corpus(client, tenant_key)
    docs: dict[str, dict[str, Any]] = {}

    # Plain text, uploaded as a multipart file with its own media type.
    resp = upload(client, tenant_key, cid, "honey_bees.txt",
                  (FIXTURES / "honey_bees.txt").read_bytes(), "text/plain")
    assert resp.status_code == 201, resp.text
    docs["txt"] = resp.json()
    assert docs["txt"]["content_type"] == "text/plain"
    assert docs["txt"]["title"] == "How honey bees make honey"
    assert docs["txt"]["id"].startswith("doc_")
    assert resp.headers["location"] == f"/v1/corpora/{cid}"

    # Markdown, as a raw body with its Content-Type; the title comes from its first heading.
    resp = upload_raw(client, tenant_key, cid, (FIXTURES / "volcanoes.md").read_bytes(),
                      "text/markdown; charset=utf-8")
    assert resp.status_code == 201, resp.text
    docs["md"] = resp.json()
    assert docs["md"]["content_type"] == "text/markdown"
    assert docs["md"]["title"] == "Volcanoes and how they erupt"

    # HTML sent as application/octet-stream: the extension tells the type.
    resp = upload(client, tenant_key, cid, "roman_aqueducts.html",
                  (FIXTURES / "roman_aqueducts.html").read_bytes())
    assert resp.status_code == 201, resp.text
    docs["html"] = resp.json()
    assert docs["html"]["content_type"] == "text/html"
    assert docs["html"]["title"] == "Roman aqueducts: how Rome brought water to its cities"

    # PDF, as a raw body; the title comes from the document information.
    pdf = make_pdf(PHOTOSYNTHESIS, title="Photosynthesis")
    resp = upload_raw(client, tenant_key, cid, pdf, "application/pdf", filename="leaf.pdf")
    assert resp.status_code == 201, resp.text
    docs["pdf"] = resp.json()
    assert docs["pdf"]["content_type"] == "application/pdf"
    assert (docs["pdf"]["title"], docs["pdf"]["filename"]) == ("Photosynthesis", "leaf.pdf")
    assert docs["pdf"]["size_bytes"] == len(pdf)

    # A title given with the upload wins.
    resp = upload(client, tenant_key, cid, "tides.txt", (FIXTURES / "tides.txt").read_bytes(),
                  "text/plain", title="Tides")
    assert resp.status_code == 201, resp.text
    assert resp.json()["title"] == "Tides"

    for doc in docs.values():
        assert doc["chunk_count"] >= 1
        assert doc["char_count"] > 300
    txt = "\n".join(chunk_texts(docs["txt"]["id"]))
    assert "waggle dance" in txt
    assert "invertase" in txt
    md = "\n".join(chunk_texts(docs["md"]["id"]))
    assert "Mount St. Helens erupted on 18 May 1980" in md
    assert "tectonic plates" in md
    for markup in ("**", "](", "](https", "# ", "`", "topic: geology", "| ---"):
        assert markup not in md, markup
    html = "\n".join(chunk_texts(docs["html"]["id"]))
    assert "Pont du Gard" in html
    assert "castellum" in html
    assert "The Romans built aqueducts to carry fresh water" in html
    noise = re.findall(r"[A-Z]+NOISE|tracking|font-family|Accept", html)
    assert noise == [], noise
    assert "<" not in html
    assert ">" not in html
    pdf_text = "\n".join(chunk_texts(docs["pdf"]["id"]))
    assert "chlorophyll" in pdf_text
    assert "Calvin cycle" in pdf_text

    detail = client.get(f"/v1/corpora/{cid}", headers=auth(tenant_key)).json()
    assert detail["document_count"] == 5
    assert detail["chunk_count"] == sum(d["chunk_count"] for d in detail["documents"])
    assert [d["id"] for d in detail["documents"]][:4] == [docs[k]["id"] for k in
                                                           ("txt", "md", "html", "pdf")]

    # Each format is searchable by words only it holds.
    for query, key in [("waggle dance", "txt"), ("pyroclastic flows", "md"),
                       ("Pont du Gard", "html"), ("chlorophyll pigment", "pdf")]:
        hits = client.get(f"/v1/corpora/{cid}/search", params={"q": query},
                          headers=auth(tenant_key)).json()["data"]
        assert hits, query
        assert hits[0]["document_id"] == docs[key]["id"], (query, hits)


def test_text_encodings(client: TestClient, tenant_key: str) -> None:
    cid = create_corpus(client, tenant_key)
    latin = "Crème brûlée is a custard dessert with a burnt sugar crust.".encode("latin-1")
    refused = upload_raw(client, tenant_key, cid, latin, "text/plain")
    assert refused.status_code == 422
    assert "UTF-8" in refused.json()["error"]["message"]
    ok = upload_raw(client, tenant_key, cid, latin, "text/plain; charset=latin-1")
    assert ok.status_code == 201, ok.text
    assert "Crème brûlée" in chunk_texts(ok.json()["id"])[0]
    bad_charset = upload_raw(client, tenant_key, cid, b"x", "text/plain; charset=klingon")
    assert bad_charset.status_code == 422
    # Markdown sent as text/plain keeps its extension's meaning.
    md = upload(client, tenant_key, cid, "notes.md", b"# Heading\n\nSome **bold** words here.",
                "text/plain")
    assert md.status_code == 201, md.text
    assert md.json()["content_type"] == "text/markdown"


def test_refuses_other_types_and_broken_documents(client: TestClient, tenant_key: str,
                                                  corpus_limits: pytest.MonkeyPatch) -> None:
    cid = create_corpus(client, tenant_key)
    png = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(64)

    resp = upload(client, tenant_key, cid, "photo.png", png, "image/png")
    assert resp.status_code == 415
    error = resp.json()["error"]
    assert error["code"] == "unsupported_media_type"
    for accepted in ("text/plain", "text/markdown", "text/html", "application/pdf"):
        assert accepted in error["message"]
    assert upload_raw(client, tenant_key, cid, png, "image/png").status_code == 415
    # Nothing to tell the type by.
    assert upload(client, tenant_key, cid, "blob", b"some bytes").status_code == 415
    assert upload_raw(client, tenant_key, cid, b"some bytes",
                      "application/octet-stream").status_code == 415
    assert client.post(f"/v1/corpora/{cid}/documents", headers=auth(tenant_key),
                       data={"a": "b"}).status_code == 415
    # A PNG named .txt is not text.
    assert upload(client, tenant_key, cid, "photo.txt", png).status_code == 422

    corrupt = make_pdf(PHOTOSYNTHESIS)[:300]
    resp = upload(client, tenant_key, cid, "broken.pdf", corrupt, "application/pdf")
    assert resp.status_code == 422, resp.text
    assert "PDF" in resp.json()["error"]["message"]
    resp = upload_raw(client, tenant_key, cid, b"%PDF-1.7\n" + secrets.token_bytes(500),
                      "application/pdf")
    assert resp.status_code == 422, resp.text
    resp = upload_raw(client, tenant_key, cid, b"plain words, not a PDF", "application/pdf")
    assert resp.status_code == 422
    assert "not a PDF" in resp.json()["error"]["message"]
    # A PDF without text (a scan, say).
    resp = upload_raw(client, tenant_key, cid, make_pdf([[]]), "application/pdf")
    assert resp.status_code == 422
    assert "no text" in resp.json()["error"]["message"]

    resp = upload(client, tenant_key, cid, "empty.txt", b"", "text/plain")
    assert resp.status_code == 422
    assert "empty" in resp.json()["error"]["message"]
    assert upload_raw(client, tenant_key, cid, b"", "text/plain").status_code == 422
    # Only page furniture: no text.
    resp = upload(client, tenant_key, cid, "nav.html",
                  b"<html><nav>Home</nav><script>x()</script></html>", "text/html")
    assert resp.status_code == 422
    # The multipart field must be `file`.
    resp = client.post(f"/v1/corpora/{cid}/documents", headers=auth(tenant_key),
                       files={"document": ("a.txt", b"words", "text/plain")})
    assert resp.status_code == 422
    assert "file" in resp.json()["error"]["message"]

    # Larger than the document limit: refused, as a form or as a raw body.
    corpus_limits.setenv("AGENTQ_CORPUS_MAX_DOCUMENT_BYTES", "2000")
    from core.settings import get_settings

    get_settings.cache_clear()
    big = (FIXTURES / "honey_bees.txt").read_bytes() * 2
    assert len(big) > 2000
    for resp in (upload(client, tenant_key, cid, "big.txt", big, "text/plain"),
                 upload_raw(client, tenant_key, cid, big, "text/plain")):
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "payload_too_large"
        assert "2000 bytes" in resp.json()["error"]["message"]
    # Larger than any request body the API takes (AGENTQ_MAX_BODY_BYTES).
    from core.settings import get_settings

    huge = b"word " * (get_settings().max_body_bytes // 5 + 10)
    assert upload_raw(client, tenant_key, cid, huge, "text/plain").status_code == 413

    # Nothing was stored.
    detail = client.get(f"/v1/corpora/{cid}", headers=auth(tenant_key)).json()
    assert (detail["document_count"], detail["chunk_count"], detail["documents"]) == (0, 0, [])


def test_upload_body_limit(corpus_limits: pytest.MonkeyPatch) -> None:
    """What the API's body-size limit may allow a document upload (document plus framing)."""
    from api.corpora import MULTIPART_OVERHEAD, upload_body_limit
    from core.settings import get_settings

    assert upload_body_limit("POST", "/v1/corpora/cor_1/documents") == (
        10 * 1024 * 1024 + MULTIPART_OVERHEAD)
    corpus_limits.setenv("AGENTQ_CORPUS_MAX_DOCUMENT_BYTES", "5000")
    get_settings.cache_clear()
    assert upload_body_limit("POST", "/v1/corpora/cor_1/documents") == 5000 + MULTIPART_OVERHEAD
    for method, path in [("GET", "/v1/corpora/cor_1/documents"), ("POST", "/v1/corpora"),
                         ("POST", "/v1/jobs"), ("POST", "/v1/corpora/a/b/documents")]:
        assert upload_body_limit(method, path) is None


def test_a_document_is_held_once(client: TestClient, tenant_key: str) -> None:
    cid = create_corpus(client, tenant_key)
    data = (FIXTURES / "coffee.txt").read_bytes()
    first = upload(client, tenant_key, cid, "coffee.txt", data, "text/plain")
    assert first.status_code == 201
    again = upload_raw(client, tenant_key, cid, data, "text/plain")
    assert again.status_code == 409
    assert first.json()["id"] in again.json()["error"]["message"]
    # Another corpus may hold it too.
    other = create_corpus(client, tenant_key)
    assert upload_raw(client, tenant_key, other, data, "text/plain").status_code == 201


def test_other_tenants_get_404(client: TestClient, tenant_key: str) -> None:
    cid = create_corpus(client, tenant_key, "Private")
    doc = upload(client, tenant_key, cid, "tides.txt", (FIXTURES / "tides.txt").read_bytes(),
                 "text/plain").json()
    other = new_key("intruder")
    for method, path in [("GET", f"/v1/corpora/{cid}"),
                         ("GET", f"/v1/corpora/{cid}/search?q=tides"),
                         ("DELETE", f"/v1/corpora/{cid}/documents/{doc['id']}"),
                         ("DELETE", f"/v1/corpora/{cid}")]:
        resp = client.request(method, path, headers=auth(other))
        assert resp.status_code == 404, (method, path)
        assert resp.json()["error"]["code"] == "not_found"
    resp = upload(client, other, cid, "x.txt", b"planted words", "text/plain")
    assert resp.status_code == 404
    assert cid not in [c["id"] for c in client.get("/v1/corpora", headers=auth(other)
                                                   ).json()["data"]]

    from core.db import transaction
    from core.keys import authenticate
    from core.repositories.corpora import corpus_exists

    with transaction() as s:
        owner = authenticate(s, tenant_key)
        intruder = authenticate(s, other)
        assert owner is not None
        assert intruder is not None
        assert corpus_exists(s, owner.tenant_id, cid)
        assert not corpus_exists(s, intruder.tenant_id, cid)
        assert not corpus_exists(s, owner.tenant_id, "cor_missing")
        assert not corpus_exists(s, owner.tenant_id, "not an id\x00")
    # Still whole for its owner.
    detail = client.get(f"/v1/corpora/{cid}", headers=auth(tenant_key)).json()
    assert detail["document_count"] == 1


# --- Chunking ----------------------------------------------------------------------------------


def test_chunks_follow_sentences_and_overlap_a_little() -> None:
    from agents.corpus import chunk_text

    sentences = [f"Sentence number {i} talks about topic {i % 7} in a few plain words."
                 for i in range(300)]
    paragraphs = [" ".join(sentences[i:i + 9]) for i in range(0, 300, 9)]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text)
    assert len(chunks) > 5
    for chunk in chunks:
        words = len(chunk.text.split())
        assert words <= 250
        assert chunk.text == text[chunk.start:chunk.end]
        assert chunk.text[0].isupper()
        assert chunk.text.endswith(".")
    for chunk in chunks[:-1]:
        assert len(chunk.text.split()) >= 150
    # Everything is covered, in order; neighbours overlap by a sentence or two at most.
    assert chunks[0].start == 0
    assert chunks[-1].end == len(text)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start <= a.end + 2
        assert a.end - b.start <= 40 * 8
    # One enormous "sentence" is cut by words.
    long = " ".join(["word"] * 1000)
    pieces = chunk_text(long)
    assert all(len(p.text.split()) <= 250 for p in pieces)
    assert sum(len(p.text.split()) for p in pieces) >= 1000
    assert chunk_text("") == []
    assert [c.text for c in chunk_text("Just one short line")] == ["Just one short line"]


# --- Retrieval ---------------------------------------------------------------------------------

QUESTIONS = [
    ("Why do bees fan their wings inside the hive?", "honey_bees.txt"),
    ("What happened when Mount St Helens erupted in 1980?", "volcanoes.md"),
    ("How did the Romans carry water into their cities?", "roman_aqueducts.html"),
    ("Which pigment in leaves absorbs sunlight?", "photosynthesis.pdf"),
    ("What causes spring tides and neap tides?", "tides.txt"),
    ("Who invented the lens used in lighthouses?", "lighthouses.md"),
    ("What chemical reaction browns coffee beans when they are roasted?", "coffee.txt"),
    ("How were Egyptian hieroglyphs deciphered?", "rosetta_stone.html"),
    ("Where does the oxygen in the atmosphere come from?", "photosynthesis.pdf"),
    ("How high can the tide rise in the Bay of Fundy?", "tides.txt"),
]


@pytest.fixture(scope="module")
def known_corpus(client: TestClient) -> tuple[str, str, dict[str, str]]:
    """A corpus of eight short documents on distinct topics: (key, corpus id, {file: doc})."""
    key = new_key("library")
    cid = create_corpus(client, key, "Library")
    ids: dict[str, str] = {}
    for path in sorted(FIXTURES.iterdir()):
        resp = upload(client, key, cid, path.name, path.read_bytes())
        assert resp.status_code == 201, (path.name, resp.text)
        ids[path.name] = resp.json()["id"]
    resp = upload(client, key, cid, "photosynthesis.pdf",
                  make_pdf(PHOTOSYNTHESIS, title="Photosynthesis"), "application/pdf")
    assert resp.status_code == 201, resp.text
    ids["photosynthesis.pdf"] = resp.json()["id"]
    assert len(ids) == 8
    return key, cid, ids


def test_retrieval_finds_the_right_document(known_corpus: tuple[str, str, dict[str, str]]
                                            ) -> None:
    from agents.base import Passage
    from agents.corpus import retrieve
    from core.db import transaction
    from core.repositories.corpora import SessionCorpusStore

    _, cid, ids = known_corpus
    misses = []
    with transaction() as s:
        for question, expected in QUESTIONS:
            passages = retrieve(SessionCorpusStore(s), cid, question, k=4)
            assert 1 <= len(passages) <= 4
            assert all(isinstance(p, Passage) for p in passages)
            scores = [p.score for p in passages]
            assert scores == sorted(scores, reverse=True)
            top2 = [p.document_id for p in passages[:2]]
            if ids[expected] not in top2:
                misses.append((question, expected, [p.document_title for p in passages]))
            first = passages[0]
            assert first.chunk_id.startswith("chk_")
            assert first.text
            assert first.document_title
    assert misses == []
    with transaction() as s:
        assert retrieve(SessionCorpusStore(s), cid, "zzzz qqqq", k=4) == []  # no word in common
        assert retrieve(SessionCorpusStore(s), cid, "the of and", k=4) == []  # stop words only
        assert retrieve(SessionCorpusStore(s), "cor_nonexistent", "bees", k=4) == []
        assert len(retrieve(SessionCorpusStore(s), cid, "the", k=1)) == 0
        assert len(retrieve(SessionCorpusStore(s), cid, "water", k=1)) == 1


def test_search_route(client: TestClient, known_corpus: tuple[str, str, dict[str, str]]
                      ) -> None:
    key, cid, ids = known_corpus
    resp = client.get(f"/v1/corpora/{cid}/search",
                      params={"q": "Who deciphered the hieroglyphs?", "k": 3},
                      headers=auth(key))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query"] == "Who deciphered the hieroglyphs?"
    hits = body["data"]
    assert 1 <= len(hits) <= 3
    best = hits[0]
    assert best["document_id"] == ids["rosetta_stone.html"]
    assert best["document_title"] == "The Rosetta Stone"
    assert best["chunk_id"].startswith("chk_")
    assert "hieroglyph" in best["snippet"].lower() or "deciph" in best["snippet"].lower()
    assert len(best["snippet"]) <= 245
    assert best["score"] > 0
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len(best["text"]) == best["char_end"] - best["char_start"]  # the whole chunk
    assert client.get(f"/v1/corpora/{cid}/search", params={"q": "zzzz"}, headers=auth(key)
                      ).json()["data"] == []
    many = client.get(f"/v1/corpora/{cid}/search", params={"q": "water", "k": 50},
                      headers=auth(key)).json()["data"]
    assert len({h["chunk_id"] for h in many}) == len(many) >= 3
    invalid: list[dict[str, Any]] = [{"q": ""}, {}, {"q": "bees", "k": 0},
                                     {"q": "bees", "k": 51}, {"q": "x" * 1001}]
    for params in invalid:
        assert client.get(f"/v1/corpora/{cid}/search", params=params, headers=auth(key)
                          ).status_code == 422, params
    assert client.get("/v1/corpora/cor_missing/search", params={"q": "bees"},
                      headers=auth(key)).status_code == 404


def test_index_follows_changes_and_is_cached(client: TestClient, tenant_key: str) -> None:
    from agents.corpus import retrieval as corpus_mod
    from core.db import transaction
    from core.repositories.corpora import SessionCorpusStore

    cid = create_corpus(client, tenant_key)
    coffee = upload(client, tenant_key, cid, "coffee.txt", (FIXTURES / "coffee.txt").read_bytes(),
                    "text/plain").json()
    with transaction() as s:
        assert corpus_mod.retrieve(SessionCorpusStore(s), cid, "Maillard caramelise"
                                   )[0].document_id == coffee["id"]
        built = corpus_mod._cache[cid]
        assert corpus_mod.retrieve(SessionCorpusStore(s), cid, "roast caffeine")
        assert corpus_mod._cache[cid] is built  # the same index, not rebuilt
        assert corpus_mod.retrieve(SessionCorpusStore(s), cid, "lighthouse keepers") == []
    lights = upload(client, tenant_key, cid, "lighthouses.md",
                    (FIXTURES / "lighthouses.md").read_bytes()).json()
    with transaction() as s:
        assert corpus_mod.retrieve(SessionCorpusStore(s), cid, "lighthouse keepers"
                                   )[0].document_id == lights["id"]
        assert corpus_mod._cache[cid] is not built

    resp = client.delete(f"/v1/corpora/{cid}/documents/{coffee['id']}", headers=auth(tenant_key))
    assert resp.status_code == 204
    assert client.delete(f"/v1/corpora/{cid}/documents/{coffee['id']}",
                         headers=auth(tenant_key)).status_code == 404
    assert chunk_texts(coffee["id"]) == []
    detail = client.get(f"/v1/corpora/{cid}", headers=auth(tenant_key)).json()
    assert [d["id"] for d in detail["documents"]] == [lights["id"]]
    assert (detail["document_count"], detail["chunk_count"]) == (1, lights["chunk_count"])
    with transaction() as s:
        assert corpus_mod.retrieve(SessionCorpusStore(s), cid, "Maillard caramelise") == []
    # The same document may come back once deleted.
    assert upload(client, tenant_key, cid, "coffee.txt", (FIXTURES / "coffee.txt").read_bytes(),
                  "text/plain").status_code == 201

    assert client.delete(f"/v1/corpora/{cid}", headers=auth(tenant_key)).status_code == 204
    assert client.get(f"/v1/corpora/{cid}", headers=auth(tenant_key)).status_code == 404
    assert chunk_texts(lights["id"]) == []
    with transaction() as s:
        assert corpus_mod.retrieve(SessionCorpusStore(s), cid, "lighthouse keepers") == []


def test_openapi_documents_the_corpus_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/corpora", "/v1/corpora/{corpus_id}", "/v1/corpora/{corpus_id}/documents",
            "/v1/corpora/{corpus_id}/search",
            "/v1/corpora/{corpus_id}/documents/{document_id}"} <= set(spec["paths"])
    post = spec["paths"]["/v1/corpora/{corpus_id}/documents"]["post"]
    assert {"multipart/form-data", "text/plain", "text/markdown", "text/html",
            "application/pdf"} == set(post["requestBody"]["content"])
    assert {"201", "409", "413", "415", "422", "404"} <= set(post["responses"])
    for name in ("CorpusOut", "CorpusDetail", "DocumentOut", "SearchResults", "SearchHit"):
        assert "examples" in spec["components"]["schemas"][name]


def test_documents_larger_than_the_api_body_limit_upload(client: TestClient,
                                                         tenant_key: str) -> None:
    """Uploads have their own limit (10 MiB by default), above the 1 MiB of other requests."""
    cid = create_corpus(client, tenant_key, "big")
    paragraph = "Lighthouses guide ships along dangerous coasts with beams of light. "
    text = (paragraph * (2 * 1024 * 1024 // len(paragraph) + 1)).encode()
    assert len(text) > 2 * 1024 * 1024
    resp = upload(client, tenant_key, cid, "big.txt", text, "text/plain")
    assert resp.status_code == 201, resp.text[:300]
    # Every other route keeps the API's body limit.
    other = client.post("/v1/jobs", content=b"{" + b" " * (1024 * 1024 + 10) + b"}",
                        headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert other.status_code == 413
