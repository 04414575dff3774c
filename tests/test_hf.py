"""Hugging Face interop: tformer computes what the real transformers models compute.

Tiny randomly initialised HF models (no download) are saved with
`save_pretrained`, loaded with `tformer.hf.load_hf_checkpoint`, and compared on
fp32 logits and greedy tokens. Every HF parameter (norm scales and biases
included) is perturbed away from its init, so a swapped, transposed or dropped
tensor shows up in the logits.
"""

import ast
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from flax import nnx  # noqa: E402

import tformer  # noqa: E402
from tformer import hf as thf  # noqa: E402

torch.set_num_threads(2)
V = 300  # not a multiple of vocab_multiple (128): padded rows are present
TOL = 1e-4


def perturbed(model, seed):
    """Every parameter moved off its init (ones / zeros / N(0, 0.02)) so each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def gpt2(**kw):
    base = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    cfg = transformers.GPT2Config(**(base | kw), attn_implementation="eager")
    return perturbed(transformers.GPT2LMHeadModel(cfg), 0)


def llama(cls="Llama", **kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, f"{cls}Config")(**(base | kw), attn_implementation="eager")
    return perturbed(getattr(transformers, f"{cls}ForCausalLM")(cfg), 1)


def tokens(batch, length, seed=0):
    return np.random.RandomState(seed).randint(0, V, (batch, length))


@nnx.jit
def forward(model, toks):
    return model(toks)  # one compiled program: much faster than op-by-op on CPU


def assert_same_logits(hf_model, model, toks):
    """fp32 logits agree to TOL over the real vocabulary; returns the max abs diff."""
    with torch.no_grad():
        ref = hf_model(torch.tensor(toks)).logits.numpy()
    got = np.asarray(forward(model, jnp.asarray(toks, jnp.int32)))
    assert got.shape == (*toks.shape, model.cfg.padded_vocab)
    diff = float(np.abs(got[..., :V] - ref).max())
    assert diff <= TOL, f"max abs logit diff {diff}"
    assert np.abs(ref).max() > 1.0  # logits far from uniform: a wrong weight would not hide
    return diff


def assert_same_greedy(hf_model, model, n_new=12):
    prompts = tokens(3, 5, seed=1)
    hf_model.generation_config.eos_token_id = None  # run all n_new steps, as eos_id=-1 does below
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    ref = ref[:, prompts.shape[1]:].numpy()
    out = tformer.generate(model, prompts, tformer.Decode(n_new, eos_id=-1))
    assert ref.shape == (3, n_new)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert len(np.unique(ref)) > 3  # not a degenerate repeat-one-token model


def random_model(cfg, seed=0):
    """A DecoderLM with every parameter random (norm scales near 1), without jitting an initialiser."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tformer.DecoderLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        x = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(x + 1.0 if str(path[-1].key) == "scale" else x, jnp.float32)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def flat_params(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---------------------------------------------------------------------------
# Config mapping.


def test_config_from_hf_maps_every_gpt2_field():
    hf = transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=3, n_head=6, n_positions=40, n_inner=100,
                                 layer_norm_epsilon=1e-4, activation_function="gelu", tie_word_embeddings=False,
                                 bos_token_id=5, eos_token_id=7, pad_token_id=9)
    cfg = thf.config_from_hf(hf.to_dict())
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.max_len, cfg.d_ff) == (V, 48, 3, 6, 40, 100)
    assert (cfg.norm, cfg.norm_eps, cfg.positions) == ("layernorm", 1e-4, "learned")
    assert cfg.use_bias and cfg.kv_heads == 6
    assert cfg.activation == "gelu_exact" and not cfg.tie_embeddings
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (5, 7, 9)
    assert thf.config_from_hf(hf.to_dict() | {"activation_function": "gelu_new"}).activation == "gelu"  # tanh approx
    assert cfg.padded_vocab == 384  # vocab_multiple padding kept


