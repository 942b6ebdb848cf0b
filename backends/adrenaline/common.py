"""Triton ↔ engine translation helpers shared by the roles."""

from __future__ import annotations

import hmac
import logging
import os
import re
import sys

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from adrenaline_py.config import EngineConfig

log = logging.getLogger("adrenaline")


def engine_config_path(model_config: dict) -> str:
    path = model_config.get("parameters", {}).get("engine_config", {}).get("string_value")
    if not path:
        raise ValueError("parameter 'engine_config' (path of the launcher's engine.json) is missing")
    return path


def engine_config(model_config: dict) -> EngineConfig:
    return EngineConfig.load(engine_config_path(model_config))


def setup_process(role: str, engine: EngineConfig) -> None:
    logging.basicConfig(level=os.environ.get("ADRENALINE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    # Only prefill and decode run big CPU kernels; the other roles get one thread so that six
    # processes do not oversubscribe the cores.
    default = max(1, (os.cpu_count() or 2) // 2) if role in ("prefill", "decode") else 1
    torch.set_num_threads(int(os.environ.get("ADRENALINE_TORCH_THREADS", "0")) or default)
    if role == "decode":
        # The decode loop gives up the GIL at every GPU wait; output threads running Python in the
        # meantime would keep it up to the switch interval each time it wants it back.
        sys.setswitchinterval(engine.gil_switch_interval_ms / 1e3)


def dtype_for(engine: EngineConfig) -> torch.dtype:
    return getattr(torch, engine.dtype)


def inputs_of(request) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


# The python backend appends "At:" and the stack to the message of an exception raised in a model
# (also one that comes back from a BLS call); clients see neither that nor the server's paths.
_TRACEBACK = re.compile(r"\n*\bAt:\n.*", re.S)
_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\":,()\[\]]+/)+[^\s/'\":,()\[\]]*")


def client_message(message: str) -> str:
    """What a client may read of an error: no traceback, no file paths (docs/reliability.md)."""
    return _PATH.sub("<path>", _TRACEBACK.sub("", message)).strip() or "internal error"


def error_response(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(client_message(message)))


def tensor(name: str, value, dtype) -> pb_utils.Tensor:
    """A [1, ...] tensor (the batch dimension of the ensemble's models)."""
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype)[None, ...])


def bytes_tensor(name: str, text: str | bytes) -> pb_utils.Tensor:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return pb_utils.Tensor(name, np.array([[data]], dtype=np.object_))


def text_of(array: np.ndarray) -> str:
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def check_internal(x: dict, engine: EngineConfig, model: str) -> None:
    """Internal models serve only the other roles: a client calling them directly could reserve KV
    blocks forever (scheduler) or write into other requests' blocks (prefill)."""
    if not engine.internal_token:
        return
    given = text_of(x["internal_token"]) if "internal_token" in x else ""
    if not hmac.compare_digest(given, engine.internal_token):
        raise PermissionError(f"'{model}' is internal to the server: send requests to the 'ensemble' model")


def internal_token_tensor(engine: EngineConfig) -> pb_utils.Tensor:
    return pb_utils.Tensor("internal_token", np.array([[engine.internal_token.encode()]], dtype=np.object_))
