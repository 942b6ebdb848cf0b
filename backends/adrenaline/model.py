"""The ``adrenaline`` Python-based Triton backend: one entry point, one role per model.

Each model of the repository says ``backend: "adrenaline"`` and names its role in
``parameters { key: "role" }``; this file hands the model to that role's class. The roles only
translate between Triton tensors and the engine library (``adrenaline_py``).
"""

import importlib
import json
import os
import sys

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROLES = {
    "preprocessing": "role_preprocessing",
    "scheduler": "role_scheduler",
    "prefill": "role_prefill",
    "decode": "role_decode",
    "attention": "role_attention",
    "vllm": "role_vllm",
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        role = config.get("parameters", {}).get("role", {}).get("string_value")
        if role not in ROLES:
            raise ValueError(
                f"model {args['model_name']}: parameter 'role' must be one of {sorted(ROLES)}, got {role!r}"
            )
        from common import engine_config_path, error_response, log

        from adrenaline_py.config import EngineConfig
        from adrenaline_py.serving.health import Heartbeat
        from adrenaline_py.serving.private import drop_secret_env

        drop_secret_env()  # tritonserver's hidden API-key arguments: no worker inherits them

        # The launcher restarts the server when a stub's process is gone or its heartbeat stops
        # (tritonserver 2.51 neither restarts stubs nor marks their models not ready).
        self._heartbeat = Heartbeat(EngineConfig.load(engine_config_path(config)).run_dir,
                                    args["model_instance_name"])
        self._decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self._error_response, self._log = error_response, log
        self.impl = importlib.import_module(ROLES[role]).Role()
        self.impl.initialize(args, config)

    def execute(self, requests):
        try:
            return self.impl.execute(requests)
        except Exception as e:
            if self._decoupled:  # its requests' senders may be in use on other threads: not ours to answer
                raise
            # Raised here, the python backend would send the stack and the server's paths to the client.
            self._log.exception("execute failed")
            return [self._error_response(f"internal error: {type(e).__name__}: {e}") for _ in requests]

    def finalize(self):
        self.impl.finalize()
        self._heartbeat.stop()
