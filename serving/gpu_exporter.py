"""GPU metrics from NVML (nvidia-ml-py), named to map onto dcgm-exporter's; run as its own process.

    python -m serving.gpu_exporter --host 127.0.0.1 --port 9400

Every scrape reads NVML afresh. With no GPU (or no driver) it serves ``tandem_gpus 0`` and nothing else,
without an error: the same dashboards then work on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import metrics as m

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_MIB = 1 << 20


def _nvml() -> Any | None:
    """The initialised pynvml module, or None when there is no NVML library or GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError: all mean "no GPU here"
        return None
    return pynvml


def _read(field: str, fn: Callable[[Any], float], handle: Any) -> float | None:
    try:
        return float(fn(handle))
    except Exception:  # a field some boards do not support (power on some consumer cards): skip it
        m.GPU_SCRAPE_ERRORS.labels(field=field).inc()
        return None


def collect() -> int:
    """Refresh every GPU gauge from NVML; returns the number of GPUs seen."""
    with _LOCK:
        for gauge in m.GPU_PER_DEVICE:
            gauge.clear()  # a GPU that went away must not keep its last values
        nvml = _nvml()
        if nvml is None:
            m.GPU_COUNT.set(0)
            return 0
        try:
            count = nvml.nvmlDeviceGetCount()
            for index in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                labels = {
                    "gpu": str(index),
                    "UUID": uuid.decode() if isinstance(uuid, bytes) else uuid,
                    "modelName": name.decode() if isinstance(name, bytes) else name,
                }
                util = _read("utilization", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu, handle)
                mem_util = _read("memory_utilization", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).memory, handle)
                mem = _read_memory(nvml, handle)
                temp = _read(
                    "temperature", lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU), handle
                )
                power = _read("power", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0, handle)  # mW -> W
                values = [
                    (m.GPU_UTILIZATION, util),
                    (m.GPU_MEMORY_UTILIZATION, mem_util),
                    (m.GPU_TEMPERATURE, temp),
                    (m.GPU_POWER, power),
                ]
                if mem is not None:
                    values += [(m.GPU_MEMORY_USED, mem[0]), (m.GPU_MEMORY_FREE, mem[1]), (m.GPU_MEMORY_TOTAL, mem[2])]
                for gauge, value in values:
                    if value is not None:
                        gauge.labels(**labels).set(value)
            m.GPU_COUNT.set(count)
            return int(count)
        finally:
            nvml.nvmlShutdown()


def _read_memory(nvml: Any, handle: Any) -> tuple[float, float, float] | None:
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:
        m.GPU_SCRAPE_ERRORS.labels(field="memory").inc()
        return None
    return float(info.used), float(info.free), float(info.total)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        collect()
        body = generate_latest(m.GPU_REGISTRY)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """Start the exporter's HTTP server (caller runs ``serve_forever``)."""
    return ThreadingHTTPServer((host, port), _Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.gpu_exporter", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpus = collect()
    server = serve(args.host, args.port)
    log.info("GPU exporter on http://%s:%d/metrics (%d GPU(s))", args.host, args.port, gpus)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
