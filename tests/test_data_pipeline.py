"""`lmstack data prepare`: the example config on generated files -> shards, report, and a loader over them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmstack.config import load_config
from lmstack.data.loader import BlockLoader, validation_batches
from lmstack.data.pack import open_shards
from lmstack.data.pipeline import PrepareConfig, prepare, render_report
from lmstack.errors import ConfigError, DataError
from lmstack.runs import read_json

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "data_example.toml"

PARAS = [
    "Arctic terns travel farther than any other bird, flying from their breeding grounds in the Arctic to the "
    "Antarctic and back every year. Researchers attached small geolocators to the birds and found that a single "
    "tern can cover more than seventy thousand kilometres in a year, following the prevailing winds.",
    "Bread rises because yeast eats the sugars in flour and releases carbon dioxide, which the gluten network "
    "traps in small pockets. A slow, cool fermentation gives the dough time to develop flavour, while a warm "
    "kitchen speeds everything up but leaves the loaf tasting flat.",
    "The first transatlantic telegraph cable was laid in 1858 and failed after three weeks, when an engineer "
    "applied too much voltage while trying to speed up the signal. A sturdier cable, laid in 1866, cut the time "
    "for news to cross the ocean from ten days to a few minutes.",
    "Glaciers move because ice deforms under its own weight and slides over meltwater at its base. In summer the "
    "extra water lubricates the bed and some glaciers double their speed, which is why scientists place sensors "
    "in boreholes drilled through hundreds of metres of ice.",
    "Common swifts spend almost their whole lives in the air, eating, drinking and even sleeping on the wing. "
    "Young swifts that leave the nest may not land again for two or three years, until they are ready to breed "
    "in the towns where they hatched.",
    "A lighthouse keeper in the nineteenth century trimmed the wick every few hours through the night, polished "
    "the great lens by day and kept a log of passing ships and the weather. The work was lonely, and families "
    "often lived together in the small stone cottages at the foot of the tower.",
    "Honeybees tell each other where to find flowers with a waggle dance on the comb. The angle of the dance "
    "against the vertical gives the direction of the food relative to the sun, and the length of the waggle "
    "run tells the other workers how far they will have to fly.",
    "Old maps of the coast were drawn from soundings taken with a lead line, a weight on a marked rope that "
    "sailors dropped over the side. Tallow pressed into a hollow in the lead brought up sand, shells or mud, "
    "which told the navigator what kind of bottom lay beneath the ship.",
]

NAV = """<header><nav><ul><li><a href="/">Home</a></li><li><a href="/news">Latest news</a></li></ul></nav></header>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies.</div>"""
FOOTER = "<footer><p>Copyright 2024 Example Site. All rights reserved.</p></footer>"
GERMAN = ("Die Küstenseeschwalbe legt jedes Jahr die längste Strecke aller Vögel zurück und fliegt von der Arktis "
          "bis in die Antarktis und wieder zurück. Forscher haben kleine Geräte an den Vögeln befestigt und "
          "festgestellt, dass eine einzige Seeschwalbe mehr als siebzigtausend Kilometer im Jahr zurücklegt.")


def page(body: str) -> str:
    return (f"<!doctype html><html><head><title>t</title><script>track('view');</script></head><body>{NAV}"
            f"<main><article><p>{body}</p></article></main>{FOOTER}</body></html>")


def write_example_inputs(root: Path) -> None:
    """The folder configs/data_example.toml expects: web pages, JSONL notes, a book and code files."""
    (root / "web").mkdir(parents=True)
    (root / "books").mkdir()
    (root / "code").mkdir()
    for i, p in enumerate(PARAS[:4]):
        (root / "web" / f"page{i}.html").write_text(page(p + " " + PARAS[(i + 4) % 8]))
    # a near copy of page0 (a few words changed) and a placeholder page
    near = (PARAS[0] + " " + PARAS[4]).replace("small", "tiny").replace("single", "lone").upper()
    (root / "web" / "page0_copy.html").write_text(page(near))
    (root / "web" / "lorem.html").write_text(page("Lorem ipsum dolor sit amet, " + PARAS[5]))
    rows = [
        {"text": PARAS[5] + "\n\n" + PARAS[6]},
        {"text": PARAS[5] + "\n\n" + PARAS[6]},  # exact duplicate
        {"text": GERMAN},
        {"text": "Too short to keep."},
        {"text": PARAS[7] + " Questions go to keeper@lighthouse.example.org or +44 20 7946 0958."},
        {"text": PARAS[1] + "\nPlease enable JavaScript to view the comments.\n" + PARAS[2]},
    ]
    (root / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    book = ("THE SEA AND THE SKY\n\n" + PARAS[3].replace("deforms", "de-\nforms") + "\n\n17\n\n"
            "THE SEA AND THE SKY\n\n" + PARAS[6] + "\n\n18\n\nTHE SEA AND THE SKY\n\n" + PARAS[7] + "\n")
    (root / "books" / "sea.txt").write_text(book)
    (root / "code" / "stats.py").write_text(
        "# Copyright 2024 Example Corp.\n# Licensed under the MIT License.\n\n"
        "def mean(values):\n    \"\"\"The arithmetic mean of a list of numbers.\"\"\"\n"
        "    return sum(values) / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n"
        "    return sum((v - m) ** 2 for v in values) / len(values)\n")
    (root / "code" / "api_pb2.py").write_text("# Generated by the protocol buffer compiler.  DO NOT EDIT!\n"
                                              "DESCRIPTOR = None\n")
    (root / "code" / "bundle.py").write_text("x=1;" * 400 + "\n")


class ByteTokenizer:
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "bytes.json").write_text("{}")


def _decode_docs(path: Path) -> list[str]:
    stream = np.concatenate([np.asarray(a) for a in open_shards(path).arrays] or [np.zeros(0, np.uint16)])
    docs = np.split(stream, np.nonzero(stream == 256)[0] + 1)[:-1]
    return [bytes(d[:-1].astype(np.uint8)).decode("utf-8") for d in docs]


@pytest.fixture
def prepared(tmp_path):
    root = tmp_path / "inputs"
    write_example_inputs(root)
    config = load_config(PrepareConfig, EXAMPLE, ["--root", str(root), "--out_dir", str(tmp_path / "out"),
                                                  "--val_fraction", "0"])
    report = prepare(config, tokenizer=ByteTokenizer(), progress=False)
    return tmp_path / "out", report


def test_prepare_cleans_dedups_mixes_and_reports(prepared):
    out, report = prepared
    src = report["sources"]
    assert (src["web"]["read"], src["web"]["kept"]) == (6, 4)        # near copy and lorem ipsum removed
    assert (src["notes"]["read"], src["notes"]["kept"]) == (6, 3)    # duplicate, German, too short removed
    assert (src["books"]["read"], src["books"]["kept"]) == (1, 1)
    assert (src["code"]["read"], src["code"]["kept"]) == (3, 1)      # generated and minified removed
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["quality"]["removed"] == {"lorem_ipsum": 1, "too_few_words": 1}
    assert steps["language"]["removed"] == {"language:de": 1}
    assert steps["code"]["removed"] == {"auto_generated": 1, "minified": 1}
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert steps["near_dedup"]["removed"] == {"near_duplicate": 1}
    assert report["dedup"]["near_dedup"]["clusters"] == 1
    assert steps["pii"]["modified"] >= 1 and steps["book"]["modified"] == 1

    train = _decode_docs(out / "train")
    joined = "\n".join(train)
    assert "keeper@lighthouse" not in joined and "<EMAIL>" in joined and "<PHONE>" in joined
    assert "JavaScript" not in joined and "cookies" not in joined and "Latest news" not in joined
    assert "THE SEA AND THE SKY" not in joined and "deforms under" in joined
    assert "Copyright 2024" not in joined and "def mean(values):" in joined
    # notes have weight 2 (every note twice), code 0.5 (its one file is the whole token target)
    notes = [d for d in train if d.startswith(PARAS[5][:40])]
    assert len(notes) == 2
    rows = {r["name"]: r for r in report["mix"]["rows"]}
    assert rows["notes"]["mixed_tokens"] == 2 * rows["notes"]["tokens"]
    assert report["shards"]["train"]["tokens"] == sum(r["mixed_tokens"] for r in rows.values()) + len(train)
    assert report["shards"]["val"]["tokens"] == 0

    md = (out / "data_report.md").read_text()
    for needle in ("## Sources", "## Cleaning and dedup steps", "## Duplicate clusters", "## Mix",
                   "## Examples of removed text", "language:de", "near_duplicate", "auto_generated",
                   "| notes | 3 |"):
        assert needle in md, needle
    assert md == render_report(read_json(out / "report.json"))  # the report rebuilds from report.json
    assert read_json(out / "config.json")["dedup"]["threshold"] == 0.7
    assert not (out / "work").exists()

    loader = BlockLoader(out / "train", block_size=32, batch_size=4, seed=0)
    x, y = loader.next_batch()
    assert x.shape == (4, 32) and int(x.max()) < 257


def test_validation_split_is_stable_and_disjoint(tmp_path):
    root = tmp_path / "inputs"
    write_example_inputs(root)
    outs = []
    for run in ("a", "b"):
        config = load_config(PrepareConfig, EXAMPLE, ["--root", str(root), "--out_dir", str(tmp_path / run),
                                                      "--val_fraction", "0.4", "--pack.workers", "1"])
        prepare(config, tokenizer=ByteTokenizer(), progress=False)
        outs.append((set(_decode_docs(tmp_path / run / "train")), set(_decode_docs(tmp_path / run / "val"))))
    (train_a, val_a), (train_b, val_b) = outs
    assert val_a and train_a.isdisjoint(val_a)
    assert (train_a, val_a) == (train_b, val_b)
    batches = list(validation_batches(tmp_path / "a" / "val", block_size=16, batch_size=2))
    assert batches and all(x.shape[1] == 16 for x, _ in batches)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="sources"):
        PrepareConfig()
    with pytest.raises(ConfigError, match="unknown config field 'dedup.treshold'"):
        load_config(PrepareConfig, EXAMPLE, ["--dedup.treshold", "0.5"])
    with pytest.raises(ConfigError, match="names must be distinct"):
        load_config(PrepareConfig, base={"sources": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}]})
    config = load_config(PrepareConfig, EXAMPLE, ["--root", str(tmp_path / "missing"),
                                                  "--out_dir", str(tmp_path / "out")])
    with pytest.raises(DataError, match="matches no file"):
        prepare(config, tokenizer=ByteTokenizer(), progress=False)


def test_cli_runs_the_example_config_with_a_trained_bpe(tmp_path, monkeypatch, capsys):
    from lmstack import cli

    root = tmp_path / "inputs"
    write_example_inputs(root)
    monkeypatch.setattr(cli, "LAYER_CLIS", ["lmstack.data.cli"])
    code = cli.main(["data", "prepare", str(EXAMPLE), "--quiet", "--root", str(root),
                     "--out_dir", str(tmp_path / "out"), "--tokenizer.vocab_size", "300"])
    assert code == 0
    assert "training tokens" in capsys.readouterr().out
    index = read_json(tmp_path / "out" / "train" / "index.json")
    assert index["vocab_size"] <= 300 and index["dtype"] == "uint16"
    from lmstack.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.vocab_size == index["vocab_size"] and tok.eos_id == index["eos_id"]
    assert (tmp_path / "out" / "data_report.md").is_file()
    assert cli.main(["data", "prepare", str(tmp_path / "nope.toml")]) == 2  # a user error: one line, exit 2
