"""Routing: choose (model, prompt version) per request, by rules or an embedding classifier; log why.

    from lmstack.prompts.route import Route, Router, Rule, EmbeddingClassifier
    router = Router(default=Route("runs/small", "qa@production"),
                    rules=[Rule("code", Route("runs/coder", "code@production"), regex=r"```|\\bdef\\b"),
                           Rule("vip", Route("remote-large", "qa@production"), metadata={"tier": "gold"}),
                           Rule("long", Route("runs/long-ctx", "qa@long"), min_length=2000)],
                    classifier=EmbeddingClassifier(Embedder().embed, kind="logistic").fit(texts, labels),
                    routes={"billing": Route("runs/small", "billing@production")},
                    min_confidence=0.6, log_path="runs/route.jsonl")
    d = router.route("my invoice is wrong", {"tier": "free"})
    d.route, d.reason      # Route('runs/small', 'billing@production'), "classifier: 'billing' (p=0.91 >= 0.6)"

Order: the rules in order (the first that matches wins; a rule matches when every condition it sets
holds: ``regex`` found by ``re.search``, every ``metadata`` key equal (a list value: any of them), length in
characters within ``[min_length, max_length]``); then the classifier when its confidence reaches
``min_confidence``; else the default. Every decision carries its reason and, with ``log_path``, is appended
to a JSONL log (the request's SHA-256 and length, not its text, unless ``log_text=True``).

Classifier (:class:`EmbeddingClassifier`) over any ``embed(texts) -> (n, d) array``
(:meth:`lmstack.rag.embed.Embedder.embed`: MiniLM sentence embeddings): ``centroid`` (cosine to each
label's normalised mean embedding; confidence = the best cosine) or ``logistic`` (multinomial logistic
regression with L2, fitted by full-batch gradient descent in numpy; the same objective as scikit-learn's
``LogisticRegression(C=1/(n*l2))``; confidence = the best probability).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, LmstackError

Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Route:
    model: str
    prompt: str          # a registry reference: name, name@3, name@label


@dataclass
class Rule:
    name: str
    route: Route
    regex: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    min_length: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.regex is None and not self.metadata and self.min_length is None and self.max_length is None:
            raise ConfigError(f"route rule {self.name!r}: give at least one of regex, metadata, min_length, "
                              f"max_length")
        if self.regex is not None:
            try:
                self._re = re.compile(self.regex)
            except re.error as e:
                raise ConfigError(f"route rule {self.name!r}: regex {self.regex!r} does not compile: {e}") from None
        for key in ("min_length", "max_length"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"route rule {self.name!r}: {key} must be an integer >= 0, got {v!r}")

    def match(self, text: str, metadata: Mapping[str, Any]) -> str | None:
        """Why this rule matches (None when it does not)."""
        why = []
        if self.regex is not None:
            m = self._re.search(text)
            if m is None:
                return None
            why.append(f"regex {self.regex!r} matched {m.group(0)[:40]!r}")
        for key, want in self.metadata.items():
            have = metadata.get(key)
            if not (have in want if isinstance(want, list) else have == want):
                return None
            why.append(f"{key}={have!r}")
        n = len(text)
        if self.min_length is not None:
            if n < self.min_length:
                return None
            why.append(f"length {n} >= {self.min_length}")
        if self.max_length is not None:
            if n > self.max_length:
                return None
            why.append(f"length {n} <= {self.max_length}")
        return f"rule {self.name!r}: " + ", ".join(why)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EmbeddingClassifier:
    """Nearest centroid or logistic regression on sentence embeddings (see the module docstring)."""

    def __init__(self, embed: Embed, kind: str = "centroid", l2: float = 1e-3, max_iter: int = 5000,
                 lr: float = 1.0, tol: float = 1e-8):
        if kind not in ("centroid", "logistic"):
            raise ConfigError(f"classifier kind must be 'centroid' or 'logistic', got {kind!r}")
        self.embed, self.kind, self.l2, self.max_iter, self.lr, self.tol = embed, kind, l2, max_iter, lr, tol
        self.labels: list[str] = []
        self.weights: np.ndarray | None = None      # (d, K): centroids, or logistic weights
        self.bias: np.ndarray | None = None         # (K,) logistic intercepts

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        x = np.asarray(self.embed(list(texts)), dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != len(texts):
            raise LmstackError(f"the embedding function returned shape {x.shape} for {len(texts)} texts; "
                               f"expected (n, dim)")
        return _normalise(x)

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> EmbeddingClassifier:
        if len(texts) != len(labels) or not texts:
            raise ConfigError(f"classifier: {len(texts)} texts and {len(labels)} labels; give as many of each (>0)")
        self.labels = sorted(set(labels))
        if len(self.labels) < 2:
            raise ConfigError(f"classifier: needs at least two labels, got {self.labels}")
        x = self._vectors(texts)
        y = np.array([self.labels.index(v) for v in labels])
        if self.kind == "centroid":
            self.weights = _normalise(np.stack([x[y == k].mean(axis=0) for k in range(len(self.labels))])).T
            return self
        n, d = x.shape
        k = len(self.labels)
        onehot = np.eye(k)[y]
        w, b = np.zeros((d, k)), np.zeros(k)
        prev = np.inf
        for _ in range(self.max_iter):
            logits = x @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            loss = -np.mean(np.log(p[np.arange(n), y] + 1e-300)) + 0.5 * self.l2 * float((w * w).sum())
            g = (p - onehot) / n
            w -= self.lr * (x.T @ g + self.l2 * w)
            b -= self.lr * g.sum(axis=0)
            if prev - loss < self.tol:
                break
            prev = loss
        self.weights, self.bias = w, b
        return self

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n, K): cosine to each centroid, or class probabilities."""
        if self.weights is None:
            raise LmstackError("classifier: call fit() before predicting")
        x = self._vectors(texts)
        if self.kind == "centroid":
            return x @ self.weights
        logits = x @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, confidence) per text."""
        s = self.scores(texts)
        best = s.argmax(axis=1)
        return [(self.labels[i], float(s[r, i])) for r, i in enumerate(best)]


@dataclass
class Decision:
    route: Route
    source: str                     # "rule", "classifier" or "default"
    reason: str
    rule: str | None = None
    label: str | None = None
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.route.model, "prompt": self.route.prompt, "source": self.source, "reason": self.reason,
                "rule": self.rule, "label": self.label, "confidence": self.confidence}


@dataclass
class Router:
    default: Route
    rules: list[Rule] = field(default_factory=list)
    classifier: EmbeddingClassifier | None = None
    routes: dict[str, Route] = field(default_factory=dict)       # classifier label -> route
    min_confidence: float = 0.0
    log_path: str | os.PathLike | None = None
    log_text: bool = False

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"router: duplicate rule name(s) {', '.join(dup)}")
        if self.classifier is not None and self.classifier.labels:
            missing = sorted(set(self.classifier.labels) - set(self.routes))
            if missing:
                raise ConfigError(f"router: classifier label(s) {', '.join(missing)} have no route; add them to "
                                  f"routes")

    def decide(self, text: str, metadata: Mapping[str, Any] | None = None) -> Decision:
        """The decision for one request, not logged."""
        meta = dict(metadata or {})
        for rule in self.rules:
            why = rule.match(text, meta)
            if why is not None:
                return Decision(rule.route, "rule", why, rule=rule.name)
        if self.classifier is not None:
            label, conf = self.classifier.predict([text])[0]
            what = "cos" if self.classifier.kind == "centroid" else "p"
            if conf >= self.min_confidence:
                return Decision(self.routes[label], "classifier",
                                f"classifier: {label!r} ({what}={conf:.3f} >= {self.min_confidence:g})",
                                label=label, confidence=conf)
            return Decision(self.default, "default", f"no rule matched; classifier {label!r} ({what}={conf:.3f}) "
                            f"below min_confidence {self.min_confidence:g}", label=label, confidence=conf)
        return Decision(self.default, "default", "no rule matched")

    def route(self, text: str, metadata: Mapping[str, Any] | None = None) -> Decision:
        """:meth:`decide`, then append the decision to ``log_path`` (JSONL) when set."""
        d = self.decide(text, metadata)
        if self.log_path is not None:
            from lmstack.runs import JsonlLogger

            record = {"request_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "length": len(text),
                      "metadata": dict(metadata or {}), **d.to_dict()}
            if self.log_text:
                record["text"] = text
            with JsonlLogger(self.log_path) as log:
                log.log(record)
        return d


def router_from_dict(data: Mapping[str, Any], embed: Embed | None = None,
                     log_path: str | os.PathLike | None = None) -> Router:
    """A router from config (YAML)::

        default: {model: runs/small, prompt: qa@production}
        rules:
          - {name: code, regex: "```", model: runs/coder, prompt: code@production}
          - {name: vip, metadata: {tier: gold}, model: big, prompt: qa@production}
        classifier:
          kind: centroid                 # or logistic
          min_confidence: 0.5
          routes: {billing: {model: runs/small, prompt: billing@production}, ...}
          examples: {billing: [texts ...], ...}
    """
    def route(d: Any, where: str) -> Route:
        if not isinstance(d, Mapping) or not isinstance(d.get("model"), str) or not isinstance(d.get("prompt"), str):
            raise ConfigError(f"router {where}: expected model and prompt (strings)")
        from lmstack.prompts.registry import parse_ref

        parse_ref(d["prompt"])
        return Route(d["model"], d["prompt"])

    if not isinstance(data, Mapping) or "default" not in data:
        raise ConfigError("router config: expected a mapping with 'default' (and rules, classifier)")
    rules = []
    for k, r in enumerate(data.get("rules") or []):
        if not isinstance(r, Mapping) or "name" not in r:
            raise ConfigError(f"router rules[{k}]: expected a mapping with a name")
        unknown = sorted(set(r) - {"name", "model", "prompt", "regex", "metadata", "min_length", "max_length"})
        if unknown:
            raise ConfigError(f"router rule {r['name']!r}: unknown key(s) {', '.join(unknown)}")
        rules.append(Rule(str(r["name"]), route(r, f"rule {r['name']!r}"), r.get("regex"),
                          dict(r.get("metadata") or {}), r.get("min_length"), r.get("max_length")))
    clf, routes, min_conf = None, {}, 0.0
    c = data.get("classifier")
    if c is not None:
        if embed is None:
            raise ConfigError("router config has a classifier: pass an embedding function (e.g. Embedder().embed)")
        examples = c.get("examples") or {}
        texts = [t for label in sorted(examples) for t in examples[label]]
        labels = [label for label in sorted(examples) for _ in examples[label]]
        routes = {str(k): route(v, f"classifier route {k!r}") for k, v in (c.get("routes") or {}).items()}
        clf = EmbeddingClassifier(embed, kind=c.get("kind", "centroid")).fit(texts, labels)
        min_conf = float(c.get("min_confidence", 0.0))
    return Router(route(data["default"], "default"), rules, clf, routes, min_conf, log_path)


__all__ = ["Decision", "EmbeddingClassifier", "Route", "Router", "Rule", "router_from_dict"]
