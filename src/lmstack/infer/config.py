"""``GenerationConfig``: every decoding knob in one validated, serializable dataclass.

Field names follow Hugging Face's ``GenerationConfig`` where they mean the same thing; defaults differ
where HF's surprise people (``top_k`` is off unless set, not 50). Load/save it as JSON/TOML/YAML::

    cfg = GenerationConfig(max_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
    cfg.save("run/generation.json"); GenerationConfig.load("run/generation.json")
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import ConfigError


@dataclass
class GenerationConfig:
    """How to decode. Invalid combinations raise :class:`ConfigError` naming the field."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0             # EOS / stop ids are masked out until this many tokens exist
    do_sample: bool = False             # False: greedy (or beam search when num_beams > 1)
    temperature: float = 1.0
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0                  # nucleus; 1.0 = off
    min_p: float = 0.0                  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0     # CTRL-style, over prompt + generated tokens (padding ignored)
    frequency_penalty: float = 0.0      # OpenAI-style, subtracts count * value, generated tokens only
    presence_penalty: float = 0.0       # OpenAI-style, subtracts value once per generated token seen
    num_beams: int = 1
    length_penalty: float = 1.0         # beam score = sum logprob / generated_len ** length_penalty
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None   # stop ids; None = the model config's, if any
    pad_token_id: int | None = None     # fills finished rows; None = model config's, else first eos, else 0
    stop_strings: list[str] = field(default_factory=list)   # need a tokenizer passed to generate
    suppress_tokens: list[int] = field(default_factory=list)  # ids never generated (e.g. chat role markers)
    seed: int | None = None             # seeds a private torch.Generator: same seed, same samples
    use_cache: bool = True              # False recomputes the whole sequence every step (reference / bench)
    kv_cache_dtype: Literal["auto", "int8"] = "auto"   # int8: per-(head, position) scales, ~1/4 of fp32 memory
    output_logprobs: bool = False       # log-probs of chosen tokens (raw model distribution)
    top_logprobs: int = 0               # and of the n most likely alternatives per step
    sliding_window: int | None = None   # cap the KV cache at this many positions (RoPE/ALiBi models)
    attention_sinks: int = 0            # with sliding_window: the first N tokens never leave the cache (StreamingLLM)
    num_assistant_tokens: int = 4       # speculative decoding: tokens the draft proposes per round
    prompt_lookup_num_tokens: int | None = None   # speculative decoding with n-gram lookup, no draft model
    max_matching_ngram_size: int = 3    # prompt lookup: longest n-gram searched for
    decoder_start_token_id: int | None = None     # encoder-decoder models; None = the model's eos/bos
    compile: bool = False               # torch.compile a static-shape decode step (greedy/sampling loop, decoder-only)
    # structured output (lmstack.infer.constrain): at most one; they need the tokenizer and a stop id
    json_schema: dict[str, Any] | None = None   # the output is one JSON value valid under this JSON Schema
    regex: str | None = None            # the whole output matches this regex
    grammar: str | None = None          # the output is a sentence of this Lark grammar (rule ``start``)
    constraint_backend: Literal["llguidance", "xgrammar"] = "llguidance"
    json_whitespace: int = 0            # longest whitespace run between JSON tokens; 0 = compact "," ":"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"generation config field {name!r}: {why} (got {getattr(self, name)!r})")

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "top_logprobs"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.do_sample and not self.temperature > 0:
            raise bad("temperature", "must be > 0 when do_sample is true (for greedy decoding set do_sample=false)")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1.0 = off)")
        if self.num_beams < 1:
            raise bad("num_beams", "must be >= 1")
        if self.num_return_sequences < 1:
            raise bad("num_return_sequences", "must be >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise bad("num_return_sequences", f"must be <= num_beams={self.num_beams}")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise bad("num_return_sequences", "greedy decoding returns one sequence; set do_sample or num_beams")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", "must be true, false or 'never'")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.eos_token_id is not None and any(i < 0 for i in self.eos_token_id):
            raise bad("eos_token_id", "ids must be >= 0")
        if any(i < 0 for i in self.suppress_tokens):
            raise bad("suppress_tokens", "ids must be >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("stop_strings", "must be non-empty strings")
        if self.sliding_window is not None and self.sliding_window < 2:
            raise bad("sliding_window", "must be >= 2")
        if self.attention_sinks < 0:
            raise bad("attention_sinks", "must be >= 0 (0 = off)")
        if self.attention_sinks and self.sliding_window is None:
            raise bad("attention_sinks", "needs sliding_window (the sinks are the slots a full cache keeps)")
        if self.attention_sinks and self.attention_sinks >= self.sliding_window:
            raise bad("attention_sinks", f"must be < sliding_window={self.sliding_window}, which holds the sinks "
                                         "and at least one recent token")
        if self.num_assistant_tokens < 1:
            raise bad("num_assistant_tokens", "must be >= 1")
        if self.prompt_lookup_num_tokens is not None and self.prompt_lookup_num_tokens < 1:
            raise bad("prompt_lookup_num_tokens", "must be >= 1")
        if self.max_matching_ngram_size < 1:
            raise bad("max_matching_ngram_size", "must be >= 1")
        if self.compile and not self.use_cache:
            raise bad("compile", "needs use_cache=true (the compiled step is a KV-cache step)")
        if self.prompt_lookup_num_tokens is not None and self.num_beams > 1:
            raise bad("prompt_lookup_num_tokens", "speculative decoding does not combine with beam search")
        constraints = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(constraints) > 1:
            raise bad(constraints[1], f"set at most one of json_schema, regex, grammar ({constraints[0]} is set too)")
        if constraints:
            name = constraints[0]
            if name == "json_schema" and not isinstance(self.json_schema, dict):
                raise bad(name, "must be a JSON Schema object (a mapping)")
            if name != "json_schema" and (not isinstance(getattr(self, name), str) or not getattr(self, name)):
                raise bad(name, "must be a non-empty string")
            if self.num_beams > 1:
                raise bad(name, "constrained decoding works with greedy and sampled decoding, not beam search "
                                "(set num_beams=1)")
            if self.prompt_lookup_num_tokens is not None:
                raise bad(name, "constrained decoding does not combine with speculative decoding "
                                "(unset prompt_lookup_num_tokens)")
            if self.stop_strings:
                raise bad(name, "the constraint decides where the output ends: drop stop_strings")
        if self.constraint_backend not in ("llguidance", "xgrammar"):
            raise bad("constraint_backend", "must be 'llguidance' or 'xgrammar'")
        if self.json_whitespace < 0:
            raise bad("json_whitespace", "must be >= 0 (0 = compact JSON)")

    @property
    def is_beam(self) -> bool:
        return self.num_beams > 1

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        from lmstack.config import to_dict

        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        from lmstack.config import from_dict

        return from_dict(cls, data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically)."""
        from lmstack.runs import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "GenerationConfig":
        """Read a JSON/TOML/YAML file of fields, then ``--field value`` overrides."""
        from lmstack.config import load_config

        return load_config(cls, path, overrides)
