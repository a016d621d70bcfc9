from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lmstack.config import from_dict, load_config, parse_overrides, to_dict
from lmstack.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd"] = "cosine"


@dataclass
class Job:
    name: str = "run"
    steps: int = 10
    compile: bool = False
    out: Path | None = None
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError("steps: must be > 0")


def test_defaults_and_nested_values():
    job = from_dict(Job, {"steps": 5, "optim": {"lr": 3, "betas": [0.8, 0.9]}})
    assert job.steps == 5 and job.optim.lr == 3.0 and job.optim.betas == (0.8, 0.9)
    assert job.optim.schedule == "cosine"


@pytest.mark.parametrize("data,needle", [
    ({"stepz": 1}, "unknown config field 'stepz' (did you mean 'steps'?)"),
    ({"optim": {"lrr": 1}}, "unknown config field 'optim.lrr' (did you mean 'optim.lr'?)"),
    ({"steps": "ten"}, "'steps': expected an integer, got 'ten'"),
    ({"compile": "yes"}, "'compile': expected true or false"),
    ({"optim": {"schedule": "linear"}}, "'optim.schedule': must be one of 'cosine', 'wsd'"),
    ({"optim": {"betas": [0.9]}}, "'optim.betas': expected 2 items"),
    ({"steps": 0}, "steps: must be > 0"),
])
def test_errors_name_the_field(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(Job, data)
    assert needle in str(e.value)


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'name = "a"\nsteps = 7\n[optim]\nlr = 0.5\n'),
    (".yaml", "name: a\nsteps: 7\noptim:\n  lr: 0.5\n"),
    (".json", '{"name": "a", "steps": 7, "optim": {"lr": 0.5}}'),
])
def test_files_and_overrides(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    job = load_config(Job, path, ["--optim.lr", "3e-4", "--tags=[x, y]", "--out", "runs/a"])
    assert (job.name, job.steps, job.optim.lr, job.tags, job.out) == ("a", 7, 3e-4, ["x", "y"], Path("runs/a"))
    assert to_dict(job)["out"] == "runs/a"


def test_override_parsing_and_bad_files(tmp_path):
    assert parse_overrides(["--a.b-c", "1", "--d=true"]) == {"a": {"b_c": 1}, "d": True}
    with pytest.raises(ConfigError, match="missing a value"):
        parse_overrides(["--a.b"])
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(Job, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "missing.yaml")
