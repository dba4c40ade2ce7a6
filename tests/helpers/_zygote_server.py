"""The fork server behind `tests/helpers/zygote.py` (run as `python -m tests.helpers._zygote_server`).

Imports what a training process imports, then serves one request per stdin line: a JSON object
with `target` (`["-m", MODULE]` or `[SCRIPT]`), `args`, `nproc`, `cwd`, `env`, `stdout` and `stderr`
(file paths). For each request it forks a child, answers `{"pid": ...}`, waits for the child and
answers `{"rc": ...}`. The child starts a session of its own (the client may kill it as a group),
points fds 0/1/2 at /dev/null and the two files, takes the request's directory and environment, and
runs the target as `python -m MODULE ARGS` / `python SCRIPT ARGS` would (runpy, `__main__`, the same
sys.argv and sys.path[0]) -- itself for one process, or under torch's elastic launcher (what
`torchrun --standalone --nproc_per_node=N` runs) with forked workers for several. The server never
runs a request in its own interpreter, so nothing carries over from one request to the next.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import sys
import traceback
import uuid

ANSWERS = os.fdopen(os.dup(1), "w", buffering=1)
"""The pipe to the client; fd 1 joins fd 2 (the server's log), so nothing an import prints reaches it."""
os.dup2(2, 1)

# what a training process imports, megatron_lomdm first (its CPU import hook must precede megatron)
import megatron_lomdm  # noqa: E402, F401
import deepspeed  # noqa: E402, F401
import megatron_lomdm.apps.artifacts  # noqa: E402, F401
import megatron_lomdm.apps.train  # noqa: E402, F401
import megatron_lomdm.training.loop  # noqa: E402, F401
import torch.distributed.run  # noqa: E402, F401

# ...and what it imports on first use, ~1-2 CPU-s per run otherwise: the engines and megatron's parts
# they build, the optimizer step's torch._dynamo, DeepSpeed's initialize (its op registry, ZeRO's
# optimizers, functorch.compile, networkx), and the tools the tests also run through the server
for _name in ("megatron_lomdm.distributed.cpu_compat", "megatron_lomdm.distributed.megatron_engine",
              "megatron_lomdm.distributed.deepspeed_engine", "megatron.core.models.gpt.gpt_layer_specs",
              "megatron.core.transformer.attention", "megatron.core.dist_checkpointing.strategies.torch",
              "torch._dynamo", "functorch.compile", "deepspeed.ops.op_builder.all_ops",
              "deepspeed.runtime.zero.muon.muon_optimizer", "networkx", "megatron_lomdm.apps.evaluate",
              "megatron_lomdm.apps.sample", "megatron_lomdm.apps.hf_export"):
    importlib.import_module(_name)

# What the imports built lives as long as any child: frozen, it is skipped by every collection in the
# children, also by the full one at a launcher child's interpreter exit (~2 s over this heap; the
# commands' own `quick_exit_gc` covers only the processes that run `main`). Copy-on-write pages stay shared.
gc.freeze()


def _run_main(target: list[str], args: list[str]) -> None:
    """`python -m MODULE ARGS` or `python SCRIPT ARGS` in this interpreter (its SystemExit propagates)."""
    if target[0] == "-m":
        sys.argv = [target[1], *args]
        sys.path[0] = os.getcwd()
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(target[0])
        sys.argv = [target[0], *args]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def _worker(target: list[str], args: list[str]) -> None:
    """One rank; a non-zero exit code fails the worker as it fails a torchrun worker."""
    try:
        _run_main(target, args)
    except SystemExit as err:
        if err.code not in (None, 0):
            raise


def _method_name(depth: int = 2) -> str:
    """`dynamic_rendezvous.get_method_name` without `inspect.stack()`: that builds source context for
    every frame by searching all of sys.modules, which here holds the whole training stack (a fresh
    torchrun has torch only), so the rendezvous's event records cost ~8 s per launch."""
    return sys._getframe(depth).f_code.co_name  # 0: this function, 1: the event recorder, 2: the method it names


def _launch(target: list[str], args: list[str], nproc: int) -> int:
    if nproc == 1:
        _run_main(target, args)
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    dynamic_rendezvous.get_method_name = _method_name

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="fork")
    try:
        elastic_launch(config, _worker)(target, args)
    except ChildFailedError as err:  # torchrun prints this summary and exits 1
        sys.stderr.write(err.format_msg() + "\n")
        return 1
    return 0


def _child(request: dict) -> int:
    ANSWERS.close()
    os.setsid()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    try:
        return _launch(request["target"], request["args"], request["nproc"])
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        sys.stderr.write(f"{err.code}\n")  # sys.exit("message"): printed, exit code 1
        return 1
    except BaseException:  # noqa: BLE001 -- the exit code and traceback are what the test reads
        traceback.print_exc()
        return 1


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            rc = _child(request)
            sys.stdout.flush()
            sys.stderr.flush()
            raise SystemExit(rc)  # a normal interpreter exit: exit handlers run as in a CLI process
        ANSWERS.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        ANSWERS.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
