"""The model-family registry: each family's declared batch layout is what its model trains on, every run config
names a family and carries exactly its config fields, and a mesh axis a family cannot run on fails in one line."""

import dataclasses
import importlib
import pkgutil

import jax
import pytest
from flax import nnx

from tformer import batch as batch_lib
from tformer import families
from tformer.config import ModelConfig
from tformer.rnn import RNNConfig

TINY = {ModelConfig: dict(vocab_size=40, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_len=16),
        RNNConfig: dict(vocab_size=40, d_model=16, num_layers=1, max_len=16)}


def tiny_model(family: families.Family):
    kw = dict(TINY[family.config_class])
    if family.task == "seq2seq" and family.config_class is ModelConfig:
        kw["num_encoder_layers"] = 1
    return family.model_class(family.config_class(**kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_each_family_trains_on_the_batch_layout_of_its_task(name):
    family = families.get(name)
    model = nnx.eval_shape(lambda: tiny_model(family))  # shapes only: nothing is computed
    assert families.of_model(model) is family
    shapes = batch_lib.abstract_batch(family.task, 2, 8, src_len=6)
    assert tuple(shapes) == family.batch_keys
    graphdef, params = nnx.split(model)
    logits, targets, weights = jax.eval_shape(
        lambda p, b: batch_lib.logits_and_targets(nnx.merge(graphdef, p), b), params, shapes)
    assert logits.shape[:2] == targets.shape == weights.shape == (2, 8) and logits.shape[2] >= 40
    assert family.train_flops_per_token(model.cfg, 8) > 0


def test_every_run_config_names_a_family_and_has_exactly_its_config_fields():
    pytest.importorskip("ml_collections")
    import experiments.configs as configs
    from experiments.configs.base import TOKENIZER_FIELDS

    names = [m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "base"]
    seen = set()
    for name in names:
        module = importlib.import_module(f"experiments.configs.{name}")
        if not hasattr(module, "get_config"):
            continue
        c = module.get_config()
        family = families.get(c.model.kind)
        seen.add(family.name)
        fields = {f.name for f in dataclasses.fields(family.config_class)} - set(TOKENIZER_FIELDS)
        assert set(c.model.keys()) == fields | {"kind"}, name
    assert seen == set(families.FAMILIES)  # every family has a config to run it


@pytest.mark.parametrize("name,axis,size,feature", [
    ("rnn_lm", "stage", 2, "pipeline parallelism"),
    ("rnn_seq2seq", "stage", 4, "pipeline parallelism"),
])
def test_a_mesh_axis_a_family_cannot_run_on_fails_naming_the_family_and_the_field(name, axis, size, feature):
    family = families.get(name)
    with pytest.raises(ValueError, match=rf"^config\.mesh\.{axis}={size}: the {name} family "
                                         rf"\({family.model_class.__name__}\) has no {feature}; "
                                         rf"set mesh\.{axis}=1 \(it runs on mesh axes data, fsdp, "):
        family.check_mesh({"data": 1, axis: size})
    family.check_mesh({"data": 8, "fsdp": 1, axis: 1})  # size 1: the axis is unused


def test_an_unknown_family_or_model_fails_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'gan'; choose one of \['lm', 'rnn_lm', "):
        families.get("gan")
    with pytest.raises(ValueError, match=r"Linear is not a model of a tformer family; known: \['DecoderLM', "):
        families.of_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
