"""experiments/study.py: bad input fails naming the flag (the study itself runs, small, in colab/parallelism.ipynb)."""

import pytest

pytest.importorskip("ml_collections")

from experiments import study  # noqa: E402


def test_unknown_part_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--parts: unknown part\(s\) \['x'\]; choose from 'abcd'"):
        study.run(tmp_path, smoke=True, parts="ax")


def test_mesh_shapes_use_every_device():
    for preset in study.PRESETS:
        for n in (1, 2, 8, 256):
            shape = study.mesh_shape(preset, n, heads=12)
            assert shape["data" if "data" in shape else "fsdp"] * shape.get("tensor", 1) == n, (preset, n, shape)
    assert study.mesh_shape("tp", 256, heads=12) == {"data": 64, "tensor": 4}  # tensor divides the 12 heads
