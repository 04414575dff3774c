"""Every code block of README.md and docs/*.md runs as written, and every `tformer.<name>` they mention resolves.

Fences: ```python blocks run in a fresh interpreter; ```bash blocks run with bash from a scratch folder that
sees the repository's folders (so `runs/...` and output files land there); ```text is output, not code.
A block that cannot run in the suite (it needs the network, an accelerator, several hosts or many minutes)
is fenced ```sh and listed in NOT_RUN below with the reason, keyed by its file and first line: a new
block is run unless someone fences it ```sh and says why here.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
KINDS = {"python", "bash", "sh", "text"}

NETWORK = "installs packages from the network"
MINUTES = "runs for minutes (the suite runs the same code path on tiny settings elsewhere)"
NOT_RUN = {
    ("README.md", 'pip install -e ".[experiments]" && python experiments/train.py '
                  "--config=experiments/configs/lm_tiny.py --workdir=runs/lm_tiny"):
        f"{NETWORK}, then the full 500-step run (tests/test_train.py trains the same config briefly)",
    ("README.md", 'pip install -q -e ".[test]" && ruff check . && python -m pytest -q -n 2 tests'):
        "it is the suite itself (.ci/run; test_readme_test_command_is_what_ci_runs checks they match)",
    ("README.md", "# CPU (any machine)"): f"{NETWORK}; CUDA and TPU wheels need that hardware",
    ("docs/runner.md", "python experiments/train.py --config=experiments/configs/seq2seq_tiny.py "
                       "--workdir=runs/seq2seq_tiny"): MINUTES,
    ("docs/runner.md", "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\"):
        "a minute or more of training on 8 fake devices; tests/test_sharding.py trains the same meshes",
    ("docs/runner.md", "# One GPU (the default mesh, data=-1, is every visible device)"):
        "needs a GPU, a second process on a port, and a TPU slice",
    ("docs/study.md", "python experiments/study.py --out=docs/figures --record=docs/results/study.json   "
                      "# --smoke: every part, tiny"): f"{MINUTES}; tests/test_study.py runs --smoke",
    ("docs/variants.md", "python experiments/variants.py --what=lm --steps=150"):
        f"{MINUTES}; tests/test_variants.py checks each variant",
    ("docs/huggingface.md", "huggingface-cli download openai-community/gpt2 --local-dir gpt2          "
                            "# any local HF folder: config.json, *.safetensors, tokenizer.json"):
        "downloads GPT-2 from the Hugging Face Hub (tests/test_finetune.py runs the loop on a tiny checkpoint)",
    ("docs/benchmarks.md", "python experiments/benchmark.py --what=train --model=cpu_tiny --batch=32 --seq_len=128 "
                           "--packed=true \\"): f"{MINUTES} (60 timed steps and a 400-step run)",
    ("docs/benchmarks.md", "python experiments/schedules.py --what=pipeline,ring --stages=4 --virtual_stages=1,2 "
                           "--microbatches=4,8,16,32 \\"):
        f"{MINUTES} (eight pipeline compiles and 8,192-token steps on 8 fake devices)",
    ("docs/benchmarks.md", "# The reference shape (GPT-2 layout, vocab 256, d 256, 4 layers, T 256, batch 8), against "
                           "Hugging Face GPT-2 eager"):
        f"{MINUTES}, and needs torch, transformers and a nanoGPT checkout (tests/test_peers.py runs both peers "
        "on tiny shapes)",
    ("docs/benchmarks.md", "python experiments/train.py --config=experiments/configs/lm_speedrun.py "
                           "--workdir=runs/speedrun"):
        f"{MINUTES} (its 85 s budget; tests/test_train.py runs the budget and this config's validation)",
    ("docs/benchmarks.md", "# 1. Train, cuDNN flash attention, layers unrolled (the speed target), with HF eager + "
                           "torch.compile."): "needs a GPU",
}
# Pages whose every block is kept as a record, not an example (fenced ```sh all the same).
NOT_RUN_FILES = {
    "docs/benchmarks-history.md": "a log: each block is the command of a past measurement as it was run then "
                                  "(minutes each, some with a peer script that was outside the repository)",
}


def blocks() -> list[tuple[str, int, str, str]]:
    """(file relative to the repository, line, fence language, code) of every fenced block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            out.append((str(path.relative_to(REPO)), text[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return out


BLOCKS = blocks()
RUN = [b for b in BLOCKS if b[2] in ("python", "bash")]


def test_every_block_is_fenced_as_a_known_kind():
    bad = [f"{f}:{line} ```{kind}" for f, line, kind, _ in BLOCKS if kind not in KINDS]
    assert not bad, f"fence each block as one of {sorted(KINDS)} (```sh plus a NOT_RUN entry if it cannot run): {bad}"
    assert [b for b in RUN if b[0] == "README.md" and b[2] == "python"], "README.md has no ```python example"


def test_blocks_not_run_are_exactly_the_listed_ones():
    assert not [(f, line) for f, line, kind, _ in BLOCKS if f in NOT_RUN_FILES and kind not in ("sh", "text")]
    fenced_sh = {(f, code.splitlines()[0]) for f, _, kind, code in BLOCKS if kind == "sh" and f not in NOT_RUN_FILES}
    assert fenced_sh - set(NOT_RUN) == set(), "```sh blocks without a reason in NOT_RUN"
    assert set(NOT_RUN) - fenced_sh == set(), "NOT_RUN entries whose block is gone (or no longer ```sh)"


def test_readme_test_command_is_what_ci_runs():
    [readme_cmd] = [code.strip() for f, _, kind, code in BLOCKS
                    if f == "README.md" and kind == "sh" and "pytest" in code]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if "python -m pytest" in line]
    assert ci == [readme_cmd], (ci, readme_cmd)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_exists():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)}
                if anchor not in slugs:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken


def _resolves(dotted: str) -> bool:
    """`tformer.a.b` as a user reaches it: import the longest module prefix, then attributes from the package
    down (so a module shadowed by a same-named attribute of its package does not count as reachable)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    obj = importlib.import_module("tformer")
    for name in parts[1:]:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def test_every_documented_tformer_name_resolves():
    names = set()
    for path in DOCS:
        names |= set(re.findall(r"\btformer(?:\.[A-Za-z_]\w*)+", path.read_text()))
    names = {n for n in names if not n.endswith((".py", ".md", ".json", ".ipynb"))}
    assert "tformer.decode_phases" in names
    assert not [n for n in sorted(names) if not _resolves(n)]


def test_a_shadowed_module_name_does_not_resolve():
    assert not _resolves("tformer.generate.decode_phases")  # `tformer.generate` is the function
    assert _resolves("tformer.plan.plan_train_step") and _resolves("tformer.decode_phases")


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` = this one
    env.pop("XLA_FLAGS", None)  # the examples run on one device, as a new user's would, unless they say otherwise
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[f"{f}:{line}" for f, line, _, _ in RUN])
def test_docs_example_runs(block, tmp_path):
    doc, line, kind, code = block
    if kind == "python":
        (tmp_path / "example.py").write_text(code)
        cmd = [sys.executable, "example.py"]
    else:
        for name in ("experiments", "tformer", "colab", "docs", "pyproject.toml"):
            (tmp_path / name).symlink_to(REPO / name)
        (tmp_path / "example.sh").write_text("set -euo pipefail\n" + code)
        cmd = [shutil.which("bash"), "example.sh"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{doc}:{line} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
