import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmstack.errors import DataError
from lmstack.sources import expand_paths, iter_documents


def test_all_formats_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# title\nbody")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "id": [1, 2]}), tmp_path / "d.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    docs = list(iter_documents(tmp_path))
    assert docs == ["plain text", "# title\nbody", "row one", "row two", "pq one", "pq two"]
    assert [p.name for p in expand_paths(str(tmp_path / "*.txt"))] == ["a.txt"]


@pytest.mark.parametrize("name,content,needle", [
    ("bad.txt", b"\xff\xfeoops", "not valid UTF-8"),
    ("empty.txt", b"", "the file is empty"),
    ("rows.jsonl", b'{"body": "x"}\n', "row has no 'text' field"),
    ("broken.jsonl", b'{"text": \n', "not valid JSON"),
])
def test_bad_inputs(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=needle):
        list(iter_documents(tmp_path / name))


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        expand_paths([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="matches no file"):
        expand_paths([str(tmp_path / "*.zzz")])


def test_one_row_reader_streams_every_row_format(tmp_path):
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmstack.errors import DataError
    from lmstack.finetune.sft import iter_rows as sft_rows
    from lmstack.eval.harness import read_rows
    from lmstack.sources import iter_rows

    rows = [{"text": f"row {i}", "n": i} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=2)
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.parquet"):
        got = [r for _, r in iter_rows(tmp_path / name)]
        assert got == rows, name
        assert [r for _, r in sft_rows(tmp_path / name)] == rows       # SFT data reads through it
        assert read_rows(tmp_path / name) == rows                      # and so do eval data files
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        list(iter_rows(tmp_path / "bad.jsonl"))