def test_config_from_hf_maps_every_llama_field():
    hf = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                                  rope_theta=1234.0, max_position_embeddings=77, tie_word_embeddings=True,
                                  attention_bias=True, eos_token_id=[4, 6])
    cfg = thf.config_from_hf(hf.to_dict(), dtype="bfloat16", scan_layers=True)
    sizes = (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim)
    assert sizes == (64, 96, 3, 8, 2, 12)
    assert (cfg.norm, cfg.norm_eps, cfg.positions, cfg.rope_theta, cfg.max_len) == ("rmsnorm", 1e-5, "rope", 1234.0, 77)
    assert (cfg.activation, cfg.use_bias, cfg.tie_embeddings, cfg.eos_id) == ("swiglu", True, True, 4)
    assert (cfg.dtype, cfg.scan_layers) == ("bfloat16", True)
    # Pre-v5 config.json: top-level rope_theta, no rope_parameters.
    old = {k: v for k, v in hf.to_dict().items() if k != "rope_parameters"} | {"rope_theta": 99.0, "rope_scaling": None}
    assert thf.config_from_hf(old).rope_theta == 99.0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "bert"}, r"model_type='bert' is not supported; supported: \('gpt2', 'llama'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        # Pre-v5 config.json spelling of scaled RoPE.
        ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ],
)
def test_config_from_hf_refuses_what_tformer_does_not_compute(change, match):
    hf = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_attention_heads=4, num_hidden_layers=2).to_dict()
    with pytest.raises(ValueError, match=match):
        thf.config_from_hf(hf | change)


def test_config_from_hf_refuses_architectural_overrides():
    hf = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4).to_dict()
    with pytest.raises(ValueError, match=r"cannot override \['d_model'\]"):
        thf.config_from_hf(hf, d_model=128)


# ---------------------------------------------------------------------------
# Parity with the real models.


def to_hub_gpt2_layout(directory):
    """Rewrite as the Hub's original GPT-2 files: no "transformer." prefix, plus the causal-mask buffers."""
    from safetensors.numpy import load_file, save_file

    t = {k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()}
    for i in range(2):
        t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(t, directory / "model.safetensors", metadata={"format": "pt"})


def test_gpt2_matches_hf_logits_and_greedy(tmp_path):
    hf_model = gpt2()
    hf_model.save_pretrained(tmp_path)
    to_hub_gpt2_layout(tmp_path)  # bare names and non-weight buffers load too
    model = thf.load_hf_checkpoint(tmp_path)
    assert model.cfg.tie_embeddings and model.cfg.activation == "gelu"
    assert_same_logits(hf_model, model, tokens(3, 20))
    assert_same_greedy(hf_model, model)
    # Padded vocabulary rows are zero.
    assert not np.asarray(model.embed.table[...])[V:].any()


@pytest.mark.parametrize(
    "kw, shard, greedy",
    [
        (dict(), "40KB", True),  # untied, GQA, sharded with model.safetensors.index.json
        # tied, biases, MHA (logits only: one more decode compile would not test more of the loader)
        (dict(tie_word_embeddings=True, attention_bias=True, num_key_value_heads=4), None, False),
    ],
    ids=["untied-gqa-sharded", "tied-bias"],
)
def test_llama_matches_hf_logits_and_greedy(tmp_path, kw, shard, greedy):
    hf_model = llama(**kw)
    hf_model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model = thf.load_hf_checkpoint(tmp_path)
    assert model.cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
    assert_same_logits(hf_model, model, tokens(3, 20))
    if greedy:
        assert_same_greedy(hf_model, model)


@pytest.mark.parametrize("cls, kw", [("Mistral", dict(sliding_window=5)), ("Qwen2", dict(tie_word_embeddings=True))])
def test_llama_family_variants_match_hf_logits(tmp_path, cls, kw):
    """Mistral's sliding window = tformer's local_window; Qwen2's q/k/v biases (no o bias)."""
    hf_model = llama(cls, **kw)
    hf_model.save_pretrained(tmp_path)
    model = thf.load_hf_checkpoint(tmp_path)
    assert model.cfg.local_window == kw.get("sliding_window")
    assert_same_logits(hf_model, model, tokens(2, 20))  # 20 > window: the window matters


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    hf_model = llama().to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    model = thf.load_hf_checkpoint(tmp_path, param_dtype="bfloat16")
    w_dhk = np.asarray(model.blocks.layers.attn.wq[...][1], np.float32)
    ref = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T.reshape(w_dhk.shape)
    np.testing.assert_array_equal(w_dhk, ref)
    assert model.blocks.layers.attn.wq[...].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Writing: tformer -> HF -> tformer.


