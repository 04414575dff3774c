"""Install a tformer checkout into a running Colab (or any) runtime without touching its jax.

    python colab/install.py <checkout folder>

Colab's jax, jaxlib and libtpu (or CUDA plugin) are built to match each other and the runtime's
drivers; `pip install -U jax`, or a dependency that drags a newer jax in, leaves a runtime whose
JAX silently falls back to the CPU. So tformer itself goes in with `--no-deps`, and only the
requirements the runtime lacks (or has too old) are added, with the runtime's jax family, numpy and
ml_dtypes pinned to what is installed. A jax older than tformer asks for is kept, with a warning.
Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tempfile

EXTRAS = ("experiments",)  # the notebooks use the experiment runner's dependencies too
# Compiled packages that must stay as the runtime ships them.
_KEEP = re.compile(r"^(jax.*|libtpu.*|numpy|ml[-_]dtypes)$")
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:>=\s*([0-9][0-9.]*))?")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def plan(requires: list[str], installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(requirements to pip install, warnings) for `requires` (as in package metadata) over `installed`.

    A requirement counts when it has no marker or its marker names one of EXTRAS; it is met when the
    package is installed at or above its `>=` bound. Unmet ones go to pip unless they are kept packages.
    """
    names = {name.lower().replace("_", "-"): v for name, v in installed.items()}
    to_install, warnings = [], []
    for req in requires:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if marker.strip() and (extra is None or extra.group(1) not in EXTRAS):
            continue
        name, minimum = _REQ.match(spec).groups()
        have = names.get(name.lower().replace("_", "-"))
        if have is not None and (minimum is None or _version_tuple(have) >= _version_tuple(minimum)):
            continue
        if _KEEP.match(name.lower()) and have is None:
            warnings.append(f"{name} is not installed: install the build for this machine first "
                            "(pip install 'jax[tpu]', 'jax[cuda12]' or jax)")
        elif _KEEP.match(name.lower()):
            warnings.append(f"{name} {have} is below tformer's {spec.strip()}: kept as the runtime ships it "
                            "(replacing it breaks the runtime's accelerator)")
        else:
            to_install.append(spec.strip())
    return to_install, warnings


def main(checkout: str) -> None:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", "-e", checkout], check=True)
    installed = {d.metadata["Name"]: d.version for d in md.distributions() if d.metadata["Name"]}
    to_install, warnings = plan(md.requires("tformer") or [], installed)
    for line in warnings:
        print("warning:", line)
    pins = [f"{name}=={v}" for name, v in sorted(installed.items()) if _KEEP.match(name.lower())]
    if to_install:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(pins) + "\n")
        subprocess.run([*pip, *to_install, "-c", f.name], check=True)
    print(f"installed tformer {md.version('tformer')} (--no-deps); added: {', '.join(to_install) or 'nothing'}; "
          f"kept: {', '.join(pins) or 'nothing pinned'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
