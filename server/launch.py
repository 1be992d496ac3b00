"""``hubprune serve``: plan memory, start every engine, serve until SIGINT/SIGTERM, stop every engine.

Example::

    from hubprune.server import ModelSpec, ServeConfig, serve
    serve(ServeConfig(models=[ModelSpec(path="HuggingFaceTB/SmolLM2-135M-Instruct", name="original"),
                              ModelSpec(path="out/smollm2-24l")]))
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, cast

from hubprune.server.config import ServeConfig

if TYPE_CHECKING:
    from hubprune.server.engine import Engine

logger = logging.getLogger(__name__)


def serve(config: ServeConfig) -> int:
    """Serve ``config`` until interrupted; return the exit status (1 when an engine failed to start).

    Refuses (ValueError) a configuration or memory plan that cannot work before starting anything.
    """
    from hubprune.server.memory import plan_memory
    from hubprune.server.vllm_engine import EngineStartError

    _check_port(config.host, config.port)
    kind = choose_engine(config)
    on_gpu = _on_gpu(config, kind)
    if kind == "transformers":
        from hubprune.server.embedded import check_quantization

        for spec in config.models:
            if spec.path:
                check_quantization(spec, config.device)
    elif not on_gpu and any(s.quantization in ("8bit", "4bit") for s in config.models):
        raise ValueError("8bit/4bit loading needs a CUDA GPU; this machine has none: remove quantization")
    folders = {spec.name: resolve_folder(spec) for spec in config.models if spec.path}
    plan = plan_memory(
        config.models,
        folders,
        engine=kind,
        on_gpu=on_gpu,
        gpu_memory_utilization=config.gpu_memory_utilization,
        budget=cast("int | None", config.memory_budget),  # __post_init__ parsed it into bytes
    )
    logger.info("memory plan:\n%s", plan.table())
    plan.check()
    try:
        asyncio.run(_run(config, kind, on_gpu, folders, plan))
    except EngineStartError as err:
        logger.error("hubprune serve: %s", err)
        return 1
    return 0


def choose_engine(config: ServeConfig) -> str:
    """ "transformers" or "vllm" for ``config.engine`` (auto: vLLM when its Python can import vllm)."""
    if config.engine == "transformers" or all(spec.url for spec in config.models):
        return "transformers"
    from hubprune.server.vllm_engine import vllm_available

    python = config.vllm_interpreter()
    if vllm_available(python):
        return "vllm"
    if config.engine == "vllm":
        raise ValueError(
            f"--engine vllm: {python} cannot import vllm. Create its venv with `python3 dev.py setup` "
            "(CPU) or `python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm` (GPU), or point "
            "--vllm-python / HUBPRUNE_VLLM_PYTHON at a Python that has vLLM"
        )
    logger.info("engine: transformers (no vLLM at %s)", python)
    return "transformers"


def resolve_folder(spec) -> str:
    """The local transformers folder of a Hub id, folder or .gguf (converted once, then cached)."""
    from hubprune.loading import local_folder, locate

    name, origin = locate(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    return str(local_folder(name, origin))


async def _run(config: ServeConfig, kind: str, on_gpu: bool, folders: dict[str, str], plan) -> None:
    import uvicorn

    from hubprune.server.app import create_app

    engines = _engines(config, kind, on_gpu, folders, plan)
    if kind == "transformers" and not on_gpu:
        _share_cpu_threads(sum(1 for s in config.models if not s.url))
    loop, startup, state = asyncio.get_running_loop(), asyncio.current_task(), {"serving": False}

    def on_signal(sig: int) -> None:  # while serving, uvicorn handles the signal itself
        if not state["serving"] and startup is not None:
            logger.warning("%s while starting: stopping the engines", signal.Signals(sig).name)
            startup.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if kind == "vllm" and on_gpu:  # one at a time: each vLLM checks the GPU's free memory when it starts
            for engine in engines.values():
                await _start(engine)
        else:
            await asyncio.gather(*(_start(engine) for engine in engines.values()))
        app = create_app(
            engines,
            api_key=config.api_key,
            max_body_bytes=config.max_body_bytes,
            max_queue={s.name: s.max_queue for s in config.models},
            info=_info(folders),
            shutdown_grace=config.shutdown_grace,
        )
        server = _Server(
            app,
            loop,
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=config.shutdown_grace + 5,  # type: ignore[arg-type]  # seconds, float too
            ),
        )
        state["serving"] = True
        logger.info(
            "serving %s at http://%s:%d/v1%s",
            ", ".join(engines),
            config.host,
            config.port,
            " (API key required)" if config.api_key else "",
        )
        if not config.api_key and not _loopback(config.host):
            logger.warning(
                "warning: serving on %s without an API key: anyone who can reach this address can use "
                "the models; pass --api-key (or set HUBPRUNE_API_KEY), or bind to 127.0.0.1",
                config.host,
            )
        await server.serve()
    except asyncio.CancelledError:
        logger.info("interrupted before serving")
    finally:
        await asyncio.gather(*(engine.close() for engine in engines.values()), return_exceptions=True)
        logger.info("stopped %d engine(s)", len(engines))


def _Server(app, loop: asyncio.AbstractEventLoop, config):
    """uvicorn's server, which also starts the app's shutdown grace period when a signal stops it."""
    import uvicorn

    from hubprune.server.app import begin_shutdown

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            loop.call_soon_threadsafe(begin_shutdown, app)
            super().handle_exit(sig, frame)

    return Server(config)


async def _start(engine) -> None:
    from hubprune.server.vllm_engine import EngineStartError

    try:
        await engine.start()
    except (EngineStartError, asyncio.CancelledError):
        raise
    except Exception as err:  # a model that does not load: one line, not a traceback
        raise EngineStartError(f"{engine.name} did not start: {type(err).__name__}: {err}") from err


def _engines(config: ServeConfig, kind: str, on_gpu: bool, folders: dict[str, str], plan) -> dict:
    from hubprune.server.vllm_engine import VLLMEngine

    shares = plan.shares()
    rows = {m.name: m for m in plan.models}
    engines: dict[str, Engine] = {}
    for spec in config.models:
        if spec.url or kind == "vllm":
            kv_gib = max(1, int(rows[spec.name].kv // 2**30)) if spec.name in rows else 1
            share = shares.get(spec.name, 1.0)
            utilization = plan.usable * share / plan.device_total if on_gpu and plan.device_total else None
            engines[spec.name] = VLLMEngine(
                spec,
                folder=folders.get(spec.name),
                python=config.vllm_interpreter(),
                on_gpu=on_gpu,
                gpu_memory_utilization=utilization,
                cpu_kv_gib=kv_gib,
                log_dir=config.log_dir,
                startup_timeout=config.startup_timeout,
            )
        else:
            from hubprune.server.embedded import TransformersEngine

            engines[spec.name] = TransformersEngine(spec, folders[spec.name], device=config.device)
    return engines


def _info(folders: dict[str, str]) -> dict[str, dict]:
    """What /v1/models shows about each folder: its layer count and, for a pruned one, what was removed."""
    from hubprune.record import RECORD_FILE, PruneRecord
    from hubprune.server.memory import model_facts

    info: dict[str, dict] = {}
    for name, folder in folders.items():
        info[name] = {"num_layers": model_facts(folder).num_layers}
        if (Path(folder) / RECORD_FILE).is_file():
            record = PruneRecord.load(folder)
            info[name].update(
                base_model=record.base_model,
                base_num_layers=record.base_num_layers,
                removed_layers=record.removed_layers,
            )
            chat = record.evaluation.get("chat") or {}
            if chat.get("top1_agreement") is not None:  # measured by hubprune eval --chat
                info[name]["chat_agreement"] = chat["top1_agreement"]
            for key in ("width", "sparsity"):  # what was cut inside the kept layers, if anything
                if getattr(record, key):
                    info[name][key] = getattr(record, key)
    return info


def _share_cpu_threads(n_models: int) -> None:
    """Split the cores between the embedded models: two OpenMP pools on the same cores slow both down many times."""
    import os

    import torch

    if "OMP_NUM_THREADS" in os.environ or n_models < 2:
        return
    threads = max(1, len(os.sched_getaffinity(0)) // n_models)
    torch.set_num_threads(threads)
    logger.info(
        "%d models share %d cores: %d torch thread(s) each (set OMP_NUM_THREADS to choose)",
        n_models,
        len(os.sched_getaffinity(0)),
        threads,
    )


def _on_gpu(config: ServeConfig, kind: str) -> bool:
    if kind == "transformers":
        from hubprune.loading import resolve_device

        return resolve_device(config.device).type == "cuda"
    import torch

    return torch.cuda.is_available()


def _check_port(host: str, port: int) -> None:
    """Fail before loading anything when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
