"""`train.py --plan`: a run's steps compiled (or lowered) from abstract shapes on its mesh, no data, no training.

`print_plan` compiles the train step for the config's mesh and prints
per-device memory, FLOPs and collectives; `print_platform_plan` lowers the
train step, a prefill and a decode step for another platform and prints which
attention kernel each call would run there.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from experiments import finetune, run_config
from tformer import families, sharding


def _plannable_family(config: ConfigDict, flag: str) -> families.Family:
    """The config's family, validated; one that tformer.plan cannot plan fails naming the flag."""
    run_config.validate(config)
    family = run_config.family_of(config)
    if not family.plannable:
        plannable = ", ".join(name for name, f in families.FAMILIES.items() if f.plannable)
        raise ValueError(f"config.model.kind: {flag} plans the Transformer kinds ({plannable}), not {family.name!r}")
    return family


def _lengths(family: families.Family, data: ConfigDict) -> tuple[int, int | None]:
    """(target length, source length or None) of one training row of the family's task."""
    return (data.seq_len, None) if family.task == "lm" else (data.tgt_len, data.src_len)


def print_plan(config: ConfigDict):
    """Compile (never run) the run's train step on its mesh, print its table; returns the `tformer.plan.Plan`."""
    from tformer import plan as plan_lib

    family = _plannable_family(config, "--plan")
    cfg, o = run_config.plan_model_config(config), run_config.optim_config(config)
    mesh, rules = run_config.make_run_mesh(config), sharding.rules_for(config.mesh.preset)
    seq, src = _lengths(family, config.data)
    lcfg = finetune.lora_config(config.train)
    p = plan_lib.plan_train_step(family.model_class, cfg, o, mesh, rules, batch=config.train.batch_size,
                                 seq_len=seq, src_len=src, microbatches=config.mesh.microbatches or None, lora=lcfg,
                                 virtual_stages=config.mesh.virtual_stages)
    print(f"plan: {family.name} model, preset {config.mesh.preset!r}, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices\n{p.table()}")
    if lcfg is not None:
        print(finetune.lora_savings(family.model_class, cfg, o, mesh, rules, lcfg, p))
    return p


def print_platform_plan(config: ConfigDict, platform: str):
    """Lower (never compile) the config's train step, prefill and decode for `platform`; print what each
    attention call runs there. Returns the `tformer.plan.PlatformPlan`."""
    from tformer import plan as plan_lib

    family = _plannable_family(config, "--plan_platform")
    seq, src = _lengths(family, config.data)
    p = plan_lib.plan_platform(family.model_class, run_config.plan_model_config(config),
                               run_config.optim_config(config), platform, batch=config.train.batch_size,
                               seq_len=seq, src_len=src)
    print(f"plan for {platform} ({p.platform} lowering on this {jax.default_backend()} machine): {family.name} "
          f"model, batch {config.train.batch_size} x {seq} tokens, one device\n{p.table()}")
    return p
