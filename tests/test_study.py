"""experiments/study.py: bad input fails naming the flag (the study itself runs, small, in colab/parallelism.ipynb)."""

import pytest

pytest.importorskip("ml_collections")

from experiments import study


def test_unknown_part_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--parts: unknown part\(s\) \['x'\]; choose from 'abcd'"):
        study.run(tmp_path, smoke=True, parts="ax")


def test_mesh_shapes_use_every_device():
    for preset in study.PRESETS:
        for n in (1, 2, 8, 256):
            shape = study.mesh_shape(preset, n, heads=12)
            assert shape["data" if "data" in shape else "fsdp"] * shape.get("tensor", 1) == n, (preset, n, shape)
    assert study.mesh_shape("tp", 256, heads=12) == {"data": 64, "tensor": 4}  # tensor divides the 12 heads


@pytest.mark.slow
def test_equal_time_training_keeps_the_clocks_within_one_step(tmp_path):
    from experiments.configs import lm_tiny, lm_tiny_rnn

    configs = {}
    for name, mod in (("transformer", lm_tiny), ("rnn", lm_tiny_rnn)):
        c = mod.get_config()
        c.model.update(d_model=16, num_layers=1, max_len=32)
        if "d_ff" in c.model:
            c.model.update(d_ff=32, num_heads=2)
        c.data.update(seq_len=16, max_bytes=20_000)
        c.train.update(batch_size=4, eval_batches=1)
        configs[name] = c
    seconds = 0.5
    trainers = {name: study._Trainer(c, tmp_path / name) for name, c in configs.items()}
    results = study.train_equal_time(trainers, seconds)
    for name, t in trainers.items():
        assert t.elapsed >= seconds and results[name]["steps"] == t.steps > 1
        assert results[name]["bits_per_byte"] > 0
    # The one behind always steps next: when both are done, they differ by at most one step of either.
    slowest_step = max(b[0] - a[0] for t in trainers.values() for a, b in zip(t.curve, t.curve[1:]))
    assert abs(trainers["transformer"].elapsed - trainers["rnn"].elapsed) <= slowest_step + 1e-9


def test_pipeline_and_sequence_meshes_divide_the_layers_and_devices():
    assert study.split_shape("pp", 16, layers=12) == {"stage": 4, "data": 4}  # 8 stages do not divide 12 layers
    assert study.split_shape("pp", 256, layers=18) == {"stage": 2, "data": 128}
    assert study.split_shape("sp", 256, layers=12) == {"sequence": 8, "data": 32}
    with pytest.raises(ValueError, match=r"pp on 1 device\(s\) of a 12-layer model: no stage split above 1"):
        study.split_shape("pp", 1, layers=12)
    with pytest.raises(ValueError, match="no stage split above 1"):
        study.split_shape("pp", 16, layers=9)  # 9 layers share no divisor above 1 with 16 devices