@pytest.mark.parametrize(
    "kw",
    [
        dict(d_ff=96, activation="gelu", tie_embeddings=False),
        dict(positions="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2, use_bias=True, rope_theta=300.0),
    ],
    ids=["gpt2", "llama"],
)
def test_save_hf_checkpoint_round_trips_through_hf(tmp_path, kw):
    cfg = tformer.ModelConfig(vocab_size=V, d_model=64, num_heads=4, num_layers=2, max_len=32,
                              eos_id=2, **kw)
    model = random_model(cfg)
    thf.save_hf_checkpoint(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_same_logits(hf_model, model, tokens(2, 16))
    back = flat_params(thf.load_hf_checkpoint(tmp_path))
    want = flat_params(model)
    assert back.keys() == want.keys()
    for k in want:
        if k.startswith("embed/"):  # padded vocabulary rows are not saved; they come back as zeros
            want[k] = want[k][:V] if k == "embed/table" else want[k][:, :V]
            back[k] = back[k][:V] if k == "embed/table" else back[k][:, :V]
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_save_hf_checkpoint_refuses_configs_without_hf_equivalent(tmp_path):
    cfg = tformer.ModelConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=1, norm_placement="post")
    with pytest.raises(ValueError, match="norm_placement='post'"):
        thf.save_hf_checkpoint(nnx.eval_shape(lambda: tformer.DecoderLM(cfg, rngs=nnx.Rngs(0))), tmp_path)
    # The speed-run options: QK-norm and ReLU² exist in neither GPT-2 nor Llama.
    for field, value, match in [("qk_norm", True, r"ModelConfig.qk_norm=True has no Hugging Face GPT-2/Llama"),
                                ("activation", "relu2", r"ModelConfig.activation='relu2' does not fit a Hugging "
                                                        r"Face gpt2 model"),
                                ("norm_bias", False, r"ModelConfig.norm_bias=False does not fit a Hugging Face gpt2")]:
        bad = cfg.replace(norm_placement="pre", **{field: value})
        with pytest.raises(ValueError, match=match):
            thf.save_hf_checkpoint(nnx.eval_shape(lambda c=bad: tformer.DecoderLM(c, rngs=nnx.Rngs(0))), tmp_path)


# ---------------------------------------------------------------------------
# Broken checkpoints: clear errors naming the tensor and the file.


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    llama().save_pretrained(d)
    return d


def rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy a checkpoint dir, editing its tensor dict and/or config dict."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    save_file(edit_tensors(tensors) if edit_tensors else tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return dst


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    d = rewrite(llama_dir, tmp_path / "c", edit_tensors=lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing .*model.safetensors"):
        thf.load_hf_checkpoint(d)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    d = rewrite(llama_dir, tmp_path / "c", edit_tensors=lambda t: t | {"score.weight": np.zeros((3, 64), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors in the checkpoint: 'score.weight' in model.safetensors"):
        thf.load_hf_checkpoint(d)


def test_shape_mismatch_is_named(llama_dir, tmp_path):
    d = rewrite(llama_dir, tmp_path / "c", edit_config=lambda c: c | {"intermediate_size": 128})
    match = (r"'model.layers.0.mlp.gate_proj.weight' in model.safetensors has shape \(160, 64\), "
             r"but config.json \(intermediate_size, hidden_size\) implies \(128, 64\)")
    with pytest.raises(ValueError, match=match):
        thf.load_hf_checkpoint(d)


def test_nonzero_gate_bias_is_refused(llama_dir, tmp_path):
    """mlp_bias=true loads (b_in, b_out) only while gate_proj.bias is zero: tformer has no gate bias."""
    def add_biases(t, gate):
        for i in range(2):
            for proj, n in (("gate", 160), ("up", 160), ("down", 64)):
                t[f"model.layers.{i}.mlp.{proj}_proj.bias"] = np.full(n, gate if proj == "gate" else 0.5, np.float32)
        return t

    def config(c):
        return c | {"mlp_bias": True}
    model = thf.load_hf_checkpoint(rewrite(llama_dir, tmp_path / "a", lambda t: add_biases(t, 0.0), config))
    assert model.cfg.use_bias and np.all(np.asarray(model.blocks.layers.mlp.b_in[...]) == 0.5)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.bias' is nonzero"):
        thf.load_hf_checkpoint(rewrite(llama_dir, tmp_path / "b", lambda t: add_biases(t, 0.1), config))


def test_unsupported_checkpoint_configs_are_refused(llama_dir, tmp_path):
    d = rewrite(llama_dir, tmp_path / "a", edit_config=lambda c: c | {"model_type": "gemma"})
    with pytest.raises(ValueError, match="model_type='gemma' is not supported"):
        thf.load_hf_checkpoint(d)
    scaled = {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0}}
    d = rewrite(llama_dir, tmp_path / "b", edit_config=lambda c: c | scaled)
    with pytest.raises(ValueError, match="rope_parameters.rope_type='llama3'"):
        thf.load_hf_checkpoint(d)
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((llama_dir / "config.json").read_text())
        thf.load_hf_checkpoint(tmp_path / "empty")


def test_core_import_does_not_need_safetensors():
    """`import tformer` imports tformer.hf, so hf may import safetensors only inside functions."""
    tree = ast.parse(Path(thf.__file__).read_text())
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert top and not top & {"safetensors", "torch", "transformers", "ml_dtypes"}, top


def test_fine_tuning_starts_from_loaded_weights(llama_dir):
    """create_train_state(params=...) trains from the HF weights, sharded too, and names a bad tensor."""
    from tformer import training

    model = thf.load_hf_checkpoint(llama_dir)
    params = nnx.to_pure_dict(nnx.state(model))
    o = tformer.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    toks = jnp.asarray(tokens(8, 17, seed=3), jnp.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    losses = {}
    tp_mesh = tformer.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    for name, mesh in (("single", None), ("tp", tp_mesh)):
        rules = None if mesh is None else tformer.rules_for("dp_tp")
        graphdef, tx, state, sh = training.create_train_state(tformer.DecoderLM, model.cfg, o, mesh=mesh, rules=rules,
                                                        params=jax.tree.map(jnp.copy, params))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the loaded weights, not an init
        step = training.make_train_step(graphdef, tx, o, mesh=mesh, rules=rules, state_sharding=sh,
                                  batch_sharding=None if mesh is None else training.batch_sharding(mesh, rules, batch))
        state, first = step(state, batch)
        state, second = step(state, batch)
        losses[name] = [float(first["loss"]), float(second["loss"])]
    # The first loss is the loaded model's cross-entropy on the batch (its logits match HF's); training lowers it.
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(
            torch.tensor(np.asarray(forward(model, batch["inputs"])[..., :V])).reshape(-1, V),
            torch.tensor(np.asarray(batch["targets"])).reshape(-1).long())
    assert losses["single"][0] == pytest.approx(float(ref), rel=1e-5)
    assert losses["single"][1] < losses["single"][0]
    np.testing.assert_allclose(losses["tp"], losses["single"], rtol=1e-5)
    bad = jax.tree.map(lambda x: x, params)
    bad["embed"]["table"] = bad["embed"]["table"][:-1]
    with pytest.raises(ValueError, match=r"params=\.\.\.\): parameter .*embed.*table.* is float32\["):
        training.create_train_state(tformer.DecoderLM, model.cfg, o, params=bad)


@pytest.mark.parametrize("keep", [0, 0.5])  # empty, truncated halfway
def test_truncated_or_empty_safetensors_names_the_file(llama_dir, tmp_path, keep):
    d = rewrite(llama_dir, tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file .*truncated"):
        thf.load_hf_checkpoint(d)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"missing the field 'hidden_size'"),
        (lambda c: c | {"num_hidden_layers": "2"}, r"field 'num_hidden_layers' must be an integer, got '2'"),
    ],
)
def test_hf_config_with_a_missing_or_mistyped_field_names_it(llama_dir, tmp_path, edit, match):
    d = rewrite(llama_dir, tmp_path / "c", edit_config=edit)
    with pytest.raises(ValueError, match=match):
        thf.load_hf_checkpoint(d)


def test_hf_config_that_is_not_json_names_the_file(llama_dir, tmp_path):
    d = rewrite(llama_dir, tmp_path / "c")
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        thf.load_hf_checkpoint(d)
