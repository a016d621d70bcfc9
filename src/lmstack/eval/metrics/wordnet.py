"""An offline WordNet for METEOR's synonym matching, built from the Debian WordNet 3.0 files.

nltk reads WordNet from ``<data dir>/corpora/wordnet/`` and needs a ``lexnames`` file there, which the
Debian packages do not ship. :func:`ensure_wordnet` builds that folder once under the lmstack cache
(``$LMSTACK_CACHE`` or ``~/.cache/lmstack``): a copy of the database files (~35 MB) plus a ``lexnames`` file
written from the table below (the ``lexnames(5WN)`` man page), and puts the data dir on nltk's path
(nltk refuses corpus roots outside it).

Setup, once per machine::

    apt-get install -y wordnet-base wordnet-sense-index     # the files under /usr/share/wordnet
    lmstack eval setup-wordnet                              # optional: METEOR builds the folder on first use

``$LMSTACK_WORDNET`` points at another folder of WordNet 3.0 database files.
"""

from __future__ import annotations

import os
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

from lmstack.errors import LmstackError

DEFAULT_SOURCE = Path("/usr/share/wordnet")
DB_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
            "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")
OPTIONAL_FILES = ("index.sense", "cntlist.rev", "sentidx.vrb", "sents.vrb", "cntlist", "frames.vrb")

# lexicographer file number -> (name, syntactic category: 1 noun, 2 verb, 3 adjective, 4 adverb)
LEXNAMES = [
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
]

FIX = ("apt-get install -y wordnet-base wordnet-sense-index (Debian/Ubuntu), or set LMSTACK_WORDNET to a "
       "folder with the WordNet 3.0 database files")


def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(LEXNAMES))


def cache_dir() -> Path:
    return Path(os.environ.get("LMSTACK_CACHE") or Path.home() / ".cache" / "lmstack")


def source_dir() -> Path:
    return Path(os.environ.get("LMSTACK_WORDNET") or DEFAULT_SOURCE)


def build_wordnet(source: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Path:
    """Create ``<data_dir>/corpora/wordnet`` from ``source`` (default /usr/share/wordnet); returns data_dir."""
    from lmstack.runs import atomic_dir

    source = Path(source) if source else source_dir()
    data_dir = Path(data_dir) if data_dir else cache_dir() / "nltk_data"
    missing = [f for f in DB_FILES if not (source / f).is_file()]
    if missing:
        raise LmstackError(f"METEOR needs WordNet 3.0, not found at {source} (missing {', '.join(missing[:3])}"
                           f"{'...' if len(missing) > 3 else ''}); fix: {FIX}")
    target = data_dir / "corpora" / "wordnet"
    if (target / "lexnames").is_file() and all((target / f).exists() for f in DB_FILES):
        return data_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        for name in DB_FILES + OPTIONAL_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)  # copies: nltk rejects links leaving its root
        (tmp / "lexnames").write_text(lexnames_text(), encoding="utf-8")
    return data_dir


@lru_cache(maxsize=1)
def load_wordnet():
    """nltk's WordNet reader: nltk's own data if it has WordNet, else the folder built by :func:`build_wordnet`."""
    from lmstack.extras import require

    nltk = require("nltk", "METEOR's WordNet synonyms")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        data_dir = build_wordnet()
        if str(data_dir) not in nltk.data.path:
            nltk.data.path.append(str(data_dir))
        root = nltk.data.find("corpora/wordnet")
    with warnings.catch_warnings():  # "multilingual functions are not available": we need English only
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(root, None)
