"""A peer's child process: `python -m experiments.peers SPEC_JSON` (started by `PeerProcess`).

Builds the peer's model and optimizer once, replies with one JSON line (versions, threads, parameters),
then for each request line `{"steps": n, "warmup": w}` on stdin runs w untimed and n timed train steps and
replies `{"times_ms": [...], "cpu_ms": ..., "loss": ...}` (cpu_ms: the process's CPU time per timed step).
Anything the peer's own code prints goes to stderr, so stdout carries the replies only. Ends at EOF on stdin.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from experiments.peers import Shape


def build(name: str, arg: str | None, shape: Shape):
    """(model, optimizer, loss_fn(x, y) -> scalar loss) for peer `name`."""
    if name == "hf":
        from experiments.peers import hf_gpt2

        return hf_gpt2.build(shape)
    from experiments.peers import nanogpt

    return nanogpt.build(arg, shape)


def serve(spec: dict, out) -> None:
    import torch

    shape = Shape(**spec["shape"])
    torch.manual_seed(shape.seed)
    with contextlib.redirect_stdout(sys.stderr):
        model, opt, loss_fn = build(spec["name"], spec["arg"], shape)
    gen = torch.Generator().manual_seed(shape.seed)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=gen)
    y = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    info = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                params=sum(p.numel() for p in params))
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    reply(out, info)
    for line in sys.stdin:
        req = json.loads(line)
        loss = None
        for _ in range(req.get("warmup", 0)):
            loss = step()
        times, cpu0 = [], time.process_time()
        for _ in range(req["steps"]):
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
        reply(out, dict(times_ms=times, cpu_ms=(time.process_time() - cpu0) * 1e3 / max(req["steps"], 1), loss=loss))


def reply(out, rec: dict) -> None:
    out.write(json.dumps(rec) + "\n")
    out.flush()


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("tune_allocator"):
        from tformer import host

        host.tune_allocator()  # before torch starts its threads, as benchmark.py does for itself
    out = sys.stdout
    try:
        serve(spec, out)
    except Exception as e:  # the parent raises it with this text
        reply(out, dict(error=f"{type(e).__name__}: {e}"))
        raise


if __name__ == "__main__":
    main()
