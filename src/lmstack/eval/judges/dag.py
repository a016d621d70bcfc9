"""DAG judges: a decision graph whose nodes ask one thing and whose leaves are scores.

Nodes are single-criterion LLM questions (``judge``: the reply must name one of the options) or
deterministic rules (``rule``); each option points to the next node or to a numeric leaf. Traversal
starts at ``root`` and is deterministic (judges run at temperature 0); the path taken is recorded
per item, so a score can always be explained. A graph is a dict (YAML/JSON file or Python)::

    root: answers
    nodes:
      answers:
        judge: "Does the output answer the question in the input?"
        options: {"yes": concise, "no": 0}
      concise:
        rule: {max_words: 60}                 # built-ins: contains, regex, min_words, max_words, matches_reference
        options: {"true": 5, "false": 3}

In Python a rule may also be a callable ``item -> bool | str``. Graphs with a cycle, a missing node or
an option leading nowhere are rejected when built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmstack.errors import ConfigError
from lmstack.eval.judges.base import JudgeResult
from lmstack.eval.llm import LLM

JUDGE_PROMPT = """{question}

Input:
{source}

Output:
{output}

Answer with exactly one of: {labels}.
Answer:"""

Target = str | float


def _rule_fn(spec: Any, node: str) -> Callable[[dict[str, Any]], Any]:
    if callable(spec):
        return spec
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"DAG node {node!r}: 'rule' must be a callable or one of "
                          f"{{contains, regex, min_words, max_words, matches_reference}}: value")
    (kind, value), = spec.items()
    if kind == "contains":
        return lambda item: str(value).lower() in item["output"].lower()
    if kind == "regex":
        pattern = re.compile(value)
        return lambda item: pattern.search(item["output"]) is not None
    if kind == "min_words":
        return lambda item: len(item["output"].split()) >= int(value)
    if kind == "max_words":
        return lambda item: len(item["output"].split()) <= int(value)
    if kind == "matches_reference":
        from lmstack.eval.metrics.text import normalize_answer

        return lambda item: normalize_answer(item["output"]) == normalize_answer(item.get("reference", ""))
    raise ConfigError(f"DAG node {node!r}: unknown rule {kind!r}")


@dataclass
class Node:
    name: str
    options: dict[str, Target]
    question: str | None = None                          # judge nodes
    rule: Callable[[dict[str, Any]], Any] | None = None  # rule nodes


class DAG:
    def __init__(self, root: str, nodes: dict[str, Node]):
        self.root, self.nodes = root, nodes
        self._validate()

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "DAG":
        if not isinstance(spec, dict) or "root" not in spec or "nodes" not in spec:
            raise ConfigError("DAG: expected a mapping with 'root' and 'nodes'")
        nodes = {}
        for name, n in spec["nodes"].items():
            if not isinstance(n, dict) or ("judge" in n) == ("rule" in n):
                raise ConfigError(f"DAG node {name!r}: needs exactly one of 'judge' (a question) or 'rule'")
            opts = n.get("options")
            if not isinstance(opts, dict) or not opts:
                raise ConfigError(f"DAG node {name!r}: 'options' must map each answer to a node or a score")
            # YAML 1.1 reads yes/no/true/false as booleans: a judge answers yes/no, a rule true/false
            options = {(("yes" if k else "no") if "judge" in n else str(k).lower()) if isinstance(k, bool)
                       else str(k).lower(): v for k, v in opts.items()}
            nodes[name] = Node(name, options, question=n.get("judge"),
                               rule=_rule_fn(n["rule"], name) if "rule" in n else None)
        return cls(spec["root"], nodes)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DAG":
        from lmstack.config import read_config_file

        return cls.from_dict(read_config_file(path))

    def _validate(self) -> None:
        if self.root not in self.nodes:
            raise ConfigError(f"DAG: root {self.root!r} is not a node")
        for node in self.nodes.values():
            for label, target in node.options.items():
                if isinstance(target, bool) or not isinstance(target, (int, float, str)):
                    raise ConfigError(f"DAG node {node.name!r} option {label!r}: target must be a node or a number")
                if isinstance(target, str) and target not in self.nodes:
                    raise ConfigError(f"DAG node {node.name!r} option {label!r}: no node named {target!r}")
        state: dict[str, int] = {}   # 1 = on the current path, 2 = done

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == 1:
                raise ConfigError(f"DAG: cycle {' -> '.join(trail + [name])}")
            if state.get(name) == 2:
                return
            state[name] = 1
            for target in self.nodes[name].options.values():
                if isinstance(target, str):
                    visit(target, trail + [name])
            state[name] = 2
        visit(self.root, [])

    @staticmethod
    def parse_option(reply: str, labels: Sequence[str]) -> str | None:
        """The option named first in the reply (whole words, case-insensitive), None if none is."""
        text = reply.lower()
        hits = [(m.start(), label) for label in labels
                for m in [re.search(rf"(?<![\w]){re.escape(label)}(?![\w])", text)] if m]
        return min(hits)[1] if hits else None

    def evaluate(self, llm: LLM | None, items: Sequence[dict[str, Any]], max_tokens: int = 8) -> JudgeResult:
        """Walk the graph for every item (``{"output", "source"?, "reference"?}``), level by level, so the
        judge calls of all items at the same node go out as one batch."""
        n = len(items)
        at: list[str | None] = [self.root] * n
        paths: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        scores: list[float | None] = [None] * n
        failures: list[dict[str, Any]] = []
        while any(a is not None for a in at):
            by_node: dict[str, list[int]] = {}
            for i, a in enumerate(at):
                if a is not None:
                    by_node.setdefault(a, []).append(i)
            for name, idx in by_node.items():
                node = self.nodes[name]
                if node.rule is not None:
                    outcomes = [str(node.rule(items[i])).lower() for i in idx]
                    replies = outcomes
                else:
                    if llm is None:
                        raise ConfigError(f"DAG node {name!r} is a judge: pass an LLM")
                    labels = list(node.options)
                    prompts = [JUDGE_PROMPT.format(question=node.question, source=items[i].get("source", ""),
                                                   output=items[i]["output"], labels=", ".join(labels)) for i in idx]
                    replies = [r[0].text for r in llm.complete(prompts, max_tokens=max_tokens, temperature=0.0)]
                    outcomes = [self.parse_option(r, labels) for r in replies]
                for i, outcome, reply in zip(idx, outcomes, replies):
                    if outcome not in node.options:
                        failures.append({"index": i, "node": name, "reason": "reply names no option",
                                         "reply": str(reply)[:200]})
                        paths[i].append({"node": name, "outcome": None, "reply": str(reply)[:200]})
                        at[i] = None
                        continue
                    paths[i].append({"node": name, "outcome": outcome})
                    target = node.options[outcome]
                    if isinstance(target, str):
                        at[i] = target
                    else:
                        scores[i] = float(target)
                        at[i] = None
        return JudgeResult("dag", scores, [{"path": p} for p in paths], failures)
