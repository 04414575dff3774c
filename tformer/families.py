"""The model families, each declared once: what a run, a decoder or a plan needs to know about a model.

A family is what `config.model.kind` names in a run config:

  lm           DecoderLM (GPT-style), trained on packed text
  seq2seq      EncoderDecoder (Vaswani et al.), trained on (source, target) pairs
  rnn_lm       the LSTM / GRU baseline of `lm`
  rnn_seq2seq  the LSTM / GRU baseline of `seq2seq`

Its `task` is the data it trains on and the batch layout that data comes in
("lm" | "seq2seq", the keys of `tformer.batch.LAYOUT`). Its `mesh_axes`
lists the mesh axes beyond the batch axes (data, fsdp) it can run on; a mesh
using another one fails in `check_mesh` with one line naming the family and
the mesh field. Adding a family means one entry in `FAMILIES` (and the
model's code); nothing else branches on which family a model is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from tformer import batch as batch_lib
from tformer import flops, generate, models, rnn
from tformer.config import ModelConfig

# Mesh axes a family may run on beyond the batch axes, and the feature each one is.
_AXIS_FEATURES = {"tensor": "tensor parallelism", "stage": "pipeline parallelism",
                  "sequence": "sequence parallelism"}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its classes, the data it trains on, how it decodes and what it supports.

    Invariant: `model_class.task == task` (the model's batch layout is its family's task).
    """

    name: str
    model_class: type
    config_class: type
    task: str  # "lm" (text) | "seq2seq" (pairs): the data, the batch layout and the scores of a run
    train_flops_per_token: Callable[[object, int], float]  # (model config, target length) -> FLOPs
    generate: Callable  # (model, prompts, Decode, Sampling, ...) -> Generated
    beam_search: Callable  # (model, prompts, Decode, ..., beam_size) -> Generated
    mesh_axes: frozenset[str]  # the axes of _AXIS_FEATURES it can run on (size > 1)
    shards_weights: bool  # weights laid out by the sharding rules (else only the batch is split)
    plannable: bool  # tformer.plan can compile its train step from abstract shapes
    hf_causal_lm: bool = False  # a Hugging Face causal LM both ways (tformer.hf): init_from=hf:, export.py

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The keys of a training batch of this family (`tformer.batch.KEYS`)."""
        return batch_lib.KEYS[self.task]

    def check_mesh(self, sizes: Mapping[str, int]) -> None:
        """Fail in one line naming the family and the mesh field when `sizes` uses an axis it cannot."""
        for axis, feature in _AXIS_FEATURES.items():
            size = sizes.get(axis, 1)
            if size != 1 and axis not in self.mesh_axes:
                runs_on = ["data", "fsdp"] + [a for a in _AXIS_FEATURES if a in self.mesh_axes]
                raise ValueError(f"config.mesh.{axis}={size}: the {self.name} family ({self.model_class.__name__}) "
                                 f"has no {feature}; set mesh.{axis}=1 (it runs on mesh axes {', '.join(runs_on)})")


# The RNNs run on tensor / sequence meshes with their cells whole (replicated over those axes); a pipeline
# needs a stack of identical blocks, which they do not have.
_RNN_AXES = frozenset({"tensor", "sequence"})


def _rnn_flops(seq2seq: bool) -> Callable[[rnn.RNNConfig, int], float]:
    return lambda cfg, seq_len: rnn.train_flops_per_token(cfg, seq2seq=seq2seq)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lm", models.DecoderLM, ModelConfig, "lm", flops.train_flops_per_token, generate.generate,
           generate.beam_search, frozenset({"tensor", "stage", "sequence"}), shards_weights=True, plannable=True,
           hf_causal_lm=True),
    Family("seq2seq", models.EncoderDecoder, ModelConfig, "seq2seq", flops.train_flops_per_token,
           generate.generate, generate.beam_search, frozenset({"tensor", "stage", "sequence"}), shards_weights=True,
           plannable=True),
    Family("rnn_lm", rnn.RNNLM, rnn.RNNConfig, "lm", _rnn_flops(seq2seq=False), rnn.generate, rnn.beam_search,
           _RNN_AXES, shards_weights=False, plannable=False),
    Family("rnn_seq2seq", rnn.RNNSeq2Seq, rnn.RNNConfig, "seq2seq", _rnn_flops(seq2seq=True), rnn.generate,
           rnn.beam_search, _RNN_AXES, shards_weights=False, plannable=False),
)}


def get(name: str) -> Family:
    """The family called `name`; an unknown name fails listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def of_model(model: object) -> Family:
    """The family whose model class built `model` (a merged nnx module)."""
    for family in FAMILIES.values():
        if type(model) is family.model_class:
            return family
    raise ValueError(f"{type(model).__name__} is not a model of a tformer family; known: "
                     f"{[f.model_class.__name__ for f in FAMILIES.values()]}")


def model_class(cfg: ModelConfig) -> type:
    """The Transformer class a ModelConfig describes (`cfg.task`: lm | seq2seq, which names its family)."""
    return get(cfg.task).model_class
