"""Tokenization and request validation (the ensemble's first step).

Inputs: the client contract (docs/configuration.md). Outputs:
  input_ids          INT32 [-1]  prompt tokens
  generation_params  BYTES [1]   validated `GenerationParams` as JSON
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils
from common import bytes_tensor, engine_config, error_response, inputs_of, setup_process, tensor, text_of

from adrenaline_py.loader import load_checkpoint
from adrenaline_py.request import API_DEFAULTS, InvalidRequest, Limits, finish_params, parse_request


class Role:
    def initialize(self, args, config):
        self.engine = engine_config(config)
        setup_process("preprocessing", self.engine)
        ckpt = load_checkpoint(self.engine.model, with_weights=False)
        self.tokenizer = ckpt.tokenizer
        self.vocab_size = ckpt.config.vocab_size
        self.limits = Limits(self.engine.max_model_len, self.engine.max_tokens_limit, self.engine.default_max_tokens)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            inputs = inputs_of(request)
            # Set by the vllm_model entry (role_vllm.py); a plain ensemble request is TensorRT-LLM's.
            api = text_of(inputs.pop("client_api")) if "client_api" in inputs else "trtllm"
            if api not in API_DEFAULTS:
                raise InvalidRequest(f"client_api must be one of {sorted(API_DEFAULTS)}, got {api!r}")
            prompt, settings = parse_request(inputs, self.limits, api)
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequest("text_input produced no tokens")
            params = finish_params(
                settings, len(ids), self.limits, self.vocab_size, self.tokenizer.eos_token_ids,
                lambda w: self.tokenizer.encode(w, add_special_tokens=False), api,
            )
        except InvalidRequest as e:
            return error_response(str(e))
        return pb_utils.InferenceResponse(output_tensors=[
            tensor("input_ids", ids, np.int32),
            bytes_tensor("generation_params", params.to_json()),
        ])

    def finalize(self):
        pass
