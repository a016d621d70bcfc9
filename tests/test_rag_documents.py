"""lmstack.rag.documents: every loader on real files, heading paths, empty/binary files counted, one-line errors."""

from __future__ import annotations

import json

import pytest

from lmstack.errors import DataError
from lmstack.rag.documents import load_documents, markdown_sections


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal valid PDF (Helvetica text, one content stream per page) with a correct xref table."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {len(objs)} 0 R >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_markdown_heading_paths_skip_code_fences():
    text = "# A\nintro\n## B\nx\n```\n# not a heading\n```\n### C\ny\n## D\nz\n# E\n"
    secs = markdown_sections(text)
    assert [p for _, p in secs] == [("A",), ("A", "B"), ("A", "B", "C"), ("A", "D"), ("E",)]
    assert all(text[o] == "#" for o, _ in secs)


def test_folder_of_every_kind(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "a.md").write_text("# Guide\n\nStart here.\n\n## Install\n\npip install it.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("plain words", encoding="utf-8")
    (tmp_path / "c.html").write_text("<html><head><title>Page T</title></head><body><nav>menu</nav>"
                                     "<p>Main body text.</p></body></html>", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "r1", "text": "row one", "lang": "en"}) + "\n"
                                      + json.dumps({"text": "   "}) + "\n"
                                      + json.dumps({"text": "row three", "title": "T3"}) + "\n", encoding="utf-8")
    (tmp_path / "e.pdf").write_bytes(pdf_bytes(["Hello page one", "Second page here"]))
    (tmp_path / "empty.md").write_text("", encoding="utf-8")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\x00\x00binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs, report = load_documents(tmp_path)
    by_id = {d.id: d for d in docs}
    assert (report.documents, report.empty, report.binary) == (6, 2, 2)
    md = by_id[str(tmp_path / "a.md")]
    assert md.title == "Guide" and md.heading_at(md.text.index("pip")) == ("Guide", "Install")
    assert md.heading_at(md.text.index("Start")) == ("Guide",)
    html = by_id[str(tmp_path / "c.html")]
    assert html.title == "Page T" and "Main body text." in html.text
    assert by_id["r1"].text == "row one" and by_id["r1"].metadata == {"lang": "en"}
    assert by_id[f"{tmp_path / 'd.jsonl'}:3"].title == "T3"
    pdf = by_id[str(tmp_path / "e.pdf")]
    assert "Hello page one" in pdf.text and "Second page here" in pdf.text
    assert pdf.heading_at(pdf.text.index("Second")) == ("page 2",) and pdf.heading_at(0) == ("page 1",)


def test_glob_and_nothing_left_is_one_error(tmp_path):
    (tmp_path / "x.txt").write_text("", encoding="utf-8")
    (tmp_path / "y.txt").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"no document with text \(1 empty, 1 binary skipped; first: .*x.txt"):
        load_documents(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_documents(tmp_path / "missing")


def test_jsonl_errors_and_duplicate_ids(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: row has no 'text' field"):
        load_documents(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="document id '1' repeats"):
        load_documents(dup)


def test_corrupt_pdf_is_one_line(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "x.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    with pytest.raises(DataError, match=r"x.pdf: cannot read PDF"):
        load_documents(tmp_path / "x.pdf")
