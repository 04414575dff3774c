"""Process control of a run: signals, joining a multi-process run, and a last word before a C++ abort.

`Preemption` turns SIGTERM / Ctrl-C into "save and exit at the next step".
`start_processes` joins a multi-process run (`jax.distributed`); a failed
collective is reported as `lost_peer_message`, naming the peers it can be,
including when gloo aborts on a thread no Python frame can catch
(`say_so_if_the_transport_aborts`).
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from absl import logging

from tformer import sharding


class Preemption:
    """SIGTERM (a preemptible VM being reclaimed) or Ctrl-C (SIGINT) -> save and exit at the next step.

    A second Ctrl-C aborts at once (KeyboardInterrupt), without saving.
    """

    def __init__(self):
        self.requested: str | None = None
        self._prev = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint and exiting%s", name,
                        " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "")
        self.requested = name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for s, prev in self._prev.items():
            signal.signal(s, prev)


def use_fake_cpu_devices(n: int) -> None:
    """Make the CPU backend expose `n` devices; only possible before JAX starts its backends."""
    if n < 1:
        raise ValueError(f"--plan_devices must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise ValueError(
            "--plan_devices: JAX's backends are already initialised, so the device count can no longer "
            "change; set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python instead"
        ) from None
    jax.config.update("jax_platforms", "cpu")


def start_processes(coordinator_address: str | None, num_processes: int | None, process_id: int | None, *,
                    auto: bool, heartbeat_timeout: int) -> None:
    """Join a multi-process run (if asked); a peer silent for `heartbeat_timeout` seconds stops every process."""
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout, shutdown_timeout_seconds=heartbeat_timeout)
    if not sharding.initialize_distributed(coordinator_address, num_processes, process_id, auto=auto, **timeouts):
        return
    say_so_if_the_transport_aborts(lost_peer_message("the collective transport aborted, below"))
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # process 0 reports progress


def lost_peer_message(cause: str) -> str:
    """A failed collective in a multi-process run: almost always a peer that died; name who it can be."""
    others = [i for i in range(jax.process_count()) if i != jax.process_index()]
    who = f"process {others[0]}" if len(others) == 1 else f"one of processes {others}"
    return (f"lost contact with {who} ({cause}); once every process is back, "
            f"rerun the same command on each to resume from the last checkpoint")


_TERMINATE_HANDLERS = []  # ctypes callbacks must outlive their registration


def say_so_if_the_transport_aborts(message: str) -> None:
    """Print `error: <message>` before a C++ abort on a collectives thread.

    gloo (JAX's CPU collectives) sometimes meets a dead peer on its own thread, throws there, and so ends in
    std::terminate: no Python frame can catch that. This hooks libstdc++'s terminate handler to print the
    runner's one line first, then hands over to the previous handler (gloo's message, then abort). Where
    libstdc++ is not the runtime (macOS) nothing is hooked.
    """
    import ctypes

    try:
        set_terminate = ctypes.CDLL("libstdc++.so.6")._ZSt13set_terminatePFvvE
    except (OSError, AttributeError):
        return
    set_terminate.restype, set_terminate.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    handler_type = ctypes.CFUNCTYPE(None)
    previous = None

    def on_terminate():
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        if previous:
            handler_type(previous)()
        os.abort()

    _TERMINATE_HANDLERS.append(handler_type(on_terminate))
    previous = set_terminate(ctypes.cast(_TERMINATE_HANDLERS[-1], ctypes.c_void_p))
