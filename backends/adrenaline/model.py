"""The ``adrenaline`` Python-based Triton backend: one entry point, one role per model.

Each model of the repository says ``backend: "adrenaline"`` and names its role in
``parameters { key: "role" }``; this file hands the model to that role's class. The roles only
translate between Triton tensors and the engine library (``adrenaline_py``).
"""

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROLES = {
    "preprocessing": "role_preprocessing",
    "scheduler": "role_scheduler",
    "prefill": "role_prefill",
    "decode": "role_decode",
    "attention": "role_attention",
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        role = config.get("parameters", {}).get("role", {}).get("string_value")
        if role not in ROLES:
            raise ValueError(
                f"model {args['model_name']}: parameter 'role' must be one of {sorted(ROLES)}, got {role!r}"
            )
        self.impl = importlib.import_module(ROLES[role]).Role()
        self.impl.initialize(args, config)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()
