"""Every `python launch.py …` command in the README and the docs composes as written, and the fast
ones (tiny models) run as written; the smoke experiment is really short."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from ..conftest import CONF, ROOT

LAUNCH = re.compile(r"(?:\.venv/bin/)?python launch\.py\b(.*)")


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def readme_commands() -> list[list[str]]:
    """The arguments after `launch.py` of every command in the bash blocks of the README and the
    docs pages."""
    commands = []
    text = "\n".join(page.read_text() for page in PAGES)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = LAUNCH.search(line)
            if match:
                commands.append(shlex.split(match.group(1), comments=True))
    return [list(c) for c in dict.fromkeys(map(tuple, commands))]  # a command on two pages runs once


COMMANDS = readme_commands()


def split_args(args: list[str]) -> tuple[bool, str | None, str, list[str]]:
    """(multirun, config dir, config name, overrides) of a launcher command line."""
    multirun, config_dir, config_name, overrides = False, None, "config", []
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("-cd", "--config-dir"):
            config_dir = next(it)
        elif arg in ("-cn", "--config-name"):
            config_name = next(it)
        elif arg in ("--help", "-h", "--hydra-help", "--info"):
            continue  # prints, composes nothing of its own
        elif arg in ("--cfg", "-c"):
            next(it)
        else:
            overrides.append(arg)
    return multirun, config_dir, config_name, overrides


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A sweep's first job: each `key=a,b,c` sweep replaced by `key=a`."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15 and [] in COMMANDS  # the bare default run is among them


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) or "(default)" for c in COMMANDS])
def test_readme_command_composes(args):
    args = [re.sub(r"<[^>]+>", "placeholder", a) for a in args]  # `<date_time>`: the user's folder
    _, config_dir, config_name, overrides = split_args(args)
    overrides = first_of_each_sweep(overrides)
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{CONF}]")
    with initialize_config_dir(config_dir=str(ROOT / (config_dir or "conf")), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    assert cfg.model.name and cfg.method.name and 0 < cfg.budget <= 1


FAST = [c for c in COMMANDS if any("tiny" in a for a in c)]


def test_the_fast_commands_are_found():
    assert len(FAST) >= 3, FAST


def _run_as_written(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    where = "hydra.sweep.dir" if split_args(args)[0] else "hydra.run.dir"
    return subprocess.run(
        [sys.executable, "launch.py", *args, f"{where}={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )


@pytest.mark.parametrize("args", FAST, ids=[" ".join(c) for c in FAST])
def test_fast_readme_command_runs_as_written(args, tmp_path):
    out = _run_as_written(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "out").rglob("metrics.json"))


def test_the_smoke_experiment_is_short():
    """`+experiment=smoke` (about a minute on SmolLM2, measured; the run itself is the default
    pipeline, which the integration tests run): perplexity only, on few tokens."""
    assert ["+experiment=smoke"] in COMMANDS
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=smoke"])
    assert cfg.model.name == "smollm2-135m" and cfg.eval.name == "ppl" and cfg.eval.zeroshot is None
    assert cfg.eval.ppl.max_tokens == 2048 and cfg.calib.nsamples * cfg.calib.seq_len <= 1024


def test_the_readme_and_docs_stand_on_their_own():
    """A user has the repository, not the project's shared notes: what they say is in docs/; the
    README says to activate the environment before its `python launch.py` commands."""
    readme = (ROOT / "README.md").read_text()
    assert "shared/" not in readme and "OFFLINE.md" not in readme
    assert readme.index("source .venv/bin/activate") < readme.index("python launch.py model=tiny-llama")
    for page in ("offline", "models", "runs"):
        assert (ROOT / "docs" / f"{page}.md").is_file() and f"docs/{page}.md" in readme
    assert "smollm2-135m" in (ROOT / "docs" / "offline.md").read_text()
    assert (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("module", ["export", "report"])
def test_command_help_says_whole_sentences(module, capsys):
    import importlib

    from shrink.__main__ import COMMANDS

    with pytest.raises(SystemExit):
        importlib.import_module(COMMANDS[module]).main(["--help"])
    description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert description.endswith(".") and "issue" not in description, description


def test_the_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_launch_help_lists_the_groups_and_the_common_commands():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "launch.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    methods = "method: distill, flap, id, llm-pruner, rom, shortgpt, slicegpt, svd, svdllm, wanda-sp"
    assert methods in out.stdout
    assert "quant: gptq, none, rtn" in out.stdout and "schema" not in out.stdout
    commands = out.stdout.split("== Common commands ==")[1]
    assert commands.count("python launch.py") >= 5
